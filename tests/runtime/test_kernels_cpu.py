"""Every generated CPU kernel (AVX2 and AVX-512) against the pure-PyTorch reference."""

import shutil

import pytest
import torch

from kbitc.compiler.kernels import build_kernels
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


@pytest.fixture(scope="module", params=["cpu_avx2", "cpu_avx512"])
def target(request):
    if request.param == "cpu_avx512" and dispatch.native_cpu_target() != "cpu_avx512":
        pytest.skip("this CPU has no AVX-512")
    saved = dict(dispatch._REGISTRY)
    dispatch.unregister_all()
    build_kernels(_specs(request.param))
    yield request.param
    dispatch.unregister_all()
    dispatch._REGISTRY.update(saved)


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
    if not torch.cuda.is_available():
        with pytest.raises(dispatch.TargetUnavailableError, match="no CUDA GPU"):
            dispatch.check_target_runs_here("sm90")
