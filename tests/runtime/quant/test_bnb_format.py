"""Round trips through bitsandbytes' serialized Linear4bit / Linear8bitLt state dicts."""

import pytest
import torch

import kbitc.quant as kq
from kbitc.runtime.errors import BnbFormatError
from tests.runtime.quant.bnb_helpers import bnb


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_kbitc_to_bnb_linear4bit_and_back(quant_type, double_quant, rng):
    w = torch.randn(24, 70, generator=rng)
    bias = torch.randn(24, generator=rng)
    packed, state = kq.quantize_4bit(w, quant_type, 64, double_quant=double_quant)
    sd = kq.to_bnb_state_dict(packed, state, prefix="layer.", bias=bias)
    # bitsandbytes loads it (Params4bit.from_prequantized, the path transformers uses), and its
    # forward equals x @ dequant(W)^T + b computed by kbitc in float64
    layer = bnb.nn.Linear4bit(70, 24, quant_type=quant_type, compress_statistics=double_quant,
                              compute_dtype=torch.float32)
    stats = {k.removeprefix("layer.weight."): v for k, v in sd.items() if k.startswith("layer.weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["layer.weight"], stats, requires_grad=False,
                                                       device="cpu")
    layer.bias = torch.nn.Parameter(sd["layer.bias"])
    x = torch.randn(5, 70, generator=rng)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x.double(), kq.dequantize_4bit(packed, state).double(), bias.double())
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    # bnb writes back exactly the same tensors, and kbitc reads them back losslessly
    sd_back = {"layer." + k: v for k, v in layer.state_dict().items()}
    assert sd_back.keys() == sd.keys()
    for key in sd:
        assert torch.equal(sd_back[key].view(-1).cpu(), sd[key].view(-1)), key
    imported = kq.from_bnb_state_dict(sd_back, prefix="layer.")
    assert torch.equal(imported.weight, packed) and torch.equal(imported.bias, bias)
    assert imported.state.to_json() == state.to_json()
    assert torch.equal(kq.dequantize_4bit(imported.weight, imported.state), kq.dequantize_4bit(packed, state))


def test_bnb_linear4bit_checkpoint_imports_exactly(rng):
    layer = bnb.nn.Linear4bit(130, 33, quant_type="nf4", compress_statistics=True, compute_dtype=torch.bfloat16)
    layer.load_state_dict(torch.nn.Linear(130, 33).state_dict())
    layer = layer.to("cpu")
    sd = layer.state_dict()
    imported = kq.from_bnb_state_dict(sd)
    bnb_dequant = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(kq.dequantize_4bit(imported.weight, imported.state), bnb_dequant)
    again = kq.to_bnb_state_dict(imported.weight, imported.state, bias=imported.bias)
    assert again.keys() == sd.keys()
    assert all(torch.equal(again[k].view(-1), sd[k].view(-1)) for k in sd)


def test_linear8bitlt_round_trip(rng):
    w = torch.randn(40, 64, generator=rng).half()
    codes, scale = kq.int8_vectorwise_quant(w)
    sd = kq.to_bnb_state_dict(codes, scale, bias=None)
    layer = bnb.nn.Linear8bitLt(64, 40, bias=False, has_fp16_weights=False).to("cpu")  # quantizes
    layer.load_state_dict(sd)  # then bnb accepts a quantized checkpoint
    sd_back = layer.state_dict()
    assert set(sd_back) == {"weight", "SCB", "weight_format"}
    imported = kq.from_bnb_state_dict(sd_back)
    assert torch.equal(imported.weight, codes) and torch.equal(imported.state, scale)
    assert imported.bias is None


def test_bad_bnb_state_dicts_raise(rng):
    packed, state = kq.quantize_4bit(torch.randn(8, 64, generator=rng))
    sd = kq.to_bnb_state_dict(packed, state, prefix="a.")
    with pytest.raises(BnbFormatError, match="check the prefix"):
        kq.from_bnb_state_dict(sd, prefix="b.")
    del sd["a.weight.nested_absmax"]
    with pytest.raises(BnbFormatError, match="nested_absmax"):
        kq.from_bnb_state_dict(sd, prefix="a.")
    bad = kq.to_bnb_state_dict(torch.zeros(4, 4, dtype=torch.int8), torch.ones(4))
    bad["weight_format"] = torch.tensor(2, dtype=torch.uint8)
    with pytest.raises(BnbFormatError, match="weight_format"):
        kq.from_bnb_state_dict(bad)
