#!/usr/bin/env python3
"""Compile every CUDA kernel template for each target, and optionally check them on a GPU.

    python3 scripts/check_cuda_compile.py                      # sm75, sm80, sm90: build + ptxas report
    python3 scripts/check_cuda_compile.py --targets sm86 --no-ptxas
    python3 scripts/check_cuda_compile.py --verify --bench     # on a CUDA machine: numerics + speed
    python3 scripts/check_cuda_compile.py --verify --ptx-targets sm75,sm80   # older paths, via PTX JIT

Build: for each target, one library with every op (f16 and bf16, plus f32 for the quantize /
dequantize ops; nf4 and fp4 at blocksize 64, plus a few blocksize-4096 specs), built through the real
path (kbitc.compiler.codegen.render_library + kbitc.runtime.build.build_library) into a temporary
cache, timed. ptxas: each rendered .cu is also compiled on its own with `-Xptxas -v` to list
compiler warnings, registers and spills per kernel (build_library keeps the compiler output only
on failure). --verify compares every op against kbitc.quant (the oracle) on the local GPU:
bit-exact for quantize / dequantize / int8_quant, a relative-error bound for the linear ops, plus a
CUDA-graph capture; --ptx-targets also verifies older targets' code paths (e.g. sm75's m16n8k8 and
SIMT bf16 paths) built as PTX that the driver JIT-compiles for the local GPU. --bench times the
M = 1 and 8 linear_4bit GEMV (weights cycled through > L2, launches in a CUDA graph) against the
device copy bandwidth, and the M = 512 / 4096 GEMM against torch's f16 matmul.
Exit status 1 if anything fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kbitc.compiler.codegen import render_library
from kbitc.runtime.build import build_library
from kbitc.runtime.kernel_spec import CUDA_TARGETS, KernelSpec

QUANT_OPS = ("quantize_4bit", "dequantize_4bit")
# linear_4bit tuning variants that --bench compares (KernelSpec.config; see linear_4bit.cu.j2)
BENCH_CONFIGS = ((), (("gw", 4),), (("gw", 4), ("gb", 8)), (("gb", 4),))
BLOCKWISE_OPS = ("quantize_blockwise", "dequantize_blockwise")


def default_specs(target: str) -> list[KernelSpec]:
    specs = []
    for dtype in ("f16", "bf16", "f32"):
        for qt in ("nf4", "fp4"):
            specs += [KernelSpec(op, target, dtype, qt, 64) for op in QUANT_OPS]
            if dtype != "f32":
                specs.append(KernelSpec("linear_4bit", target, dtype, qt, 64))
        specs += [KernelSpec(op, target, dtype, "", 64) for op in BLOCKWISE_OPS]
        specs.append(KernelSpec("int8_quant", target, dtype))
        if dtype != "f32":
            specs.append(KernelSpec("int8_linear", target, dtype))
    specs += [  # the largest blocksize: one block per warp loops 16 times, scales per 4096 elements
        KernelSpec("linear_4bit", target, "f16", "nf4", 4096),
        KernelSpec("dequantize_4bit", target, "bf16", "nf4", 4096),
        KernelSpec("quantize_4bit", target, "bf16", "fp4", 4096),
        KernelSpec("quantize_blockwise", target, "f32", "", 4096),
    ]
    for dtype in ("f16", "bf16", "f32"):  # backward (grad w.r.t. the input) of the quantized linears
        specs += [KernelSpec("linear_4bit_grad_input", target, dtype, "nf4", 64),
                  KernelSpec("int8_linear_grad_input", target, dtype)]
    specs.append(KernelSpec("linear_4bit_grad_input", target, "bf16", "fp4", 4096))
    return specs


# ---- build + ptxas -------------------------------------------------------------------------------

def build(target: str, specs: list[KernelSpec], ptx: bool = False):
    """(seconds, path, library) of the built library. ptx: embed PTX only (CUDA_ARCHITECTURES
    NN-virtual), so that a newer GPU JIT-compiles this target's code paths and can run them."""
    lib = render_library(specs)
    sources = dict(lib.sources)
    if ptx:
        sources["CMakeLists.txt"] = sources["CMakeLists.txt"].replace("-real", "-virtual")
    start = time.perf_counter()
    path = build_library(lib.module_name, sources, True, [s.name for s in lib.specs])
    return time.perf_counter() - start, path, lib


