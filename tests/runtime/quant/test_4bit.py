"""NF4/FP4 block-wise quantization is bit-identical to bitsandbytes 0.50 (CPU backend)."""

import itertools

import pytest
import torch

import kbitc.quant as kq
from tests.runtime.quant.bnb_helpers import F, assert_only_near_midpoint_differences, bnb_reference_quantize_blockwise

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd numel, a single element, numel not a multiple of any blocksize, 1-row, multi-block
SHAPES = [(1,), (7,), (1, 4099), (33, 65), (300, 41)]


def _weights(shape, dtype, rng, kind):
    w = torch.randn(shape, generator=rng)
    if kind == "outliers":
        flat = w.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 97),), generator=rng)
        flat[idx] *= 1e4  # huge outliers
    elif kind == "constant":
        w = torch.full(shape, -0.75)  # all-equal blocks
    elif kind == "zeros":
        w = torch.zeros(shape)
    return w.to(dtype)


@pytest.mark.parametrize("quant_type,blocksize", list(itertools.product(["nf4", "fp4"], BLOCKSIZES)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_absmax_and_dequant_identical_to_bnb(quant_type, blocksize, dtype, rng):
    for shape, kind in itertools.product(SHAPES, ["gauss", "outliers", "constant", "zeros"]):
        w = _weights(shape, dtype, rng, kind)
        packed, state = kq.quantize_4bit(w, quant_type, blocksize, double_quant=False)
        b_packed, b_state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
        assert torch.equal(packed, b_packed.view(-1)), (shape, kind)
        assert torch.equal(state.absmax, b_state.absmax), (shape, kind)
        out = kq.dequantize_4bit(packed, state)
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(out, F.dequantize_4bit(b_packed, b_state)), (shape, kind)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (5, 13), (64, 1000), (1024, 700)])
def test_double_quant_identical_to_bnb(quant_type, dtype, shape, rng):
    w = (torch.randn(shape, generator=rng) * torch.rand(shape, generator=rng) * 3).to(dtype)
    packed, state = kq.quantize_4bit(w, quant_type, 64, double_quant=True)
    b_packed, b_state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(packed, b_packed.view(-1))
    assert state.nested.offset == b_state.offset.item()
    assert torch.equal(state.nested.code, b_state.state2.code)
    # the nested codes and absmax2 equal bitsandbytes' reference (nearest-code) quantizer bit for bit
    _, raw = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    ref_q, ref_absmax2 = bnb_reference_quantize_blockwise(raw.absmax - b_state.offset, b_state.state2.code, 256)
    assert torch.equal(state.absmax, ref_q) and torch.equal(state.nested.absmax2, ref_absmax2)
    # against its CPU C library: full nested blocks have the same absmax2, and only codes of values
    # within ~2e-5 of a midpoint may differ (see bnb_helpers)
    full_blocks = raw.absmax.numel() // 256
    assert torch.equal(state.nested.absmax2[:full_blocks], b_state.state2.absmax[:full_blocks])
    # (a nested block whose values are all exactly the offset has absmax2 0 there: 0/0, any code)
    n = raw.absmax.numel()
    live = b_state.state2.absmax.repeat_interleave(256)[:n] > 0
    scaled = _normed(raw.absmax - b_state.offset, state.nested.absmax2, 256)
    assert_only_near_midpoint_differences(state.absmax[live], b_state.absmax[live], scaled[live],
                                          b_state.state2.code, 0.01)
    # the same packed bytes + state dequantize identically in kbitc and in bitsandbytes
    assert torch.equal(kq.dequantize_4bit(packed, state), F.dequantize_4bit(b_packed, _as_bnb_state(state)))


def _normed(x, absmax, blocksize):
    n = x.numel()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return x / scale


def _as_bnb_state(state):
    sd = kq.to_bnb_state_dict(torch.zeros(state.packed_numel, dtype=torch.uint8), state)
    return F.QuantState.from_dict({k.removeprefix("weight."): v for k, v in sd.items() if k != "weight"},
                                  device=torch.device("cpu"))


def test_ties_at_midpoints_go_to_lower_code_like_bnb():
    """Values exactly on a float32 midpoint (block absmax 1.0, so scaling is exact) match bnb."""
    for quant_type in ["nf4", "fp4"]:
        code = kq.code_4bit(quant_type)
        s = torch.sort(code).values
        mids = (s[:-1] + s[1:]) / 2
        w = torch.cat([torch.tensor([1.0]), mids, -mids, torch.nextafter(mids, torch.ones_like(mids))])
        w = torch.nn.functional.pad(w, (0, 64 - w.numel() % 64))
        packed, _ = kq.quantize_4bit(w, quant_type, 64, double_quant=False)
        b_packed, _ = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
        assert torch.equal(packed, b_packed.view(-1))
        codes = kq.unpack_4bit(packed, w.numel())[1:1 + mids.numel()]
        # value == midpoint selects the lower of the two codes
        assert torch.equal(code[codes.long()], s[:-1])


def test_odd_numel_pads_with_the_code_of_zero():
    w = torch.tensor([0.5, -1.0, 0.25])
    packed, _ = kq.quantize_4bit(w, "nf4", 64, double_quant=False)
    assert packed.numel() == 2 and int(packed[1]) & 0x0F == 7  # NF4 index 7 is 0.0
