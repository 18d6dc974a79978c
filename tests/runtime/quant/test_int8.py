"""LLM.int8(): vector-wise quantization and outlier decomposition, against bitsandbytes and float64."""

import pytest
import torch

import kbitc.quant as kq
from tests.runtime.quant.bnb_helpers import F, bnb

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 5), (1, 4096), (17, 33), (64, 300)])
def test_vectorwise_quant_identical_to_bnb(dtype, shape, rng):
    x = torch.randn(shape, generator=rng) * 3
    if shape[0] > 3:
        x[2] = 0  # an all-zero row
    x = x.to(dtype)
    codes, scale = kq.int8_vectorwise_quant(x)
    b_codes, b_scale, _ = F.int8_vectorwise_quant(x.clone())
    assert torch.equal(codes, b_codes) and torch.equal(scale, b_scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 17, 64])
def test_activation_outliers_identical_to_bnb(dtype, rows, rng):
    x = torch.randn(rows, 257, generator=rng)
    cols = torch.randint(0, 257, (3,), generator=rng)
    x[torch.randint(0, rows, (3,), generator=rng), cols] = 40.0  # large outliers in 3 columns
    x = x.to(dtype)
    codes, scale, mask = kq.int8_quantize_activations(x, threshold=6.0)
    b_codes, b_scale, b_cols = F.int8_vectorwise_quant(x.clone(), threshold=6.0)
    assert torch.equal(codes, b_codes) and torch.equal(scale, b_scale)
    assert torch.equal(mask.nonzero().view(-1), b_cols.view(-1))
    assert torch.equal(kq.outlier_columns(x, 6.0), mask)


def _float64_reference(x, codes, scale, bias, threshold):
    """Independent float64 LLM.int8() math, written out from the formula in DESIGN.md 4."""
    x = x.double().reshape(-1, x.shape[-1])
    outlier = (x.abs() >= threshold).any(dim=0)
    inlier_x = torch.where(x.abs() >= threshold, 0.0, x)
    rowmax = inlier_x.abs().amax(dim=1, keepdim=True)
    xq = torch.round(inlier_x.float() * (127.0 / rowmax.float())).double()
    xq[:, outlier] = 0
    w_hat = codes.double() * scale.double()[:, None] / 127
    out = (xq @ codes.double().t()) * rowmax * scale.double()[None, :] / 127**2
    out += x[:, outlier] @ w_hat[:, outlier].t()
    return out + bias.double()


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_int8_linear_matches_float64_and_bnb(rows, rng):
    w = torch.randn(48, 200, generator=rng) * 0.05
    bias = torch.randn(48, generator=rng)
    x = torch.randn(rows, 200, generator=rng)
    x[:, 7] *= 30  # an outlier feature in every row
    codes, scale = kq.int8_vectorwise_quant(w.half())  # bnb's Int8Params quantizes in float16
    out = kq.int8_linear(x, codes, scale, bias, threshold=6.0)
    ref = _float64_reference(x, codes, scale, bias, 6.0)
    # float32 output of float64 math: relative error ~1e-7 (measured 6e-8)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    layer = bnb.nn.Linear8bitLt(200, 48, bias=True, has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict({"weight": w, "bias": bias})
    layer = layer.to("cpu")
    assert torch.equal(layer.weight.data, codes) and torch.equal(layer.weight.SCB, scale)
    # bnb's Linear8bitLt computes in float16 (it casts other inputs to it): compare in float16
    x16 = x.half()
    with torch.no_grad():
        b_out = layer(x16)
    out16 = kq.int8_linear(x16, codes, scale, bias.half(), threshold=6.0)
    assert out16.dtype == torch.float16
    # bnb rounds the int8 part, the outlier product and the sum to float16 separately (each <= half
    # an ulp of the largest magnitude, 2^-11 relative): allow 3 ulps of max|out| (measured: 1 ulp)
    ulp = 2.0**-10 * float(b_out.float().abs().max())
    assert float((out16.float() - b_out.float()).abs().max()) <= 3 * ulp