_PTXAS_FUNC = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("cu++filt") or shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def ptxas_report(target: str, specs: list[KernelSpec], jobs: int) -> tuple[list[str], list[str]]:
    """Compile each kernel source alone with -Xptxas -v. Returns (problems, per-kernel info lines)."""
    lib = render_library(specs)
    arch = target.removeprefix("sm")
    # sm90 builds as sm_90a (wgmma), as the library's CMakeLists does
    gencode = "-gencode=arch=compute_90a,code=sm_90a" if arch == "90" else f"-arch=sm_{arch}"
    problems, info = [], []
    with tempfile.TemporaryDirectory(prefix="kbitc-ptxas-") as tmp:
        for name, text in lib.sources.items():
            (Path(tmp) / name).write_text(text)
        kernels = [n for n in lib.sources if n.endswith(".cu")]

        def compile_one(name: str) -> tuple[str, int, str]:
            cmd = ["nvcc", gencode, "-std=c++17", "-O3", "-lineinfo", "-c", name, "-o", os.devnull,
                   "-Xptxas", "-v", "-Xptxas", "-warn-spills", "-Xptxas", "-warn-lmem-usage",
                   "-Xcompiler", "-Wall", "-I."]
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            return name, proc.returncode, proc.stdout + proc.stderr

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(compile_one, kernels))
    for name, rc, log in results:
        if rc != 0:
            problems.append(f"{name}: nvcc failed\n{log}")
            continue
        func = None
        rows = []
        for line in log.splitlines():
            if "ptxas info" in line or "bytes gmem" in line or "bytes stack frame" in line:
                m = _PTXAS_FUNC.search(line)
                if m:
                    func = m.group(1)
                m = _PTXAS_SPILL.search(line)
                if m and func:
                    stack = _PTXAS_STACK.search(line)
                    rows.append([func, None, int(m.group(1)), int(m.group(2)), int(stack.group(1)) if stack else 0])
                m = _PTXAS_REGS.search(line)
                if m and rows and rows[-1][0] == func:
                    rows[-1][1] = int(m.group(1))
            elif line.strip():
                problems.append(f"{name}: {line.strip()}")
        names = _demangle([r[0] for r in rows])
        for func, regs, spill_st, spill_ld, stack in rows:
            short = names[func].replace("(anonymous namespace)::", "").removeprefix("void ")
            short = re.sub(r"\(.*", "", short)
            info.append(f"{name.removesuffix('.cu'):44s} {short:44s} regs {regs!s:>4} stack {stack:4d} "
                        f"spill st/ld {spill_st}/{spill_ld}")
            if spill_st or spill_ld:
                problems.append(f"{name}: {short} spills {spill_st}/{spill_ld} bytes")
    return problems, info


# ---- GPU checks --------------------------------------------------------------------------------

def device_target() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    cc = major * 10 + minor
    usable = [t for t in CUDA_TARGETS if int(t.removeprefix("sm")) <= cc]
    if not usable:
        raise SystemExit(f"GPU compute capability {major}.{minor} is below every kbitc target")
    exact = f"sm{cc}"
    return exact if exact in CUDA_TARGETS else usable[-1]


