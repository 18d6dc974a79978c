"""Kernel-vs-reference checks shared by the CPU and CUDA kernel tests.

Each check calls an op twice: through the dispatcher (the generated kernel) and through
runtime/reference.py (the oracle). Quantization ops must agree bit for bit; linear ops to within
the rounding of their output dtype (float32 accumulation in a different order: measured below).
"""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch

import kbitc.quant as kq
from kbitc.compiler.kernels import build_kernels
from kbitc.runtime import dispatch, ops, reference
from kbitc.runtime.kernel_spec import KernelSpec
from kbitc.runtime.reference import quant_state_args

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None,
                                reason="needs nvcc and cmake to compile CUDA kernels")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")

TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Output rounding: half an ulp of the dtype relative to the largest |output|, plus float32
# accumulation-order noise (~K * 2^-24 relative; measured max 3e-6 at K=4099 on CPU).
REL_TOL = {torch.float32: 2e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@contextlib.contextmanager
def only_kernels(specs):
    """Route ops to exactly these kernels (none: the reference) while inside; then restore the
    kernels that were registered before."""
    saved = dict(dispatch._REGISTRY)
    dispatch.unregister_all()
    try:
        if specs:
            build_kernels(list(specs))
        yield
    finally:
        dispatch.unregister_all()
        dispatch._REGISTRY.update(saved)


def grad_specs(target, dtypes, cases):
    """The backward kernels (input gradients) of the 4-bit cases and of int8, per dtype."""
    specs = []
    for dtype in dtypes:
        specs += [KernelSpec("linear_4bit_grad_input", target, dtype, qt, bs) for qt, bs in cases]
        specs.append(KernelSpec("int8_linear_grad_input", target, dtype))
    return specs


def assert_kernel_used(op: str, device, dtype, quant_type="", blocksize=0):
    assert dispatch.lookup(op, torch.device(device), dtype, quant_type, blocksize) is not None, \
        f"no kernel registered for {op} {dtype} {quant_type} {blocksize}"


def assert_close_to(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    scale = float(ref.float().abs().max()) or 1.0
    err = float((out.double() - ref.double()).abs().max())
    assert err <= REL_TOL[dtype] * scale, f"max error {err:.3g} > {REL_TOL[dtype]:.3g} * {scale:.3g}"


def check_dequantize_4bit(device, dtype, quant_type, blocksize, rng):
    for shape, dq in [((1,), False), ((7, 3), True), ((33, blocksize + 5), True), ((64, 2 * blocksize), False)]:
        w = torch.randn(shape, generator=rng) * 3
        packed, state = kq.quantize_4bit(w, quant_type, blocksize, double_quant=dq)
        args = [t.to(device) if isinstance(t, torch.Tensor) else t for t in quant_state_args(state)]
        out = ops.dequantize_4bit(packed.to(device), *args, quant_type, blocksize, list(shape), dtype)
        ref = reference.dequantize_4bit(packed, *quant_state_args(state), blocksize, shape, dtype)
        assert torch.equal(out.cpu(), ref), (shape, dq)


def check_linear_4bit(device, dtype, quant_type, blocksize, rng, ms=(1, 3, 17, 64)):
    for n, k in [(33, 2 * blocksize), (40, blocksize + 36), (24, 77), (48, 3 * blocksize + 32)]:
        w = torch.randn(n, k, generator=rng) * 0.05
        packed, state = kq.quantize_4bit(w, quant_type, blocksize, double_quant=(k % 2 == 0))
        qargs = quant_state_args(state)
        for m in ms:
            x = torch.randn(m, k, generator=rng).to(dtype)
            bias = torch.randn(n, generator=rng).to(dtype) if m % 2 else None
            dev = [t.to(device) if isinstance(t, torch.Tensor) else t for t in qargs]
            out = ops.linear_4bit(x.to(device), packed.to(device), *dev,
                                  None if bias is None else bias.to(device), quant_type, blocksize, n)
            ref = reference.linear_4bit(x, packed, *qargs, bias, blocksize, n)
            assert_close_to(out.cpu(), ref, dtype)


def check_quantize_4bit(device, dtype, quant_type, blocksize, rng):
    """Bit-exact against the reference. CUDA takes a fast path for whole blocks (blocksize <= 256,
    aligned) and the general one for a partial last block and unaligned inputs: shapes cover both,
    an all-zero block (absmax 0) and a large outlier."""
    for shape in [(1,), (5,), (3, blocksize + 1), (257, 2 * blocksize), (4, 5 * blocksize)]:
        x = (torch.randn(shape, generator=rng) * torch.rand(shape, generator=rng) * 4).to(dtype)
        x.view(-1)[0] = 0.0
        if x.numel() >= 4 * blocksize:
            x.view(-1)[blocksize: 2 * blocksize] = 0.0
            x.view(-1)[3 * blocksize + 7] = 3000.0
        views = [x, x.view(-1)[1:]] if x.numel() > blocksize else [x]  # the slice starts mid-vector
        for view in views:
            code = kq.code_4bit(quant_type)
            packed, absmax = ops.quantize_4bit(view.to(device), code.to(device), quant_type, blocksize)
            ref_packed, ref_absmax = reference.quantize_4bit(view, code, blocksize)
            assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax), view.shape


def check_blockwise(device, dtype, blocksize, rng):
    code = kq.dynamic_map(True)
    for shape in [(1,), (blocksize * 3 + 17,), (8, blocksize)]:
        x = (torch.randn(shape, generator=rng) * 5).to(dtype)
        q, absmax = ops.quantize_blockwise(x.to(device), code.to(device), blocksize)
        ref_q, ref_absmax = reference.quantize_blockwise(x, code, blocksize)
        assert torch.equal(q.cpu(), ref_q) and torch.equal(absmax.cpu(), ref_absmax), shape
        out = ops.dequantize_blockwise(q, code.to(device), absmax, blocksize, dtype)
        assert torch.equal(out.cpu(), reference.dequantize_blockwise(ref_q, code, ref_absmax, blocksize, dtype))


def check_int8(device, dtype, rng, ms=(1, 3, 17, 64), ks=(130, 528)):
    """K = 130 takes the general kernels; K = 528 (a multiple of 16, outlier columns in three
    256-column chunks) takes, on CUDA, the fused GEMV for M <= 8 and cuBLASLt + the epilogue for M > 16."""
    for k in ks:
        for m in ms:
            x = torch.randn(m, k, generator=rng)
            x[0, 5] = 25.0  # an outlier column
            x[m // 2, 99] = -8.0  # another
            x[m - 1, k - 3] = 7.0  # one in the last column chunk
            if m > 3:
                x[2] = 0.0  # an all-zero row
            x = x.to(dtype)
            codes, rowmax, mask = ops.int8_quant(x.to(device), 6.0)
            r_codes, r_rowmax, r_mask = reference.int8_quant(x, 6.0)
            assert torch.equal(codes.cpu(), r_codes) and torch.equal(rowmax.cpu(), r_rowmax)
            assert torch.equal(mask.cpu(), r_mask)
            w, scb = kq.int8_vectorwise_quant(torch.randn(48, k, generator=rng))
            bias = torch.randn(48, generator=rng).to(dtype) if m % 2 else None
            out = ops.int8_linear(x.to(device), w.to(device), scb.to(device),
                                  None if bias is None else bias.to(device), 6.0)
            assert_close_to(out.cpu(), reference.int8_linear(x, w, scb, bias, 6.0), dtype)