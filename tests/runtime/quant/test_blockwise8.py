"""The 8-bit block-wise (dynamic map) format: bit-identical to bitsandbytes' reference quantizer."""

import pytest
import torch

import kbitc.quant as kq
from tests.runtime.quant.bnb_helpers import F, assert_only_near_midpoint_differences, bnb_reference_quantize_blockwise


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("blocksize", [64, 256, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (255,), (3, 1000), (4097,)])
def test_blockwise8_identical_to_bnb_reference(signed, blocksize, dtype, shape, rng):
    x = torch.randn(shape, generator=rng)
    if not signed:
        x = x.abs()  # the unsigned map holds Adam's second moment (non-negative)
    x = x.to(dtype)
    code = kq.dynamic_map(signed)
    q, absmax = kq.quantize_blockwise(x, blocksize=blocksize, signed=signed)
    ref_q, ref_absmax = bnb_reference_quantize_blockwise(x, code, blocksize)
    assert torch.equal(q, ref_q) and torch.equal(absmax, ref_absmax)
    # bitsandbytes' public CPU path (its C library): same absmax for full blocks, near-midpoint codes only
    b_q, b_state = F.quantize_blockwise(x, code=code, blocksize=blocksize)
    full = x.numel() // blocksize
    assert torch.equal(absmax[:full], b_state.absmax[:full])
    normed = x.float().view(-1) / absmax.repeat_interleave(blocksize)[: x.numel()]
    assert_only_near_midpoint_differences(q.view(-1), b_q.view(-1), normed, code, 0.01)
    # dequantization is identical given identical codes
    out = kq.dequantize_blockwise(q, absmax, blocksize=blocksize, signed=signed, dtype=dtype)
    b_out = F.dequantize_blockwise(q, absmax=absmax, code=code, blocksize=blocksize)
    assert torch.equal(out.float(), b_out.float().to(dtype).float())


def test_blockwise8_error_bound_float64(rng):
    """|x - x_hat| <= absmax * (largest half-gap of the map, or the distance from -1 to the map's
    minimum -0.99297, which has no code at -1): nearest-code quantization's bound."""
    x = torch.randn(50_001, generator=rng) * 10
    q, absmax = kq.quantize_blockwise(x, blocksize=256)
    x_hat = kq.dequantize_blockwise(q, absmax, blocksize=256).double()
    code = kq.dynamic_map(True).double()
    half_gap = torch.maximum(((code[1:] - code[:-1]) / 2).max(), 1 + code.min())
    block_absmax = absmax.double().repeat_interleave(256)[: x.numel()]
    # + one float32 ulp of absmax: x_hat itself is a rounded float32 product
    bound = block_absmax * (half_gap + 2.0**-23)
    assert bool(((x.double() - x_hat).abs() <= bound).all())
