"""Every generated CPU kernel (AVX2, AVX-512, AVX-512 + BF16/VNNI) against the pure-PyTorch reference."""

import shutil

import pytest
import torch

from kbitc.runtime import dispatch
from kbitc.runtime.kernel_spec import KernelSpec
from tests.runtime import kernel_checks as checks

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake and a C++ compiler")

DTYPES = ("f32", "bf16")
CASES_4BIT = [("nf4", 64), ("fp4", 64), ("nf4", 32), ("nf4", 4096)]


def _specs(target):
    specs = []
    for dtype in DTYPES:
        for qt, bs in CASES_4BIT:
            specs += [KernelSpec(op, target, dtype, qt, bs) for op in ("dequantize_4bit", "linear_4bit", "quantize_4bit")]
        specs += [KernelSpec(op, target, dtype, "", 256) for op in ("quantize_blockwise", "dequantize_blockwise")]
        specs += [KernelSpec(op, target, dtype) for op in ("int8_quant", "int8_linear")]
    return specs


@pytest.fixture(scope="module", params=["cpu_avx2", "cpu_avx512", "cpu_avx512_bf16"])
def target(request):
    if request.param == "cpu_avx512" and not dispatch.AVX512_FLAGS <= dispatch.cpu_flags():
        pytest.skip("this CPU has no AVX-512")
    if request.param == "cpu_avx512_bf16" and dispatch.native_cpu_target() != "cpu_avx512_bf16":
        pytest.skip("this CPU has no AVX512_BF16 / AVX512_VNNI")
    with checks.only_kernels(_specs(request.param)):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type,blocksize", CASES_4BIT)
def test_4bit_kernels(target, dtype, quant_type, blocksize, rng):
    tdtype = checks.TORCH_DTYPES[dtype]
    for op in ("dequantize_4bit", "linear_4bit", "quantize_4bit"):
        checks.assert_kernel_used(op, "cpu", tdtype, quant_type, blocksize)
    checks.check_dequantize_4bit("cpu", tdtype, quant_type, blocksize, rng)
    checks.check_linear_4bit("cpu", tdtype, quant_type, blocksize, rng)
    checks.check_quantize_4bit("cpu", tdtype, quant_type, blocksize, rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_8bit_and_int8_kernels(target, dtype, rng):
    tdtype = checks.TORCH_DTYPES[dtype]
    checks.assert_kernel_used("int8_linear", "cpu", tdtype)
    checks.check_blockwise("cpu", tdtype, 256, rng)
    checks.check_int8("cpu", tdtype, rng)


def test_library_for_a_target_this_machine_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(dispatch, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    with pytest.raises(dispatch.TargetUnavailableError, match="lacks AVX-512"):
        dispatch.check_target_runs_here("cpu_avx512")
    with pytest.raises(dispatch.TargetUnavailableError, match="lacks AVX-512"):
        dispatch.check_target_runs_here("cpu_avx512_bf16")
    assert dispatch.native_cpu_target() == "cpu_avx2"
    # AVX-512 without BF16 / VNNI (Skylake-SP, Ice Lake client): cpu_avx512 runs, cpu_avx512_bf16 is refused
    monkeypatch.setattr(dispatch, "cpu_flags", lambda: frozenset(
        {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}))
    assert dispatch.native_cpu_target() == "cpu_avx512"
    dispatch.check_target_runs_here("cpu_avx512")
    with pytest.raises(dispatch.TargetUnavailableError, match="lacks avx512_bf16"):
        dispatch.check_target_runs_here("cpu_avx512_bf16")
    monkeypatch.setattr(dispatch, "cpu_flags", lambda: frozenset(
        {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"}))
    assert dispatch.native_cpu_target() == "cpu_avx512_bf16"
    dispatch.check_target_runs_here("cpu_avx512_bf16")
    if not torch.cuda.is_available():
        with pytest.raises(dispatch.TargetUnavailableError, match="no CUDA GPU"):
            dispatch.check_target_runs_here("sm90")


@pytest.mark.parametrize("quant_type,blocksize", CASES_4BIT)
def test_bf16_dot_product_linear_rounds_only_the_codebook(target, quant_type, blocksize, rng):
    """cpu_avx512_bf16 with bf16 activations (vdpbf16ps): the codebook is rounded to bf16 and nothing
    else (docs/kernel_abi.md). Rows of x with one power-of-two entry pick single weights, so the output
    equals, bit for bit, the reference run with the bf16-rounded codebook (and not the exact one)."""
    if target != "cpu_avx512_bf16":
        pytest.skip("the bf16 dot-product path is specific to cpu_avx512_bf16")
    from kbitc.runtime import ops, reference
    from kbitc.runtime.reference import quant_state_args
    import kbitc.quant as kq

    n = 137  # row groups and rows that cross absmax2 groups (256 blocks), a leftover row
    k = 2 * max(128, blocksize) + (blocksize if blocksize < 128 else 0)  # whole chunks and a tail
    w = torch.randn(n, k, generator=rng) * 0.05
    packed, state = kq.quantize_4bit(w, quant_type, blocksize, double_quant=True)
    code, *rest = quant_state_args(state)
    code_bf16 = code.bfloat16().float()
    differs = False
    for m in (1, 2, 5, 12, 17, 64):
        x = torch.zeros(m, k)
        cols = torch.randint(0, k, (m,), generator=rng)
        signs = torch.randint(0, 2, (m,), generator=rng) * 2 - 1
        x[torch.arange(m), cols] = signs * 2.0 ** torch.randint(-1, 2, (m,), generator=rng)
        x = x.bfloat16()
        bias = torch.randn(n, generator=rng).bfloat16() if m % 2 else None
        out = ops.linear_4bit(x, packed, code, *rest, bias, quant_type, blocksize, n)
        ref = reference.linear_4bit(x, packed, code_bf16, *rest, bias, blocksize, n)
        assert torch.equal(out, ref), (m, float((out.float() - ref.float()).abs().max()))
        differs |= not torch.equal(out, reference.linear_4bit(x, packed, code, *rest, bias, blocksize, n))
    assert differs, "the exact codebook gives the same outputs: the bf16 path did not run"
