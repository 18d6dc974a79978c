"""Autograd through the quantized linears: input gradients (reference and generated CPU kernels)
against float64 math through the dequantized weights, gradcheck, checkpointing, autocast, opcheck."""

import shutil

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import kbitc.quant as kq
from kbitc.runtime import dispatch, ops
from kbitc.runtime.reference import quant_state_args
from tests.runtime import kernel_checks as checks

# Relative to max |grad|: float32 accumulation of <= 300 products in another order (measured max
# 7.5e-7 over these cases, reference and AVX2 / AVX-512 kernels) / one bf16 rounding of the output
# (unit roundoff 2^-8 = 3.9e-3; measured max 3.7e-3) plus the float32 part.
REL_TOL = {torch.float32: 2e-6, torch.bfloat16: 2.0**-8 + 2e-6}
SHAPES = [(40, 70), (33, 130), (24, 77), (300, 129)]  # k not a multiple of the blocksize; odd n * k
MS = (1, 3, 17)
CASES_4BIT = [("nf4", 64), ("fp4", 64), ("nf4", 32)]


@pytest.fixture
def reference_only():
    with checks.only_kernels([]):
        yield


def _quant_4bit(rng, n, k, quant_type, blocksize):
    w = torch.randn(n, k, generator=rng) * 0.1
    packed, state = kq.quantize_4bit(w, quant_type, blocksize, double_quant=(n * k) % 2 == 0)
    return packed, quant_state_args(state), kq.dequantize_4bit(packed, state).double()


def _check_rel(got: torch.Tensor, expected: torch.Tensor, dtype) -> float:
    err = float((got.double() - expected).abs().max() / expected.abs().max())
    assert err <= REL_TOL[dtype], f"relative error {err:.3g} > {REL_TOL[dtype]:.3g}"
    return err


def _grad_4bit_case(rng, dtype, quant_type, blocksize, n, k, m):
    packed, qargs, w_hat = _quant_4bit(rng, n, k, quant_type, blocksize)
    x = torch.randn(m, k, generator=rng).to(dtype).requires_grad_()
    g = torch.randn(m, n, generator=rng).to(dtype)
    ops.linear_4bit(x, packed, *qargs, None, quant_type, blocksize, n).backward(g)
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    return _check_rel(x.grad, g.double() @ w_hat, dtype)


