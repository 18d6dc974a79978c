"""bitsandbytes' serialized Linear4bit / Linear8bitLt state-dict formats, both ways, losslessly.

Linear4bit under prefix P: P.weight (uint8 [(n+1)//2, 1]), P.weight.absmax, P.weight.quant_map,
[P.weight.nested_absmax, P.weight.nested_quant_map,] P.weight.quant_state.bitsandbytes__{nf4,fp4}
(uint8 bytes of a JSON dict). Linear8bitLt: P.weight (int8 [out, in]), P.SCB (float32 [out]),
P.weight_format (uint8 scalar, 0 = row-major).
"""

from __future__ import annotations

import json
from typing import NamedTuple, Optional, Union

import torch

from kbitc.runtime.errors import BnbFormatError, expect
from kbitc.runtime.quant.state import NESTED_BLOCKSIZE, NestedAbsmax, QuantState, dtype_name, parse_dtype

QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__"
ROW_FORMAT = 0


class ImportedLinear(NamedTuple):
    """A linear layer read from a bitsandbytes state dict.

    4-bit: weight is the packed uint8 tensor (flat) and state a QuantState.
    int8: weight is the int8 [out, in] tensor and state the float32 per-row scale (SCB).
    """

    weight: torch.Tensor
    state: Union[QuantState, torch.Tensor]
    bias: Optional[torch.Tensor]


def _json_tensor(meta: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def to_bnb_state_dict(weight: torch.Tensor, state: Union[QuantState, torch.Tensor], prefix: str = "",
                      bias: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """State dict that bitsandbytes' Linear4bit (QuantState) or Linear8bitLt (SCB tensor) loads."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(state, QuantState):
        state.validate(weight)
        out[prefix + "weight"] = weight.reshape(-1, 1)
        if bias is not None:
            out[prefix + "bias"] = bias
        out[prefix + "weight.absmax"] = state.absmax
        out[prefix + "weight.quant_map"] = state.code
        meta = {"quant_type": state.quant_type, "blocksize": state.blocksize,
                "dtype": dtype_name(state.dtype), "shape": list(state.shape)}
        if state.nested is not None:
            out[prefix + "weight.nested_absmax"] = state.nested.absmax2
            out[prefix + "weight.nested_quant_map"] = state.nested.code
            meta.update(nested_blocksize=state.nested.blocksize, nested_dtype="float32",
                        nested_offset=state.nested.offset)
        out[prefix + QUANT_STATE_KEY + state.quant_type] = _json_tensor(meta)
        return out
    expect(weight.dtype == torch.int8 and weight.dim() == 2, BnbFormatError,
           f"expected an int8 [out, in] weight for Linear8bitLt, got {dtype_name(weight.dtype)} "
           f"{list(weight.shape)}")
    expect(state.numel() == weight.shape[0], BnbFormatError,
           f"expected {weight.shape[0]} SCB values (one per output row), got {state.numel()}")
    out[prefix + "weight"] = weight
    if bias is not None:
        out[prefix + "bias"] = bias
    out[prefix + "SCB"] = state.float()
    out[prefix + "weight_format"] = torch.tensor(ROW_FORMAT, dtype=torch.uint8)
    return out


def _require(sd: dict, key: str) -> torch.Tensor:
    expect(key in sd, BnbFormatError,
           f"expected key {key!r} in the bitsandbytes state dict, found only "
           f"{sorted(k for k in sd)[:8]}...; check the prefix (layer name + '.')")
    return sd[key]


def from_bnb_state_dict(sd: dict[str, torch.Tensor], prefix: str = "") -> ImportedLinear:
    """Read one Linear4bit or Linear8bitLt layer (keys under `prefix`) from a bnb state dict."""
    qs_keys = [k for k in sd if k.startswith(prefix + QUANT_STATE_KEY)]
    bias = sd.get(prefix + "bias")
    if qs_keys:
        expect(len(qs_keys) == 1, BnbFormatError,
               f"expected one quant_state entry under {prefix!r}, found {qs_keys}")
        try:
            meta = json.loads(bytes(sd[qs_keys[0]].cpu().tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BnbFormatError(f"expected JSON bytes in {qs_keys[0]!r}: {exc}") from exc
        quant_type = qs_keys[0].rsplit("__", 1)[1]
        expect(meta.get("quant_type") == quant_type, BnbFormatError,
               f"expected quant_type {quant_type!r} in {qs_keys[0]!r}, got {meta.get('quant_type')!r}")
        nested = None
        if "nested_offset" in meta:
            nested = NestedAbsmax(absmax2=_require(sd, prefix + "weight.nested_absmax"),
                                  code=_require(sd, prefix + "weight.nested_quant_map"),
                                  offset=float(meta["nested_offset"]),
                                  blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)))
        state = QuantState(quant_type=quant_type, blocksize=int(meta["blocksize"]),
                           shape=tuple(int(s) for s in meta["shape"]), dtype=parse_dtype(meta["dtype"]),
                           absmax=_require(sd, prefix + "weight.absmax"),
                           code=_require(sd, prefix + "weight.quant_map"), nested=nested)
        packed = _require(sd, prefix + "weight").reshape(-1)
        if packed.dtype != torch.uint8:  # bnb's quant_storage option stores the same bytes as another dtype
            packed = packed.view(torch.uint8)
        state.validate(packed)
        return ImportedLinear(packed, state, bias)
    weight = _require(sd, prefix + "weight")
    scb = _require(sd, prefix + "SCB")
    fmt = sd.get(prefix + "weight_format", torch.tensor(ROW_FORMAT))
    expect(int(fmt) == ROW_FORMAT, BnbFormatError,
           f"expected weight_format 0 (row-major int8), got {int(fmt)}; re-save the layer on a "
           "bitsandbytes version that writes the row format")
    expect(weight.dtype == torch.int8 and scb.numel() == weight.shape[0], BnbFormatError,
           f"expected int8 weight [out, in] with one SCB per row, got {dtype_name(weight.dtype)} "
           f"{list(weight.shape)} and {scb.numel()} SCB values")
    return ImportedLinear(weight, scb, bias)
