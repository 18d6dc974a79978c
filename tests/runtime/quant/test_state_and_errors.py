"""QuantState serialization (safetensors + JSON, no pickle) and the errors for bad input."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import kbitc.quant as kq
from kbitc.runtime.errors import KbitcError, NonFiniteWeightError, QuantStateError, UnsupportedInputError


@pytest.mark.parametrize("double_quant", [True, False])
def test_quant_state_round_trips_through_safetensors_and_json(tmp_path, double_quant, rng):
    w = torch.randn(37, 91, generator=rng).bfloat16()
    packed, state = kq.quantize_4bit(w, "fp4", 128, double_quant=double_quant)
    tensors = {f"w.{k}": v for k, v in state.to_tensors().items()} | {"w": packed}
    save_file(tensors, tmp_path / "q.safetensors", metadata={"w": json.dumps(state.to_json())})
    loaded = load_file(tmp_path / "q.safetensors")
    with open(tmp_path / "q.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = json.loads(header["__metadata__"]["w"])
    state2 = kq.QuantState.from_serialized({k[2:]: v for k, v in loaded.items() if k != "w"}, meta)
    assert torch.equal(kq.dequantize_4bit(loaded["w"], state2), kq.dequantize_4bit(packed, state))


def _state(rng):
    return kq.quantize_4bit(torch.randn(10, 30, generator=rng), "nf4", 64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_rejected(bad):
    w = torch.randn(4, 300)
    w[2, 100] = bad
    with pytest.raises(NonFiniteWeightError, match="NaN or Inf.*flat elements 640..703"):
        kq.quantize_4bit(w)
    with pytest.raises(NonFiniteWeightError):
        kq.quantize_blockwise(w)
    with pytest.raises(KbitcError):
        kq.int8_vectorwise_quant(w)


@pytest.mark.parametrize("call,pattern", [
    (lambda: kq.quantize_4bit(torch.ones(8, dtype=torch.int32)), "float32, float16 or bfloat16, got int32"),
    (lambda: kq.quantize_4bit(torch.ones(8), blocksize=48), "power of two in 32..4096, got 48"),
    (lambda: kq.quantize_4bit(torch.ones(8), blocksize=8192), "got 8192"),
    (lambda: kq.quantize_4bit(torch.ones(8), quant_type="int4"), "'nf4' or 'fp4', got 'int4'"),
    (lambda: kq.quantize_4bit(torch.ones(0)), "non-empty"),
    (lambda: kq.quantize_blockwise(torch.ones(8, dtype=torch.int8)), "got int8"),
    (lambda: kq.int8_vectorwise_quant(torch.ones(3, 4, dtype=torch.int64)), "got int64"),
])
def test_unsupported_input_raises_clear_errors(call, pattern):
    with pytest.raises(UnsupportedInputError, match=pattern):
        call()


def test_state_that_does_not_match_the_data_is_rejected(rng):
    packed, state = _state(rng)
    with pytest.raises(QuantStateError, match="expected 150 packed bytes.*got 149"):
        kq.dequantize_4bit(packed[:-1], state)
    with pytest.raises(QuantStateError, match="version"):
        kq.dequantize_4bit(packed, dataclasses.replace(state, version=99))
    with pytest.raises(QuantStateError, match="absmax"):
        kq.dequantize_4bit(packed, dataclasses.replace(state, shape=(20, 30)))
    with pytest.raises(QuantStateError, match="missing"):
        kq.QuantState.from_serialized({"absmax": state.absmax}, state.to_json())
    meta = state.to_json() | {"dtype": "int8"}
    with pytest.raises(QuantStateError, match="dtype"):
        kq.QuantState.from_serialized(state.to_tensors(), meta)
    with pytest.raises(UnsupportedInputError, match="uint8"):
        kq.dequantize_4bit(packed.to(torch.int16), state)


def test_nothing_is_silently_clamped_for_subnormal_or_huge_finite_values():
    w = torch.tensor([3e38, -3e38, 1e-40, 0.0] * 16)
    packed, state = kq.quantize_4bit(w, "nf4", 64, double_quant=False)
    out = kq.dequantize_4bit(packed, state)
    assert torch.isfinite(out).all() and torch.equal(out[:2], w[:2])
