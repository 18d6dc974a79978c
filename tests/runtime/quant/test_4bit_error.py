"""4-bit quantization error against float64 math: analytic bounds and measured SQNR."""

import pytest
import torch

import kbitc.quant as kq


def _sqnr_db(x, x_hat):
    x = x.double()
    return float(10 * torch.log10(x.pow(2).sum() / (x - x_hat.double()).pow(2).sum()))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_elementwise_error_within_nearest_code_bound(quant_type, blocksize, double_quant, rng):
    w = torch.randn(129, 77, generator=rng) * 0.02
    packed, state = kq.quantize_4bit(w, quant_type, blocksize, double_quant=double_quant)
    w_hat = kq.dequantize_4bit(packed, state).double()
    code = torch.sort(kq.code_4bit(quant_type).double()).values
    half_gap = ((code[1:] - code[:-1]) / 2).max()
    true_absmax = torch.nn.functional.pad(w.double().view(-1), (0, (-w.numel()) % blocksize)).view(
        -1, blocksize).abs().amax(1)
    used_absmax = kq.absmax_of(state).double()
    # error <= |code| * |absmax error| + absmax * half-gap, + float32 rounding of the product
    per_block = used_absmax * half_gap + (used_absmax - true_absmax).abs() + true_absmax * 2.0**-23
    bound = per_block.repeat_interleave(blocksize)[: w.numel()].view(w.shape)
    assert bool(((w.double() - w_hat).abs() <= bound).all())


@pytest.mark.parametrize("quant_type,blocksize,min_db", [
    # measured on 20 seeds of N(0, 1) 512x512: NF4/64 20.2-20.3 dB, FP4/64 18.4-18.5 dB,
    # NF4/4096 17.1 dB; thresholds sit 0.5 dB under the smallest measurement
    ("nf4", 64, 19.7), ("fp4", 64, 17.9), ("nf4", 4096, 16.6),
])
def test_sqnr_against_float64(quant_type, blocksize, min_db, rng):
    w = torch.randn(512, 512, generator=rng)
    packed, state = kq.quantize_4bit(w, quant_type, blocksize, double_quant=True)
    assert _sqnr_db(w, kq.dequantize_4bit(packed, state)) >= min_db
