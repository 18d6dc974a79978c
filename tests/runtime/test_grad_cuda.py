"""CUDA backward kernels (linear_4bit_grad_input, int8_linear_grad_input): compiled with nvcc for
sm75/sm80/sm90 everywhere (no GPU needed), checked against float64 math through the dequantized
weights and against the reference op on a real GPU (skipped without one)."""

import pytest
import torch

import kbitc.quant as kq
from kbitc.compiler.kernels import build_kernels
from kbitc.runtime import dispatch, ops, reference
from kbitc.runtime.reference import quant_state_args
from tests.runtime import kernel_checks as checks

needs_nvcc, needs_gpu = checks.needs_nvcc, checks.needs_gpu

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
CASES_4BIT = [("nf4", 64), ("fp4", 64), ("nf4", 4096)]
# relative to max |grad|: f16 / bf16 (tensor cores) round the output and each decoded weight to the
# dtype (docs/kernel_abi.md): twice the unit roundoff (f16 2^-11, bf16 2^-8); float32: accumulation in
# another order (the CPU kernels measure 7.5e-7 at n <= 300)
REL_TOL = {torch.float16: 2 * 2.0**-11 + 2e-6, torch.bfloat16: 2 * 2.0**-8 + 2e-6, torch.float32: 2e-6}


def grad_specs(target, dtypes=tuple(DTYPES), cases=CASES_4BIT):
    return checks.grad_specs(target, dtypes, cases)


@needs_nvcc
@pytest.mark.parametrize("target", ["sm75", "sm80", "sm90"])
def test_cuda_grad_kernels_compile(target):
    specs = grad_specs(target, cases=[("nf4", 64), ("fp4", 4096)])
    library = build_kernels(specs, register=False)
    assert set(library.specs) == {s.name for s in specs}


@pytest.fixture(scope="module")
def gpu_target():
    major, minor = torch.cuda.get_device_capability()
    target = f"sm{major}{minor}"
    with checks.only_kernels(grad_specs(target)):
        yield target


def _check(got: torch.Tensor, expected: torch.Tensor, dtype):
    assert got.dtype == dtype and got.shape == expected.shape
    err = float((got.double().cpu() - expected).abs().max() / expected.abs().max())
    assert err <= REL_TOL[dtype], f"relative error {err:.3g} > {REL_TOL[dtype]:.3g}"


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("quant_type,blocksize", CASES_4BIT)
def test_4bit_grad_input_on_gpu(gpu_target, dtype, quant_type, blocksize, rng):
    tdtype = DTYPES[dtype]
    assert dispatch.lookup("linear_4bit_grad_input", torch.device("cuda"), tdtype, quant_type, blocksize) is not None
    for n, k in [(40, 70), (33, 130), (24, 77), (300, 129), (256, 4096 + 64)]:
        w = torch.randn(n, k, generator=rng) * 0.1
        packed, state = kq.quantize_4bit(w, quant_type, blocksize, double_quant=(n * k) % 2 == 0)
        w_hat = kq.dequantize_4bit(packed, state).double()
        qargs = [t.cuda() if isinstance(t, torch.Tensor) else t for t in quant_state_args(state)]
        for m in (1, 3, 17, 65, 300):
            g = torch.randn(m, n, generator=rng).to(tdtype)
            x = torch.randn(m, k, generator=rng).to(tdtype).cuda().requires_grad_()
            ops.linear_4bit(x, packed.cuda(), *qargs, None, quant_type, blocksize, n).backward(g.cuda())
            _check(x.grad, g.double() @ w_hat, tdtype)
            # the float32 reference op (one rounding to the dtype happens in the kernel only)
            ref = reference.linear_4bit_grad_input(g.float(), packed, *quant_state_args(state), blocksize, k)
            _check(x.grad, ref.double(), tdtype)


# Shapes of the sm90 warpgroup (wgmma) input gradient (16-bit, n % 64 == 0, k % 32 == 0): k not a
# multiple of the 128-row tile (96, 1056), one row, token counts around the 64 / 128 tile widths.
WGMMA_SHAPES = [(64, 96), (192, 1056), (2048, 512)]


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("quant_type,blocksize", CASES_4BIT)
def test_wgmma_grad_input_on_gpu(gpu_target, dtype, quant_type, blocksize, rng):
    if gpu_target != "sm90":
        pytest.skip("the wgmma input gradient is the sm90 path; this GPU is " + gpu_target)
    tdtype = DTYPES[dtype]
    for n, k in WGMMA_SHAPES:
        w = torch.randn(n, k, generator=rng) * 0.1
        w[n // 2, 5] = 4.0  # a large outlier: its block's scale
        packed, state = kq.quantize_4bit(w, quant_type, blocksize, double_quant=quant_type == "nf4")
        w_hat = kq.dequantize_4bit(packed, state).double()
        qargs = [t.cuda() if isinstance(t, torch.Tensor) else t for t in quant_state_args(state)]
        for m in (1, 63, 64, 130, 1000):
            g = torch.randn(m, n, generator=rng).to(tdtype)
            got = ops.linear_4bit_grad_input(g.cuda(), packed.cuda(), *qargs, quant_type, blocksize, k)
            _check(got, g.double() @ w_hat, tdtype)


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_int8_grad_input_on_gpu(gpu_target, dtype, rng):
    tdtype = DTYPES[dtype]
    assert dispatch.lookup("int8_linear_grad_input", torch.device("cuda"), tdtype) is not None
    for n, k in [(48, 130), (7, 5), (300, 517), (64, 520)]:  # the last: 8-wide loads
        w, scb = kq.int8_vectorwise_quant(torch.randn(n, k, generator=rng))
        w_hat = kq.int8_vectorwise_dequant(w, scb).double()
        for m in (1, 3, 17, 65, 300):
            g = torch.randn(m, n, generator=rng).to(tdtype)
            got = ops.int8_linear_grad_input(g.cuda(), w.cuda(), scb.cuda())
            _check(got, g.double() @ w_hat, tdtype)


@needs_gpu
@needs_nvcc
def test_grad_input_is_cuda_graph_capturable(gpu_target, rng):
    w = torch.randn(64, 256, generator=rng)
    packed, state = kq.quantize_4bit(w, "nf4", 64)
    qargs = [t.cuda() if isinstance(t, torch.Tensor) else t for t in quant_state_args(state)]
    g = torch.randn(16, 64, generator=rng).to(torch.bfloat16).cuda()
    eager = ops.linear_4bit_grad_input(g, packed.cuda(), *qargs, "nf4", 64, 256)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.linear_4bit_grad_input(g, packed.cuda(), *qargs, "nf4", 64, 256)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    packed_cuda = packed.cuda()
    with torch.cuda.graph(graph):
        out = ops.linear_4bit_grad_input(g, packed_cuda, *qargs, "nf4", 64, 256)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
