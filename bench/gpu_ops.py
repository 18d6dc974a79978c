"""First GPU benchmark of every kbitc op vs torch bf16 (cuBLAS) and bitsandbytes, same process.

Run on a CUDA machine: python bench/gpu_ops.py [--quick]   (appends to bench/RESULTS.md)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import append_results  # noqa: E402
from gpu_timing import copy_ceiling_tbps, device_us, eager_us  # noqa: E402

import kbitc.quant as kq  # noqa: E402
from kbitc.compiler.kernels import all_specs, build_kernels  # noqa: E402
from kbitc.runtime import ops  # noqa: E402
from kbitc.runtime.kernel_spec import KernelSpec  # noqa: E402
from kbitc.runtime.reference import quant_state_args  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # (out, in)
MS = [1, 8, 32, 128, 2048]
ROTATE = 6  # weight copies: > 50 MB L2 for every shape


def _row(cells):
    return "| " + " | ".join(cells) + " |"


def bench_linear_4bit(bnb, shapes, ms, ceiling_tbps):
    rows = [_row(["out x in", "M", "bf16 dev µs", "kbitc dev µs", "bnb dev µs", "kbitc vs bf16",
                  "kbitc vs bnb", "bf16 eager µs", "kbitc eager µs", "bnb eager µs", "kbitc M=1 GB/s",
                  "share of copy ceiling"]),
            _row(["---"] * 12)]
    for n, k in shapes:
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(ROTATE)]
        quant = [kq.quantize_4bit(w, "nf4", 64, double_quant=True) for w in weights]
        kargs = [(p, *quant_state_args(s)) for p, s in quant]
        bnb_q = [bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                 for w in weights]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

            def kbitc_fn(p, code, absmax, absmax2, code2, offset):
                return ops.linear_4bit(x, p, code, absmax, absmax2, code2, offset, None, "nf4", 64, n)

            def bf16_fn(w):
                return torch.nn.functional.linear(x, w)

            def bnb_fn(p, st):
                return bnb.matmul_4bit(x, p.t(), quant_state=st)

            ref = bf16_fn(weights[0]).float()
            got = kbitc_fn(*kargs[0]).float()
            rel = float((got - ref).norm() / ref.norm())
            assert rel < 0.15, f"kbitc linear_4bit disagrees with bf16 by {rel:.3f}"
            t = {name: (device_us(fn, ins), eager_us(fn, ins)) for name, fn, ins in
                 [("bf16", bf16_fn, [(w,) for w in weights]), ("kbitc", kbitc_fn, kargs),
                  ("bnb", bnb_fn, bnb_q)]}
            packed_bytes = quant[0][0].numel() + quant[0][1].absmax.numel()
            gbps = packed_bytes / (t["kbitc"][0] * 1e-6) / 1e9 if m == 1 else float("nan")
            rows.append(_row([f"{n}x{k}", str(m), f"{t['bf16'][0]:.1f}", f"{t['kbitc'][0]:.1f}",
                              f"{t['bnb'][0]:.1f}", f"{t['bf16'][0] / t['kbitc'][0]:.2f}x",
                              f"{t['bnb'][0] / t['kbitc'][0]:.2f}x", f"{t['bf16'][1]:.1f}",
                              f"{t['kbitc'][1]:.1f}", f"{t['bnb'][1]:.1f}",
                              "" if m != 1 else f"{gbps:.0f}",
                              "" if m != 1 else f"{gbps / (ceiling_tbps * 1e3):.0%}"]))
    return "\n".join(rows)


def bench_int8(bnb, shapes, ms):
    rows = [_row(["out x in", "M", "bf16 dev µs", "kbitc dev µs", "bnb dev µs", "kbitc vs bf16",
                  "bf16 eager µs", "kbitc eager µs", "bnb eager µs", "kbitc rel err", "bnb rel err"]),
            _row(["---"] * 11)]
    for n, k in shapes:
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(ROTATE)]
        q = [kq.int8_vectorwise_quant(w) for w in weights]
        layers = []
        for w in weights:
            layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(w.half().cpu(), requires_grad=False, has_fp16_weights=False)
            layers.append(layer.cuda())
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cols = torch.randperm(k, device="cuda")[: max(1, k // 1000)]  # 0.1% outlier columns
            x[:, cols] = 8.0

            def kbitc_fn(w, s):
                return ops.int8_linear(x, w, s, None, 6.0)

            x16 = x.half()
            t = {name: (device_us(fn, ins), eager_us(fn, ins)) for name, fn, ins in
                 [("bf16", lambda w: torch.nn.functional.linear(x, w), [(w,) for w in weights]),
                  ("kbitc", kbitc_fn, q), ("bnb", lambda layer: layer(x16), [(la,) for la in layers])]}
            # output error vs float64 x @ w^T of the unquantized weight (same inputs for both)
            ref = x.double() @ weights[0].double().t()
            err = {name: float((out.double() - ref).norm() / ref.norm())
                   for name, out in [("kbitc", kbitc_fn(*q[0])), ("bnb", layers[0](x16))]}
            rows.append(_row([f"{n}x{k}", str(m), f"{t['bf16'][0]:.1f}", f"{t['kbitc'][0]:.1f}",
                              f"{t['bnb'][0]:.1f}", f"{t['bf16'][0] / t['kbitc'][0]:.2f}x",
                              f"{t['bf16'][1]:.1f}", f"{t['kbitc'][1]:.1f}", f"{t['bnb'][1]:.1f}",
                              f"{err['kbitc']:.4f}", f"{err['bnb']:.4f}"]))
    return "\n".join(rows)


def bench_quant_ops(bnb):
    w = [torch.randn(4096, 11008, device="cuda", dtype=torch.bfloat16) for _ in range(ROTATE)]
    code = kq.code_4bit("nf4").cuda()
    dmap = kq.dynamic_map(True).cuda()
    packed = [ops.quantize_4bit(t, code, "nf4", 64) for t in w]
    q8 = [ops.quantize_blockwise(t, dmap, 256) for t in w]

    def kbitc_nf4_dq(t):  # what compile does per weight: 4-bit codes, then the absmax 8-bit (DQ)
        packed, absmax = ops.quantize_4bit(t, code, "nf4", 64)
        offset = absmax.mean()
        return packed, ops.quantize_blockwise(absmax - offset, dmap, 256), offset

    cases = [
        ("quantize_4bit nf4 + DQ", kbitc_nf4_dq,
         lambda t: bnb.functional.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True),
         [(t,) for t in w]),
        ("quantize_4bit nf4 (no DQ)", lambda t: ops.quantize_4bit(t, code, "nf4", 64),
         lambda t: bnb.functional.quantize_4bit(t, blocksize=64, quant_type="nf4"), [(t,) for t in w]),
        ("dequantize_4bit nf4", lambda p, a: ops.dequantize_4bit(p, code, a, None, None, 0.0, "nf4", 64,
                                                                 [4096, 11008], torch.bfloat16),
         None, packed),
        ("quantize_blockwise 8-bit", lambda t: ops.quantize_blockwise(t, dmap, 256),
         lambda t: bnb.functional.quantize_blockwise(t, code=dmap, blocksize=256), [(t,) for t in w]),
        ("dequantize_blockwise 8-bit", lambda q, a: ops.dequantize_blockwise(q, dmap, a, 256, torch.bfloat16),
         None, q8),
        ("int8_quant (t=6)", lambda t: ops.int8_quant(t, 6.0),
         lambda t: bnb.functional.int8_vectorwise_quant(t.half(), 6.0), [(t,) for t in w]),
    ]
    rows = [_row(["op, 4096x11008 bf16", "kbitc dev µs", "bnb dev µs", "kbitc GB/s of input", "kbitc vs bnb"]),
            _row(["---"] * 5)]
    in_bytes = 4096 * 11008 * 2
    for name, kfn, bfn, ins in cases:
        kt = device_us(kfn, ins)
        bt = device_us(bfn, ins) if bfn is not None else float("nan")
        rows.append(_row([name, f"{kt:.1f}", "" if bfn is None else f"{bt:.1f}",
                          f"{in_bytes / (kt * 1e-6) / 1e9:.0f}", "" if bfn is None else f"{bt / kt:.2f}x"]))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="two shapes, three batch sizes")
    parser.add_argument("--only", choices=["linear_4bit", "int8", "quant"], help="one table only")
    args = parser.parse_args()
    import bitsandbytes as bnb

    major, minor = torch.cuda.get_device_capability()
    target = f"sm{major}{minor}"
    # + the f32 8-bit quantize: double quant encodes the float32 absmax (else the torch reference runs)
    build_kernels(all_specs(target, ("bf16", "f16"), quant_types=("nf4",))
                  + [KernelSpec("quantize_blockwise", target, "f32", "", 256)])
    shapes = SHAPES[:2] if args.quick else SHAPES
    ms = [1, 32, 2048] if args.quick else MS
    ceiling = copy_ceiling_tbps()
    header = (f"GPU {torch.cuda.get_device_name()} (copy ceiling measured {ceiling:.2f} TB/s), torch "
              f"{torch.__version__}, bitsandbytes {bnb.__version__}. Device time = sum of kernel time "
              "per call (torch.profiler); eager = back-to-back calls; weights rotated over 6 copies.")
    sections = {"linear_4bit": ("### 4-bit NF4+DQ linear, bf16 activations",
                                lambda: bench_linear_4bit(bnb, shapes, ms, ceiling)),
                "int8": ("### int8 linear, threshold 6, 0.1% outlier columns", lambda: bench_int8(bnb, shapes[:1], ms)),
                "quant": ("### quantize / dequantize ops", lambda: bench_quant_ops(bnb))}
    tables = [header]
    for name, (title, run) in sections.items():
        if args.only in (None, name):
            tables += [title, run()]
    append_results("GPU ops: first kbitc kernels vs cuBLAS bf16 and bitsandbytes",
                   "python bench/gpu_ops.py" + (" --quick" if args.quick else "")
                   + (f" --only {args.only}" if args.only else ""), "\n\n".join(tables))


if __name__ == "__main__":
    main()
