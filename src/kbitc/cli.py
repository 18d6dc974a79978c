"""The `kbitc` command line. Subcommands: report (compile, inspect, ... arrive with their issues)."""

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


if __name__ == "__main__":
    main()