def _grad_int8_case(rng, dtype, n, k, m):
    w, scb = kq.int8_vectorwise_quant(torch.randn(n, k, generator=rng))
    x = torch.randn(m, k, generator=rng)
    x[0, k // 2] = 20.0  # an outlier column: the gradient still uses the whole dequantized weight
    x = x.to(dtype).requires_grad_()
    g = torch.randn(m, n, generator=rng).to(dtype)
    ops.int8_linear(x, w, scb, None, 6.0).backward(g)
    return _check_rel(x.grad, g.double() @ kq.int8_vectorwise_dequant(w, scb).double(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_type,blocksize", CASES_4BIT)
def test_4bit_input_grad_reference(reference_only, rng, dtype, quant_type, blocksize):
    for n, k in SHAPES:
        for m in MS:
            _grad_4bit_case(rng, dtype, quant_type, blocksize, n, k, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_input_grad_reference(reference_only, rng, dtype):
    for n, k in SHAPES:
        for m in MS:
            _grad_int8_case(rng, dtype, n, k, m)


def test_gradcheck_float64(reference_only, rng):
    """The 4-bit linear is exactly linear in x, so finite differences of any size are exact up to the
    float32 rounding of the op (~1e-7 relative): eps 0.1 keeps that far below the tolerance."""
    packed, qargs, _ = _quant_4bit(rng, 12, 37, "nf4", 32)
    x = torch.randn(3, 37, generator=rng, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, generator=rng, dtype=torch.float64, requires_grad=True)
    fn = lambda x, b: ops.linear_4bit(x, packed, *qargs, b, "nf4", 32, 12)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, bias), eps=0.1, atol=1e-5, rtol=1e-4)
    # int8: the forward quantizes x (piecewise constant); the gradient is the straight-through one
    w, scb = kq.int8_vectorwise_quant(torch.randn(12, 37, generator=rng))
    x8 = torch.randn(3, 37, generator=rng, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: ops.int8_linear_grad_input(g, w, scb),
                                    (torch.randn(3, 12, generator=rng, dtype=torch.float64, requires_grad=True),),
                                    eps=0.1, atol=1e-5, rtol=1e-4)
    ops.int8_linear(x8, w, scb, None, 6.0).sum().backward()
    assert torch.equal(x8.grad, torch.ones(3, 12) @ kq.int8_vectorwise_dequant(w, scb))


def test_bias_grad_and_frozen_weights(reference_only, rng):
    packed, qargs, _ = _quant_4bit(rng, 16, 64, "nf4", 64)
    x = torch.randn(2, 5, 64, generator=rng, requires_grad=True)
    bias = torch.zeros(16, requires_grad=True)
    g = torch.randn(2, 5, 16, generator=rng)
    ops.linear_4bit(x, packed, *qargs, bias, "nf4", 64, 16).backward(g)
    assert torch.allclose(bias.grad, g.sum((0, 1)))
    assert x.grad.shape == x.shape
    y = ops.linear_4bit(torch.randn(2, 64, generator=rng), packed, *qargs, None, "nf4", 64, 16)
    assert not y.requires_grad  # no input requires grad: no graph


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_gives_identical_grads(reference_only, rng, use_reentrant):
    packed, qargs, _ = _quant_4bit(rng, 48, 64, "nf4", 64)
    w8, scb = kq.int8_vectorwise_quant(torch.randn(64, 48, generator=rng))
    a = torch.nn.Parameter(torch.randn(64, 64, generator=rng) * 0.1)

    def block(x):
        h = ops.linear_4bit(x @ a, packed, *qargs, None, "nf4", 64, 48)
        return ops.int8_linear(torch.nn.functional.gelu(h), w8, scb, None, 6.0)

    x0 = torch.randn(5, 64, generator=rng)
    grads = []
    for ckpt in (False, True):
        a.grad = None
        x = x0.clone().requires_grad_()
        out = checkpoint(block, x, use_reentrant=use_reentrant) if ckpt else block(x)
        out.pow(2).sum().backward()
        grads.append((x.grad.clone(), a.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_autocast_casts_activation_and_bias_only(reference_only, rng):
    packed, qargs, w_hat = _quant_4bit(rng, 16, 64, "nf4", 64)
    w8, scb = kq.int8_vectorwise_quant(torch.randn(16, 64, generator=rng))
    x = torch.randn(3, 64, generator=rng, requires_grad=True)
    bias = torch.randn(16, generator=rng)  # float32, as artifacts store it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear_4bit(x, packed, *qargs, bias, "nf4", 64, 16)
        y8 = ops.int8_linear(x, w8, scb, bias, 6.0)
    assert y.dtype == torch.bfloat16 and y8.dtype == torch.bfloat16
    expected = ops.linear_4bit(x.detach().bfloat16(), packed, *qargs, bias.bfloat16(), "nf4", 64, 16)
    assert torch.equal(y, expected)
    (y.float().sum() + y8.float().sum()).backward()
    assert x.grad.dtype == torch.float32
    expected_grad = torch.ones(3, 16) @ w_hat.float() + torch.ones(3, 16) @ kq.int8_vectorwise_dequant(w8, scb)
    assert torch.allclose(x.grad, expected_grad, rtol=2**-7, atol=2**-7 * float(expected_grad.abs().max()))


def test_opcheck_grad_ops(reference_only, rng):
    packed, qargs, _ = _quant_4bit(rng, 40, 70, "nf4", 64)
    w8, scb = kq.int8_vectorwise_quant(torch.randn(40, 70, generator=rng))
    g = torch.randn(3, 40, generator=rng)
    torch.library.opcheck(ops.linear_4bit_grad_input, (g, packed, *qargs, "nf4", 64, 70))
    torch.library.opcheck(ops.int8_linear_grad_input, (g, w8, scb))
    x = torch.randn(3, 70, generator=rng, requires_grad=True)
    torch.library.opcheck(ops.linear_4bit, (x, packed, *qargs, None, "nf4", 64, 40),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# -- generated CPU kernels ----------------------------------------------------------------------

def _grad_specs(target):
    return checks.grad_specs(target, ("f32", "bf16"), CASES_4BIT)


@pytest.fixture(scope="module", params=["cpu_avx2", "cpu_avx512"])
def cpu_target(request):
    if shutil.which("cmake") is None:
        pytest.skip("needs cmake and a C++ compiler")
    if request.param == "cpu_avx512" and not dispatch.AVX512_FLAGS <= dispatch.cpu_flags():
        pytest.skip("this CPU has no AVX-512")
    with checks.only_kernels(_grad_specs(request.param)):
        yield request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_grad_kernels(cpu_target, rng, dtype):
    for qt, bs in CASES_4BIT:
        assert dispatch.lookup("linear_4bit_grad_input", torch.device("cpu"), dtype, qt, bs) is not None
        for n, k in SHAPES:
            for m in MS + (300,):  # 300: more than one 256-row accumulator block
                _grad_4bit_case(rng, dtype, qt, bs, n, k, m)
    assert dispatch.lookup("int8_linear_grad_input", torch.device("cpu"), dtype) is not None
    for n, k in SHAPES:
        for m in MS + (300,):
            _grad_int8_case(rng, dtype, n, k, m)


def test_cpu_grad_kernel_equals_reference_op(cpu_target, rng):
    """Same numbers as the reference op up to float32 summation order, 3-D inputs included."""
    packed, qargs, _ = _quant_4bit(rng, 70, 200, "fp4", 64)
    g = torch.randn(2, 9, 70, generator=rng)
    got = ops.linear_4bit_grad_input(g, packed, *qargs, "fp4", 64, 200)
    from kbitc.runtime import reference
    ref = reference.linear_4bit_grad_input(g, packed, *qargs, 64, 200)
    assert got.shape == (2, 9, 200)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
