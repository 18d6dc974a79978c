"""Measure the GEMV tuning table: device time of linear_4bit's gemv_mma path (NF4 + double quant,
bf16) for each warps-per-block setting (spec config `gw`), per weight shape and M, on this GPU.

The best setting per (shape class, M) goes into codegen_templates/cuda/linear_4bit.cu.j2
(GEMV_WARPS_TABLE); rerun this after changing the kernel.

    python bench/tune_gemv.py [--warps 4 8 16] [--out-copy FILE]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--out-copy", type=Path)
    args = parser.parse_args()
    major, minor = torch.cuda.get_device_capability()
    target = f"sm{major}{minor}"
    specs = {w: KernelSpec("linear_4bit", target, "bf16", "nf4", 64, config=(("gw", w),)) for w in args.warps}
    library = build_kernels(list(specs.values()), register=False)
    ceiling = copy_ceiling_tbps()
    lines = [f"GPU {torch.cuda.get_device_name()}, copy ceiling {ceiling:.2f} TB/s; device µs per call "
             f"(weights rotated over {ROTATE} copies); GB/s = packed weight + scales / time",
             "", "| out x in | M | bf16 cuBLAS µs | " + " | ".join(f"gw={w} µs" for w in args.warps)
             + " | best | best GB/s | best vs bf16 |",
             "| --- | --- | --- | " + " | ".join("---" for _ in args.warps) + " | --- | --- | --- |"]
    for n, k in SHAPES:
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(ROTATE)]
        quant = [kq.quantize_4bit(w, "nf4", 64, double_quant=True) for w in weights]
        kargs = [(p, *quant_state_args(s)) for p, s in quant]
        nbytes = quant[0][0].numel() + quant[0][1].absmax.numel()
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            times = {}
            for w, spec in specs.items():
                def call(p, code, absmax, absmax2, code2, offset, spec=spec):
                    library.call(spec, [x, p, code] + ops._scale_inputs(absmax, absmax2, code2) + [None], [out],
                                 [m, n, k], [offset])
                    return out
                times[w] = device_us(call, kargs)
            best = min(times, key=times.get)
            bf16 = device_us(lambda w: torch.nn.functional.linear(x, w), [(w,) for w in weights])
            lines.append(f"| {n}x{k} | {m} | {bf16:.1f} | " + " | ".join(f"{times[w]:.1f}" for w in args.warps)
                         + f" | gw={best} | {nbytes / (times[best] * 1e-6) / 1e9:.0f} | {bf16 / times[best]:.2f}x |")
        del weights, quant, kargs
    text = "\n".join(lines)
    print(text)
    if args.out_copy:
        args.out_copy.write_text(text + "\n")


if __name__ == "__main__":
    main()
