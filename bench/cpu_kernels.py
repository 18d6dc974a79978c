"""kbitc's generated CPU kernels vs bitsandbytes' CPU backend and torch, in one process.

4-bit linear 4096x4096 (NF4, blocksize 64, double-quantized absmax) at M = 1 and M = 32 against
bitsandbytes' eval-mode Linear4bit (compute_dtype float32) and torch.nn.functional.linear in
float32 and bfloat16, for every kbitc CPU target this machine runs (cpu_avx512_bf16 with bf16
activations is the vdpbf16ps kernel: codebook rounded to bf16, docs/kernel_abi.md); quantize_4bit
(NF4, blocksize 64) of a 4096x4096 float32 / bfloat16 tensor against
bitsandbytes.functional.quantize_4bit. The kernels are rendered, built (cached, see KBITC_CACHE_DIR)
and loaded exactly as the runtime does. Contenders are timed in interleaved rounds (median of round
medians, warm-up first) so that drift on a shared machine hits them alike.

Run: python bench/cpu_kernels.py [--rounds N] [--no-append]   (appends its table to bench/RESULTS.md)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # bnb's own torch.compile wrapper: time it eagerly

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import append_results, median_seconds  # noqa: E402

import kbitc.quant as kq  # noqa: E402
from kbitc.compiler.codegen import render_library  # noqa: E402
from kbitc.runtime.build import build_library  # noqa: E402
from kbitc.runtime.kernel_spec import KernelSpec  # noqa: E402
from kbitc.runtime.library import KernelLibrary  # noqa: E402
from kbitc.runtime.quant.codebooks import encoder_4bit, encoder_for  # noqa: E402

N = K = 4096
BLOCKSIZE = 64
TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def cpu_targets() -> list[str]:
    """The kbitc CPU targets this machine runs, widest first."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    targets = []
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"} <= flags:
        targets.append("cpu_avx512_bf16")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        targets.append("cpu_avx512")
    if {"avx2", "fma", "f16c"} <= flags:
        targets.append("cpu_avx2")
    return targets


def load_library(specs: list[KernelSpec]) -> KernelLibrary:
    rendered = render_library(specs)
    path = build_library(rendered.module_name, rendered.sources, False, [s.name for s in rendered.specs])
    return KernelLibrary(rendered.module_name, path, rendered.specs)


class Timer:
    """Times named contenders in interleaved rounds; the result is the median of round medians."""

    def __init__(self, rounds: int):
        self.rounds = rounds
        self.fns: dict[str, tuple] = {}

    def add(self, name: str, fn, repeats: int) -> None:
        self.fns[name] = (fn, repeats)

    def run(self) -> dict[str, float]:
        samples: dict[str, list[float]] = {name: [] for name in self.fns}
        for _ in range(self.rounds):
            for name, (fn, repeats) in self.fns.items():
                samples[name].append(median_seconds(fn, repeats=repeats, warmup=max(2, repeats // 5)))
        return {name: statistics.median(v) for name, v in samples.items()}


def linear_rows(libs: dict[str, KernelLibrary], rounds: int) -> list[str]:
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.02
    w_bf16 = w.bfloat16()
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                                     blocksize=BLOCKSIZE)
    layer = layer.to("cpu").eval()
    layer_bf16 = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                   quant_type="nf4")
    layer_bf16.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4",
                                          compress_statistics=True, blocksize=BLOCKSIZE)
    layer_bf16 = layer_bf16.to("cpu").eval()
    packed, state = kq.quantize_4bit(w, "nf4", BLOCKSIZE, double_quant=True)
    w_hat = kq.dequantize_4bit(packed, state).double()
    rows = []
    for m in (1, 32):
        x = torch.randn(m, K, generator=g)
        x_bf16 = x.bfloat16()
        timer = Timer(rounds)
        repeats = 100 if m == 1 else 10
        outs = {}
        timer.add("torch F.linear float32", lambda: torch.nn.functional.linear(x, w), repeats)
        timer.add("torch F.linear bfloat16", lambda: torch.nn.functional.linear(x_bf16, w_bf16), repeats)
        for key, label, bnb_layer, xin in [
                ("bnb", "bitsandbytes Linear4bit NF4 (eval)", layer, x),
                ("bnb bf16", "bitsandbytes Linear4bit NF4 (eval), bf16 activations", layer_bf16, x_bf16)]:
            def bnb_call(bnb_layer=bnb_layer, xin=xin):
                with torch.no_grad():
                    return bnb_layer(xin)

            outs[key] = bnb_call()
            timer.add(label, bnb_call, repeats)
        for target, lib in libs.items():
            for dtype in ("f32", "bf16"):
                spec = KernelSpec("linear_4bit", target, dtype, "nf4", BLOCKSIZE)
                xin = x if dtype == "f32" else x_bf16
                out = torch.empty(m, N, dtype=TORCH_DTYPES[dtype])
                inputs = [xin, packed, state.code, None, state.absmax, state.nested.absmax2, state.nested.code, None]

                def call(spec=spec, inputs=inputs, out=out, lib=lib, m=m):
                    lib.call(spec, inputs, [out], [m, N, K], [state.nested.offset])

                call()
                outs[spec.name] = out.float().clone()
                timer.add(f"kbitc {target} NF4, {dtype} activations", call, repeats)
        # validity: kbitc (f32) against the float64 product with the dequantized weight, and bnb and the
        # bf16 kernels (bf16 x; cpu_avx512_bf16 also rounds the codebook to bf16) within bf16 accuracy
        ref = x.double() @ w_hat.t()
        scale = float(ref.abs().max())
        for name, out in outs.items():
            err = float((out.double() - ref).abs().max()) / scale
            limit = 2e-5 if "f32" in name else 2e-2  # bnb and bf16 kernels compute in bfloat16
            assert err <= limit, f"{name}: relative error {err:.3g} vs the float64 reference: benchmark invalid"
        times = timer.run()
        t_bnb = times["bitsandbytes Linear4bit NF4 (eval)"]
        t_f32 = times["torch F.linear float32"]
        for name, t in times.items():
            rows.append(f"| linear {N}x{K}, M={m} | {name} | {t * 1e3:.3f} | {t_bnb / t:.2f}x | {t_f32 / t:.2f}x |")
    return rows


