"""The `kbitc` command line: compile, inspect, generate, report."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click
from tqdm import tqdm

import kbitc
from kbitc.runtime.errors import KbitcError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(kbitc.__version__, prog_name="kbitc")
def main() -> None:
    """kbitc: quantize PyTorch models to NF4 / FP4 / int8, bit-compatible with bitsandbytes."""


@main.command()
@click.argument("weights", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--nf4", "scheme", flag_value="nf4", default=True, help="4-bit NormalFloat (default).")
@click.option("--fp4", "scheme", flag_value="fp4", help="bitsandbytes' 4-bit float.")
@click.option("--int8", "scheme", flag_value="int8", help="LLM.int8() row-wise int8.")
@click.option("--blocksize", default=64, show_default=True,
              help="4-bit block size: a power of two in 32..4096.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Quantize the 4-bit absmax again to 8 bits (saves ~0.37 bits/param).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def report(weights: Path, scheme: str, blocksize: int, double_quant: bool, as_json: bool) -> None:
    """Quantize every 2-D weight in WEIGHTS (.safetensors) and report per-layer error and size.

    Error is measured against float64 math: SQNR in dB (higher is better) and the largest
    absolute error relative to the layer's largest weight.
    """
    from kbitc.report import format_table, iter_weights, quantize_and_measure

    try:
        names = list(iter_weights(weights))
        rows = [quantize_and_measure(name, w, scheme, blocksize, double_quant)
                for name, w in tqdm(names, desc=f"quantizing ({scheme})", unit="layer",
                                    file=sys.stderr, disable=as_json)]
    except KbitcError as exc:
        raise click.ClickException(str(exc)) from exc
    if not rows:
        raise click.ClickException(f"expected 2-D floating-point weights in {weights}, found none")
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    else:
        click.echo(format_table(rows))


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc)) from exc


@main.command()
@click.argument("model")
@click.option("--target", default="cpu", show_default=True,
              help="cpu (this machine's ISA), cpu-avx2, cpu-avx512, sm75, sm80, sm86, sm89 or sm90.")
@click.option("--nf4", "scheme", flag_value="nf4", default=True, help="4-bit NormalFloat (default).")
@click.option("--fp4", "scheme", flag_value="fp4", help="bitsandbytes' 4-bit float.")
@click.option("--int8", "scheme", flag_value="int8", help="LLM.int8() with outlier decomposition.")
@click.option("--blocksize", default=64, show_default=True, help="4-bit block size (32..4096, power of two).")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Quantize the 4-bit absmax again to 8 bits.")
@click.option("--threshold", default=6.0, show_default=True, help="int8 outlier threshold (0 disables).")
@click.option("--compute-dtype", type=click.Choice(["f32", "bf16", "f16"]), default=None,
              help="Activation dtype (default: f32 on CPU, bf16 on CUDA).")
@click.option("--include", multiple=True, help="Only quantize layers matching this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Keep layers matching this glob in 16-bit (repeatable; "
              "default: lm_head and embeddings).")
@click.option("--plan", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON/YAML per-layer overrides, e.g. {\"*down_proj\": \"int8\"}.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The .kbit folder to write.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def compile(model, target, scheme, blocksize, double_quant, threshold, compute_dtype, include, exclude, plan,
            output, force):
    """Compile MODEL into a quantized .kbit artifact.

    MODEL is a Hugging Face model folder (config.json + *.safetensors, read offline), a saved
    torch.export program (.pt2), or package.module:factory returning (nn.Module, example_inputs).
    """
    import time

    from kbitc.compiler.config import DEFAULT_EXCLUDE, CompileConfig, load_plan
    from kbitc.compiler.pipeline import compile as run_compile

    started = time.perf_counter()
    try:
        config = CompileConfig(target=target.replace("-", "_"), scheme=scheme, blocksize=blocksize,
                               double_quant=double_quant, threshold=threshold, compute_dtype=compute_dtype or "",
                               include=tuple(include) or ("*",), exclude=tuple(exclude) or DEFAULT_EXCLUDE,
                               overrides=load_plan(plan) if plan else ())
        path = run_compile(model, config, output, force=force)
    except KbitcError as exc:
        _fail(exc)
    from kbitc.runtime.manifest import read_manifest

    click.echo(_summary(read_manifest(path), path, time.perf_counter() - started))


def _summary(manifest: dict, path: Path, seconds: float) -> str:
    layers = manifest["layers"]
    params = sum(l["out_features"] * l["in_features"] for l in layers)
    bits = sum(l["bits_per_param"] * l["out_features"] * l["in_features"] for l in layers) / max(params, 1)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    quantized = bits * params / 8
    return (f"compiled {len(layers)} layers ({params / 1e6:.2f}M params) to {bits:.2f} bits/param for "
            f"{manifest['target']} in {seconds:.1f} s\n"
            f"quantized linears {quantized / 2**20:.2f} MiB vs {2 * params / 2**20:.2f} MiB in 16-bit "
            f"({2 * params / max(quantized, 1):.2f}x smaller); whole artifact {size / 2**20:.2f} MiB at {path}")


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(artifact, as_json):
    """Show the per-layer plan of a .kbit artifact (scheme, bits/param, SQNR vs the float weight)."""
    from kbitc.runtime.manifest import read_manifest

    try:
        manifest = read_manifest(artifact)
    except KbitcError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    header = f"{'layer':<44} {'shape':>12} {'scheme':>6} {'block':>5} {'bits/param':>10} {'SQNR dB':>8}"
    click.echo(f"{artifact}: target {manifest['target']}, kbitc {manifest['kbitc_version']}, "
               f"source {manifest['source'].get('path')}")
    click.echo(header)
    click.echo("-" * len(header))
    for l in manifest["layers"]:
        click.echo(f"{l['name']:<44} {str(l['out_features']) + 'x' + str(l['in_features']):>12} {l['scheme']:>6} "
                   f"{l['blocksize'] if l['scheme'] != 'int8' else '-':>5} {l['bits_per_param']:>10.3f} "
                   f"{l['sqnr_db']:>8.2f}")
    kernels = manifest.get("kernels", {}).get("specs", [])
    click.echo(f"kernels: {', '.join(k['name'] for k in kernels) or 'none'}")


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=40, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def generate(artifact, prompt, max_new_tokens, temperature, seed, device):
    """Generate text with a compiled causal LM (the tokenizer is bundled in the artifact)."""
    from kbitc.runtime.generate import generate_text

    try:
        text = generate_text(artifact, prompt, max_new_tokens, temperature, seed, device)
    except KbitcError as exc:
        _fail(exc)
    click.echo(text)


if __name__ == "__main__":
    main()