class Checker:
    def __init__(self, target: str, ptx: bool = False, bench: bool = False):
        import torch

        from kbitc.runtime.library import KernelLibrary

        self.torch = torch
        self.target = target
        self.specs = default_specs(target) + [KernelSpec("linear_4bit", target, "f32", "nf4", 64)]
        if bench:
            self.specs += [KernelSpec("linear_4bit", target, dt, "nf4", 64, cfg)
                           for dt in ("f16", "bf16") for cfg in BENCH_CONFIGS if cfg]
        seconds, path, lib = build(target, self.specs, ptx)
        how = " as PTX (JIT-compiled for this GPU)" if ptx else ""
        print(f"[verify] built {len(self.specs)} kernels for {target}{how} in {seconds:.1f} s")
        self.lib = KernelLibrary(lib.module_name, path, lib.specs)
        self.failures: list[str] = []
        self.passed = 0
        self.gen = torch.Generator(device="cuda").manual_seed(0)

    def spec(self, op, dtype, qt="", bs=0) -> KernelSpec:
        return KernelSpec(op, self.target, dtype, qt, bs)

    def randn(self, *shape, dtype):
        return self.torch.randn(*shape, generator=self.gen, device="cuda", dtype=self.torch.float32).to(dtype)

    def check(self, ok: bool, what: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)
            print(f"  FAIL {what}")

    @staticmethod
    def bits(t):
        import torch

        return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])

    def same_bits(self, a, b) -> bool:
        return a.shape == b.shape and bool((self.bits(a.cpu()) == self.bits(b.cpu())).all())

    # -- 4-bit ---------------------------------------------------------------------------------
    def quantize_4bit(self):
        from kbitc.runtime.quant.codebooks import encoder_4bit
        from kbitc.quant import quantize_4bit

        torch = self.torch
        for dtype, tdt in (("f16", torch.float16), ("bf16", torch.bfloat16), ("f32", torch.float32)):
            for qt in ("nf4", "fp4"):
                enc = encoder_4bit(qt)
                mid, order = enc.midpoints.cuda(), enc.order.cuda()
                sizes = ((64, 64 * 37), (64, 64 * 37 + 33), (64, 1), (64, 7), (64, 64 * 5 + 1), (4096, 4096 * 3 + 5))
                for bs, n in sizes:
                    spec = self.spec("quantize_4bit", dtype, qt, bs)
                    if spec not in self.specs:
                        continue
                    x = self.randn(n, dtype=tdt)
                    if n > 200:
                        x[:64] = 0  # an all-zero block
                        x[64:128] *= 1e-30  # tiny values
                    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device="cuda")
                    absmax = torch.empty(-(-n // bs), dtype=torch.float32, device="cuda")
                    self.lib.call(spec, [x, mid, order], [packed, absmax], [n])
                    ref_packed, state = quantize_4bit(x.cpu(), qt, bs, double_quant=False)
                    self.check(self.same_bits(packed, ref_packed) and self.same_bits(absmax, state.absmax),
                               f"{spec.name} n={n}")

    def dequantize_4bit(self):
        from kbitc.quant import dequantize_4bit, quantize_4bit

        torch = self.torch
        for dtype, tdt in (("f16", torch.float16), ("bf16", torch.bfloat16), ("f32", torch.float32)):
            for qt in ("nf4", "fp4"):
                for bs, n, dq in ((64, 64 * 300 + 17, False), (64, 64 * 300 + 17, True), (64, 5, True),
                                  (4096, 4096 * 2 + 100, True)):
                    spec = self.spec("dequantize_4bit", dtype, qt, bs)
                    if spec not in self.specs:
                        continue
                    w = self.randn(n, dtype=tdt).cpu()
                    packed, state = quantize_4bit(w, qt, bs, double_quant=dq)
                    ref = dequantize_4bit(packed, state)
                    out = torch.empty(n, dtype=tdt, device="cuda")
                    self.lib.call(spec, self._weight_inputs(packed, state), [out], [n], [self._offset(state)])
                    self.check(self.same_bits(out, ref), f"{spec.name} n={n} double_quant={dq}")

    def _weight_inputs(self, packed, state):
        code = state.code.float().cuda()
        if state.nested is None:
            return [packed.cuda(), code, state.absmax.cuda(), None, None, None]
        return [packed.cuda(), code, None, state.absmax.cuda(), state.nested.absmax2.cuda(),
                state.nested.code.cuda()]

    @staticmethod
    def _offset(state) -> float:
        return state.nested.offset if state.nested is not None else 0.0

    def linear_4bit(self):
        from kbitc.quant import dequantize_4bit, quantize_4bit

        torch = self.torch
        shapes = [(1, 256, 4096), (3, 100, 4096), (8, 72, 512), (1, 64, 96), (2, 40, 160), (5, 33, 100),
                  (1, 17, 63), (7, 9, 1), (9, 130, 256), (64, 256, 1024), (100, 200, 320), (33, 64, 63),
                  (256, 512, 4096), (130, 1000, 2048)]
        dtypes = (("f16", torch.float16, 2e-3), ("bf16", torch.bfloat16, 1.6e-2), ("f32", torch.float32, 1e-5))
        for i, (m, n, k) in enumerate(shapes):
            for dtype, tdt, tol in dtypes:
                for qt, bs in (("nf4", 64), ("fp4", 64), ("nf4", 4096)):
                    spec = self.spec("linear_4bit", dtype, qt, bs)
                    if spec not in self.specs:
                        continue
                    dq, with_bias, misaligned = i % 2 == 0, i % 3 != 0, (i % 4 == 1 and k % 32 == 0)
                    w = self.randn(n, k, dtype=tdt).cpu()
                    packed, state = quantize_4bit(w, qt, bs, double_quant=dq)
                    w_deq = dequantize_4bit(packed, state).cuda().float()
                    x = self.randn(m, k, dtype=tdt)
                    if misaligned:  # same values at an address that is not 16-byte aligned: general path
                        buf = torch.empty(m * k + 1, dtype=tdt, device="cuda")
                        buf[1:] = x.reshape(-1)
                        x = buf[1:].view(m, k)
                    bias = self.randn(n, dtype=tdt) if with_bias else None
                    ref = x.float() @ w_deq.t() + (bias.float() if bias is not None else 0)
                    out = torch.empty(m, n, dtype=tdt, device="cuda")
                    self.lib.call(spec, [x] + self._weight_inputs(packed, state)[:6] + [bias], [out], [m, n, k],
                                  [self._offset(state)])
                    err = ((out.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
                    self.check(err <= tol, f"{spec.name} m={m} n={n} k={k} dq={dq} bias={with_bias} "
                                           f"misaligned={misaligned}: rel err {err:.2e} > {tol:.0e}")

    # -- 8-bit block-wise ------------------------------------------------------------------------
    def blockwise(self):
        from kbitc.runtime.quant.codebooks import dynamic_map, encoder_dynamic
        from kbitc.quant import dequantize_blockwise, quantize_blockwise

        torch = self.torch
        mid = encoder_dynamic(True).midpoints.cuda()
        code = dynamic_map(True).cuda()
        for dtype, tdt in (("f16", torch.float16), ("bf16", torch.bfloat16), ("f32", torch.float32)):
            for bs, n in ((64, 64 * 100), (64, 64 * 100 + 13), (64, 3), (4096, 4096 * 2 + 7)):
                spec = self.spec("quantize_blockwise", dtype, "", bs)
                if spec not in self.specs:
                    continue
                x = self.randn(n, dtype=tdt)
                q = torch.empty(n, dtype=torch.uint8, device="cuda")
                absmax = torch.empty(-(-n // bs), dtype=torch.float32, device="cuda")
                self.lib.call(spec, [x, mid], [q, absmax], [n])
                ref_q, ref_absmax = quantize_blockwise(x.cpu(), bs)
                self.check(self.same_bits(q, ref_q) and self.same_bits(absmax, ref_absmax), f"{spec.name} n={n}")
                spec = self.spec("dequantize_blockwise", dtype, "", bs)
                if spec in self.specs:
                    out = torch.empty(n, dtype=tdt, device="cuda")
                    self.lib.call(spec, [ref_q.cuda(), code, ref_absmax.cuda()], [out], [n])
                    ref = dequantize_blockwise(ref_q, ref_absmax, bs, dtype=tdt)
                    self.check(self.same_bits(out, ref), f"{spec.name} n={n}")

    # -- int8 ------------------------------------------------------------------------------------
    def _int8_input(self, rows, cols, tdt, outliers: bool):
        x = self.randn(rows, cols, dtype=self.torch.float32)
        if outliers and cols > 3:
            x[rows // 2, 1] = 9.0
            x[0, cols - 2] = -12.0
            x[:, cols // 3] *= 4.0
        return x.to(tdt)

    def int8_quant(self):
        from kbitc.quant import int8_quantize_activations

        torch = self.torch
        for dtype, tdt in (("f16", torch.float16), ("bf16", torch.bfloat16), ("f32", torch.float32)):
            spec = self.spec("int8_quant", dtype)
            for rows, cols in ((1, 4096), (7, 1000), (33, 64), (2, 3)):
                for t in (0.0, 6.0, 3.1):
                    x = self._int8_input(rows, cols, tdt, t > 0)
                    x[rows - 1] = 0  # an all-zero row
                    codes = torch.empty(rows, cols, dtype=torch.int8, device="cuda")
                    rowmax = torch.empty(rows, dtype=torch.float32, device="cuda")
                    mask = torch.full((cols,), 7, dtype=torch.uint8, device="cuda")
                    self.lib.call(spec, [x], [codes, rowmax, mask], [rows, cols], [t])
                    rc, rr, rm = int8_quantize_activations(x.cpu(), t)
                    ok = (self.same_bits(codes, rc) and self.same_bits(rowmax, rr)
                          and self.same_bits(mask, rm.to(torch.uint8)))
                    self.check(ok, f"{spec.name} rows={rows} cols={cols} t={t}")

    def _int8_call(self, spec, x, wc, ws, bias, t):
        torch = self.torch
        m, k = x.shape
        out = torch.empty(m, wc.shape[0], dtype=x.dtype, device="cuda")
        ws_codes = torch.empty(m, k, dtype=torch.int8, device="cuda")
        ws_rowmax = torch.empty(m, dtype=torch.float32, device="cuda")
        ws_mask = torch.empty(k, dtype=torch.uint8, device="cuda")
        self.lib.call(spec, [x, wc, ws, bias], [out, ws_codes, ws_rowmax, ws_mask], [m, wc.shape[0], k], [t])
        return out

    def int8_linear(self):
        from kbitc.quant import int8_linear, int8_vectorwise_quant

        torch = self.torch
        shapes = [(1, 256, 4096), (4, 100, 1000), (8, 64, 64), (9, 70, 128), (64, 256, 1024), (100, 130, 200),
                  (3, 5, 7)]
        for dtype, tdt, tol in (("f16", torch.float16, 3e-3), ("bf16", torch.bfloat16, 1.6e-2)):
            spec = self.spec("int8_linear", dtype)
            for i, (m, n, k) in enumerate(shapes):
                for t in (0.0, 6.0):
                    wc, ws = int8_vectorwise_quant(self.randn(n, k, dtype=torch.float32))
                    wc, ws = wc.cuda(), ws.cuda()
                    x = self._int8_input(m, k, tdt, t > 0)
                    bias = self.randn(n, dtype=tdt) if i % 2 else None
                    out = self._int8_call(spec, x, wc, ws, bias, t)
                    ref = int8_linear(x.cpu(), wc.cpu(), ws.cpu(), None if bias is None else bias.cpu(), t).float()
                    err = ((out.float().cpu() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
                    self.check(err <= tol, f"{spec.name} m={m} n={n} k={k} t={t}: rel err {err:.2e} > {tol:.0e}")

    # -- CUDA graphs -------------------------------------------------------------------------------
    def graphs(self):
        from kbitc.quant import int8_vectorwise_quant, quantize_4bit

        torch = self.torch
        spec = self.spec("linear_4bit", "bf16", "nf4", 64)
        packed, state = quantize_4bit(self.randn(512, 1024, dtype=torch.bfloat16).cpu(), "nf4", 64)
        inputs = self._weight_inputs(packed, state)
        for m in (1, 64):
            x = self.randn(m, 1024, dtype=torch.bfloat16)
            out = torch.empty(m, 512, dtype=torch.bfloat16, device="cuda")
            eager = torch.empty_like(out)
            args = ([x] + inputs + [None], [m, 512, 1024], [state.nested.offset])
            self.lib.call(spec, args[0], [eager], *args[1:])
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up on a side stream, as torch.cuda.graph wants
                self.lib.call(spec, args[0], [out], *args[1:])
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            out.zero_()
            with torch.cuda.graph(graph):
                self.lib.call(spec, args[0], [out], *args[1:])
            graph.replay()
            torch.cuda.synchronize()
            self.check(torch.equal(out, eager), f"{spec.name} m={m}: CUDA graph replay differs from eager")

        spec = self.spec("int8_linear", "f16")
        wc, ws = int8_vectorwise_quant(self.randn(256, 512, dtype=torch.float32))
        for m in (1, 40):
            x = self._int8_input(m, 512, torch.float16, True)
            outs = [torch.empty(m, 256, dtype=torch.float16, device="cuda"),
                    torch.empty(m, 512, dtype=torch.int8, device="cuda"),
                    torch.empty(m, dtype=torch.float32, device="cuda"),
                    torch.empty(512, dtype=torch.uint8, device="cuda")]
            eager = self._int8_call(spec, x, wc, ws, None, 6.0)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.lib.call(spec, [x, wc, ws, None], outs, [m, 256, 512], [6.0])
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.lib.call(spec, [x, wc, ws, None], outs, [m, 256, 512], [6.0])
            outs[0].zero_()
            graph.replay()
            torch.cuda.synchronize()
            self.check(torch.equal(outs[0], eager), f"{spec.name} m={m}: CUDA graph replay differs from eager")

    def run(self) -> bool:
        for test in (self.quantize_4bit, self.dequantize_4bit, self.blockwise, self.int8_quant, self.linear_4bit,
                     self.int8_linear, self.graphs):
            before = len(self.failures)
            test()
            self.torch.cuda.synchronize()
            print(f"[verify] {test.__name__}: {'ok' if len(self.failures) == before else 'FAILED'}")
        print(f"[verify] {self.passed} checks passed, {len(self.failures)} failed")
        return not self.failures

    # -- speed -----------------------------------------------------------------------------------
    def bench(self) -> None:
        from kbitc.quant import quantize_4bit

        torch = self.torch
        buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(buf)
        copy_s = self._time(lambda: dst.copy_(buf), 20)
        copy_bw = 2 * buf.numel() / copy_s
        print(f"[bench] device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
        del buf, dst
        for (n, k), dtype, tdt in (((8192, 8192), "f16", torch.float16), ((14336, 4096), "bf16", torch.bfloat16),
                                   ((4096, 14336), "f16", torch.float16), ((4096, 4096), "f16", torch.float16)):
            packed, state = quantize_4bit(torch.randn(n, k, dtype=tdt, device="cuda"), "nf4", 64)
            layers = max(2, -(-256 * 2**20 // packed.numel()))  # cycle > 256 MB so L2 (50 MB) never holds them
            weights = [(packed.clone(), state.absmax.clone()) for _ in range(layers)]
            inputs = self._weight_inputs(packed, state)
            for m, cfg in [(1, c) for c in BENCH_CONFIGS] + [(8, ())]:
                spec = KernelSpec("linear_4bit", self.target, dtype, "nf4", 64, cfg)
                x = torch.randn(m, k, dtype=tdt, device="cuda")
                out = torch.empty(m, n, dtype=tdt, device="cuda")

                def call(i, m=m, x=x, out=out):
                    p, a = weights[i % layers]
                    self.lib.call(spec, [x, p] + [inputs[1], None, a] + inputs[4:] + [None], [out], [m, n, k],
                                  [state.nested.offset])

                sec = self._time_graph(call, 2 * layers)
                moved = packed.numel() + state.absmax.numel() + (m * k + m * n) * 2
                bw = moved / sec
                print(f"[bench] {spec.name} m={m} n={n} k={k}: {sec * 1e6:7.1f} us  {bw / 1e9:6.0f} GB/s "
                      f"= {100 * bw / copy_bw:5.1f}% of copy")
        for m, n, k in ((512, 4096, 4096), (4096, 4096, 4096)):
            spec = self.spec("linear_4bit", "f16", "nf4", 64)
            packed, state = quantize_4bit(torch.randn(n, k, dtype=torch.float16, device="cuda"), "nf4", 64)
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            out = torch.empty(m, n, dtype=torch.float16, device="cuda")
            inputs = self._weight_inputs(packed, state)
            sec = self._time_graph(lambda i: self.lib.call(spec, [x] + inputs + [None], [out], [m, n, k],
                                                           [state.nested.offset]), 10)
            w16 = torch.randn(n, k, dtype=torch.float16, device="cuda")
            ref = self._time(lambda: x @ w16.t(), 20)
            print(f"[bench] {spec.name} m={m} n={n} k={k}: {2 * m * n * k / sec / 1e12:6.1f} TFLOP/s "
                  f"(torch f16 matmul {2 * m * n * k / ref / 1e12:6.1f})")

    def _time_graph(self, fn, calls: int) -> float:
        """Seconds per call of fn(i), i = 0..calls-1 captured in one CUDA graph: no launch overhead."""
        torch = self.torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(calls):
                fn(i)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(i)
        return self._time(graph.replay, 20) / calls

    def _time(self, fn, iters: int) -> float:
        torch = self.torch
        for _ in range(3):
            fn()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3 / iters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", help="comma-separated CUDA targets to build (default: sm75,sm80,sm90, "
                        "or none with --verify / --bench)")
    parser.add_argument("--no-ptxas", action="store_true", help="skip the per-file -Xptxas -v report")
    parser.add_argument("--ptxas-all", action="store_true", help="print registers/spills of every kernel")
    parser.add_argument("--verify", action="store_true", help="check numerics on the local GPU (its target)")
    parser.add_argument("--ptx-targets", help="with --verify: also verify these (older) targets' code paths, "
                        "built as PTX and JIT-compiled for the local GPU, e.g. sm75,sm80")
    parser.add_argument("--bench", action="store_true", help="time linear_4bit on the local GPU")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--cache-dir", help="KBITC_CACHE_DIR to build into (default: a temporary folder)")
    args = parser.parse_args()

    tmp = None
    if args.cache_dir:
        os.environ["KBITC_CACHE_DIR"] = args.cache_dir
    else:
        tmp = tempfile.mkdtemp(prefix="kbitc-cuda-check-")
        os.environ["KBITC_CACHE_DIR"] = tmp
    ok = True
    try:
        gpu_run = args.verify or args.bench
        targets = [t.strip() for t in (args.targets or ("" if gpu_run else "sm75,sm80,sm90")).split(",") if t.strip()]
        if targets:
            for target in targets:
                if target not in CUDA_TARGETS:
                    print(f"unknown target {target}; expected one of {CUDA_TARGETS}")
                    return 2
                specs = default_specs(target)
                try:
                    seconds, _, _ = build(target, specs)
                    print(f"[build] {target}: {len(specs)} kernels built in {seconds:.1f} s")
                except Exception as exc:  # BuildError carries the compiler output
                    ok = False
                    print(f"[build] {target}: FAILED\n{exc}")
                    continue
                if not args.no_ptxas:
                    start = time.perf_counter()
                    problems, info = ptxas_report(target, specs, args.jobs)
                    print(f"[ptxas] {target}: {len(problems)} warning(s) ({time.perf_counter() - start:.1f} s)")
                    for line in problems:
                        print("   ", line)
                    for line in info:
                        if args.ptxas_all or "linear" in line.split()[0]:
                            print("   ", line)
                    ok = ok and not problems
        if gpu_run:
            native = Checker(device_target(), bench=args.bench)
            if args.verify:
                ok = native.run() and ok
                for target in [t.strip() for t in (args.ptx_targets or "").split(",") if t.strip()]:
                    ok = Checker(target, ptx=True).run() and ok
            if args.bench:
                native.bench()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