def quantize_rows(libs: dict[str, KernelLibrary], rounds: int) -> list[str]:
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(1)
    enc = encoder_4bit("nf4")
    dyn = kq.dynamic_map(True)
    enc8 = encoder_for(dyn)
    rows = []
    for dtype in ("f32", "bf16"):
        w = torch.randn(N, K, generator=g).to(TORCH_DTYPES[dtype])
        n = w.numel()
        timer = Timer(rounds)
        ref_packed, ref_state = kq.quantize_4bit(w, "nf4", BLOCKSIZE, double_quant=True)
        b_packed, _ = F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=False)
        assert torch.equal(ref_packed, b_packed.view(-1)), "kbitc.quant and bitsandbytes disagree: benchmark invalid"
        timer.add("bitsandbytes quantize_4bit", lambda: F.quantize_4bit(
            w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=False), 3)
        timer.add("bitsandbytes quantize_4bit + double quant", lambda: F.quantize_4bit(
            w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True), 3)
        for target, lib in libs.items():
            spec = KernelSpec("quantize_4bit", target, dtype, "nf4", BLOCKSIZE)
            nested = KernelSpec("quantize_blockwise", target, "f32", "", 256)
            packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
            absmax = torch.empty(-(-n // BLOCKSIZE))
            blocks = absmax.numel()
            q8 = torch.empty(blocks, dtype=torch.uint8)
            absmax2 = torch.empty(-(-blocks // 256))

            def quantize(spec=spec, packed=packed, absmax=absmax, lib=lib):
                lib.call(spec, [w, enc.midpoints, enc.order], [packed, absmax], [n])

            def quantize_dq(quantize=quantize, nested=nested, absmax=absmax, q8=q8, absmax2=absmax2, lib=lib):
                quantize()
                centered = absmax - absmax.mean()
                lib.call(nested, [centered, enc8.midpoints], [q8, absmax2], [blocks])

            quantize_dq()
            assert torch.equal(packed, ref_packed), f"{spec.name} disagrees with kbitc.quant: benchmark invalid"
            assert torch.equal(q8, ref_state.absmax), f"{nested.name} disagrees with kbitc.quant: benchmark invalid"
            timer.add(f"kbitc {target} quantize_4bit kernel", quantize, 10)
            timer.add(f"kbitc {target} quantize_4bit + double quant kernels", quantize_dq, 10)
        times = timer.run()
        t_bnb = times["bitsandbytes quantize_4bit"]
        t_bnb_dq = times["bitsandbytes quantize_4bit + double quant"]
        for name, t in times.items():
            base = t_bnb_dq if "double quant" in name else t_bnb
            rows.append(f"| quantize_4bit NF4/64 {N}x{K} {dtype} | {name} | {t * 1e3:.3f} | {base / t:.2f}x | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    parser.add_argument("--no-append", action="store_true", help="print the table only")
    args = parser.parse_args()
    targets = cpu_targets()
    if not targets:
        raise SystemExit("this CPU has neither AVX2+FMA+F16C nor AVX-512: no kbitc CPU target runs here")
    libs = {}
    for target in targets:
        specs = [KernelSpec("linear_4bit", target, dt, "nf4", BLOCKSIZE) for dt in ("f32", "bf16")]
        specs += [KernelSpec("quantize_4bit", target, dt, "nf4", BLOCKSIZE) for dt in ("f32", "bf16")]
        specs.append(KernelSpec("quantize_blockwise", target, "f32", "", 256))
        libs[target] = load_library(specs)
    header = ["| op | implementation | median ms | vs bitsandbytes | vs torch fp32 |", "|---|---|---|---|---|"]
    rows = linear_rows(libs, args.rounds) + quantize_rows(libs, args.rounds)
    table = "\n".join(header + rows)
    table += ("\n\nLinear: bitsandbytes = eval-mode `bnb.nn.Linear4bit` (NF4, compress_statistics=True, "
              "compute_dtype float32 with float32 x, and compute_dtype bfloat16 with bfloat16 x, `torch.no_grad()`; the "
              "\"vs bnb\" column is against the float32 one); kbitc = the generated `linear_4bit` kernel on the "
              "same double-quantized NF4 weight (float32 accumulation; cpu_avx512_bf16 with bf16 activations: "
              "bf16-rounded codebook times bf16 x by vdpbf16ps, float32 block sums and scales). Quantize: "
              "\"vs bitsandbytes\" compares with bitsandbytes' quantize_4bit without / with compress_statistics respectively; kbitc's "
              "double quant = the quantize_blockwise kernel on absmax - mean(absmax). Median of "
              f"{args.rounds} interleaved round medians.")
    if args.no_append:
        print(table)
    else:
        append_results("Generated CPU kernels vs bitsandbytes and torch", "python bench/cpu_kernels.py", table)


if __name__ == "__main__":
    main()
