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
@click.option("--trainable", is_flag=True, help="Also build the backward kernels (gradients w.r.t. layer "
              "inputs) that LoRA training (kbitc.lora) runs on.")
@click.option("--kv-cache", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also export a decode program with a static KV cache of this many positions (causal LMs "
              "from a Hugging Face folder): generation then runs one token per step, and on CUDA as a CUDA graph.")
def compile(model, target, scheme, blocksize, double_quant, threshold, compute_dtype, include, exclude, plan,
            output, force, trainable, kv_cache):
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
                               overrides=load_plan(plan) if plan else (), trainable=trainable,
                               kv_cache=kv_cache)
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
    decode = manifest.get("decode")
    cache = f"; decode program with a {decode['max_cache_len']}-position KV cache" if decode else ""
    return (f"compiled {len(layers)} layers ({params / 1e6:.2f}M params) to {bits:.2f} bits/param for "
            f"{manifest['target']} in {seconds:.1f} s\n"
            f"quantized linears {quantized / 2**20:.2f} MiB vs {2 * params / 2**20:.2f} MiB in 16-bit "
            f"({2 * params / max(quantized, 1):.2f}x smaller); whole artifact {size / 2**20:.2f} MiB at {path}{cache}")


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
    decode = manifest.get("decode")
    click.echo(f"decode program: {decode['program']}, static KV cache of {decode['max_cache_len']} positions"
               if decode else "decode program: none (compile with --kv-cache N for cached generation)")


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


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A UTF-8 text file; its last --heldout fraction is held out for perplexity.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for the adapters (PEFT layout), the report and, on Ctrl-C, a checkpoint.")
@click.option("--r", "r", default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", default=32.0, show_default=True, help="LoRA alpha (scaling = alpha / r).")
@click.option("--dropout", default=0.05, show_default=True)
@click.option("--rslora", is_flag=True, help="Scale by alpha / sqrt(r) (rank-stabilised LoRA).")
@click.option("--target", "targets", multiple=True,
              help="Adapt layers matching this glob (repeatable; default: every quantized linear).")
@click.option("--steps", default=200, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seq-len", default=128, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw8bit", "adam8bit", "lion8bit", "paged_adamw8bit", "adamw"]),
              default="adamw8bit", show_default=True)
@click.option("--heldout", default=0.1, show_default=True, help="Fraction of the text held out.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--cuda-graph", is_flag=True,
              help="Capture each training step (forward + backward) as one CUDA graph and replay it: "
                   "the step then costs one launch on the host (CUDA devices only).")
@click.option("--compile", "compile_", is_flag=True,
              help="Run the model through torch.compile: fuses the norms, activations and adds between kbitc "
                   "kernels (the first steps take longer while it compiles).")
@click.option("--resume", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Continue from a checkpoint written on Ctrl-C (OUT/checkpoint).")
def finetune(artifact, data, out, r, alpha, dropout, rslora, targets, steps, lr, batch_size, seq_len, optimizer,
             heldout, seed, device, cuda_graph, compile_, resume):
    """Train LoRA adapters (QLoRA) on a compiled causal LM's frozen k-bit weights.

    Prints the held-out perplexity before and after; the adapters load back with
    kbitc.lora.load and into PEFT on the original 16-bit model. Ctrl-C saves OUT/checkpoint;
    run again with --resume OUT/checkpoint to continue exactly there."""
    from kbitc.runtime.finetune import FinetuneConfig, finetune as run_finetune

    try:
        cfg = FinetuneConfig(r=r, alpha=alpha, dropout=dropout, targets=list(targets) or None, use_rslora=rslora,
                             steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, optimizer=optimizer,
                             heldout_fraction=heldout, seed=seed, device=device, cuda_graph=cuda_graph,
                             compile=compile_)
        report = run_finetune(artifact, data.read_text(encoding="utf-8"), out, cfg, resume=resume,
                              progress=lambda it, **kw: tqdm(it, **kw))
    except KbitcError as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        click.echo(f"\n{exc}", err=True)
        sys.exit(130)
    click.echo(f"held-out perplexity {report['heldout_ppl_before']:.2f} -> {report['heldout_ppl_after']:.2f} "
               f"({report['steps']} steps, {report['tokens_per_s'] or 0:.0f} tokens/s); adapters in {out}")


if __name__ == "__main__":
    main()
