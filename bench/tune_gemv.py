"""Measure the GEMV tuning tables on this GPU (NF4 + double quant, bf16, device time per call):

- linear_4bit's gemv_mma path (M <= 32) for each warps-per-block setting (spec config `gw`), per
  weight shape and M. The best setting per (shape class, M) goes into
  codegen_templates/cuda/linear_4bit.cu.j2 (gemv_tables).
- with --gemv1-rows: the M = 1 GEMV (gemv1) for each rows-per-block setting (spec config `g1r`; 0 is
  the gemv_mma path) per weight shape. The best goes into the template's g1r default.

Rerun after changing the kernels.

    python bench/tune_gemv.py [--warps 4 8 16] [--gemv1-rows 0 4 8 16] [--out-copy FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_timing import copy_ceiling_tbps, device_us  # noqa: E402

import kbitc.quant as kq  # noqa: E402
from kbitc.compiler.kernels import build_kernels  # noqa: E402
from kbitc.runtime import ops  # noqa: E402
from kbitc.runtime.kernel_spec import KernelSpec  # noqa: E402
from kbitc.runtime.reference import quant_state_args  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (2048, 2048), (5632, 2048), (2048, 5632)]
MS = [1, 8, 16, 32]
ROTATE = 6


def time_settings(library, specs: dict, kargs, x, out, n: int, k: int) -> dict:
    """Device µs per call of each spec (label -> spec) on weights rotated through kargs."""
    m = x.shape[0]
    times = {}
    for label, spec in specs.items():
        def call(p, code, absmax, absmax2, code2, offset, spec=spec):
            library.call(spec, [x, p, code] + ops._scale_inputs(absmax, absmax2, code2) + [None], [out],
                         [m, n, k], [offset])
            return out
        times[label] = device_us(call, kargs)
    return times


def table_header(labels) -> list[str]:
    return ["| out x in | M | bf16 cuBLAS µs | " + " | ".join(f"{label} µs" for label in labels)
            + " | best | best GB/s | best vs bf16 |",
            "| --- | --- | --- | " + " | ".join("---" for _ in labels) + " | --- | --- | --- |"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--gemv1-rows", type=int, nargs="*", default=[],
                        help="also time M = 1 through gemv1 with these rows per block (0: gemv_mma)")
    parser.add_argument("--out-copy", type=Path)
    args = parser.parse_args()
    major, minor = torch.cuda.get_device_capability()
    target = f"sm{major}{minor}"

    def spec(*config):
        return KernelSpec("linear_4bit", target, "bf16", "nf4", 64, config=config)
    # g1r = 0: M = 1 also runs gemv_mma, the kernel the gw table is for
    warp_specs = {f"gw={w}": spec(("g1r", 0), ("gw", w)) for w in args.warps}
    row_specs = {f"g1r={r}": spec(("g1r", r)) for r in args.gemv1_rows}
    library = build_kernels(list(warp_specs.values()) + list(row_specs.values()), register=False)
    ceiling = copy_ceiling_tbps()
    lines = [f"GPU {torch.cuda.get_device_name()}, copy ceiling {ceiling:.2f} TB/s; device µs per call "
             f"(weights rotated over {ROTATE} copies); GB/s = packed weight + scales / time",
             "", *table_header(warp_specs)]
    row_lines = ["", "M = 1, rows per gemv1 block (g1r=0: gemv_mma):", "", *table_header(row_specs)]
    for n, k in SHAPES:
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(ROTATE)]
        quant = [kq.quantize_4bit(w, "nf4", 64, double_quant=True) for w in weights]
        kargs = [(p, *quant_state_args(s)) for p, s in quant]
        nbytes = quant[0][0].numel() + quant[0][1].absmax.numel()
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            bf16 = device_us(lambda w: torch.nn.functional.linear(x, w), [(w,) for w in weights])
            for specs, target_lines in ((warp_specs, lines), (row_specs if m == 1 else {}, row_lines)):
                if not specs:
                    continue
                times = time_settings(library, specs, kargs, x, out, n, k)
                best = min(times, key=times.get)
                target_lines.append(f"| {n}x{k} | {m} | {bf16:.1f} | " + " | ".join(f"{t:.1f}" for t in times.values())
                                    + f" | {best} | {nbytes / (times[best] * 1e-6) / 1e9:.0f} | "
                                    f"{bf16 / times[best]:.2f}x |")
        del weights, quant, kargs
    text = "\n".join(lines + (row_lines if row_specs else []))
    print(text)
    if args.out_copy:
        args.out_copy.write_text(text + "\n")


if __name__ == "__main__":
    main()
