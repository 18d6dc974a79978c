"""QuantState: everything needed to dequantize a 4-bit tensor, serializable without pickle.

`to_tensors()` gives safetensors-ready tensors and `to_json()` a JSON-safe dict; `from_serialized`
rebuilds and validates them. The JSON carries a format version so old artifacts fail loudly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch

from kbitc.runtime.errors import QuantStateError, UnsupportedInputError, expect

QUANT_STATE_VERSION = 1
NESTED_BLOCKSIZE = 256
ALLOWED_BLOCKSIZES_4BIT = tuple(2**k for k in range(5, 13))  # 32 .. 4096
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CANONICAL_LAYOUT = "bnb"  # row-major flattened, element 2i in the high nibble


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    expect(name in FLOAT_DTYPES, QuantStateError,
           f"expected dtype one of {sorted(FLOAT_DTYPES)}, got {name!r}; the state was written by "
           "an incompatible tool or is corrupted")
    return FLOAT_DTYPES[name]


@dataclasses.dataclass
class NestedAbsmax:
    """Double quantization of the 4-bit absmax: absmax = code[q] * absmax2[i // 256] + offset."""

    absmax2: torch.Tensor  # float32 [ceil(blocks / 256)]
    code: torch.Tensor  # float32 [256], the signed dynamic map
    offset: float
    blocksize: int = NESTED_BLOCKSIZE


@dataclasses.dataclass
class QuantState:
    """Block-wise 4-bit quantization state of one tensor (bitsandbytes-compatible numerics)."""

    quant_type: str  # "nf4" | "fp4"
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the original tensor, and of dequantize's output
    absmax: torch.Tensor  # float32 [blocks], or uint8 [blocks] when nested is set
    code: torch.Tensor  # float32 [16]
    nested: Optional[NestedAbsmax] = None
    layout: str = CANONICAL_LAYOUT
    version: int = QUANT_STATE_VERSION

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def packed_numel(self) -> int:
        return (self.numel + 1) // 2

    def to(self, device: torch.device | str) -> "QuantState":
        nested = None
        if self.nested is not None:
            nested = dataclasses.replace(
                self.nested, absmax2=self.nested.absmax2.to(device), code=self.nested.code.to(device)
            )
        return dataclasses.replace(
            self, absmax=self.absmax.to(device), code=self.code.to(device), nested=nested
        )

    def validate(self, packed: Optional[torch.Tensor] = None) -> None:
        """Raise QuantStateError unless this state is self-consistent (and matches `packed`)."""
        expect(self.version == QUANT_STATE_VERSION, QuantStateError,
               f"expected QuantState version {QUANT_STATE_VERSION}, got {self.version}; "
               "re-quantize the weights with this kbitc version")
        expect(self.quant_type in ("nf4", "fp4"), QuantStateError,
               f"expected quant_type 'nf4' or 'fp4', got {self.quant_type!r}")
        expect(self.blocksize in ALLOWED_BLOCKSIZES_4BIT, QuantStateError,
               f"expected blocksize in {ALLOWED_BLOCKSIZES_4BIT}, got {self.blocksize}")
        expect(self.layout == CANONICAL_LAYOUT, QuantStateError,
               f"expected layout {CANONICAL_LAYOUT!r}, got {self.layout!r}")
        expect(self.code.numel() == 16, QuantStateError,
               f"expected a 16-entry codebook, got {self.code.numel()} entries")
        want_absmax_dtype = torch.uint8 if self.nested is not None else torch.float32
        expect(self.absmax.dtype == want_absmax_dtype and self.absmax.numel() == self.num_blocks,
               QuantStateError,
               f"expected absmax of {self.num_blocks} {dtype_name(want_absmax_dtype)} values for "
               f"shape {list(self.shape)} at blocksize {self.blocksize}, got "
               f"{self.absmax.numel()} {dtype_name(self.absmax.dtype)} values")
        if self.nested is not None:
            blocks2 = -(-self.num_blocks // self.nested.blocksize)
            expect(self.nested.absmax2.numel() == blocks2 and self.nested.code.numel() == 256,
                   QuantStateError,
                   f"expected {blocks2} nested absmax values and a 256-entry map, got "
                   f"{self.nested.absmax2.numel()} and {self.nested.code.numel()}")
        if packed is not None:
            expect(packed.dtype == torch.uint8, UnsupportedInputError,
                   f"expected packed 4-bit data as uint8, got {dtype_name(packed.dtype)}")
            expect(packed.numel() == self.packed_numel, QuantStateError,
                   f"expected {self.packed_numel} packed bytes for shape {list(self.shape)}, got "
                   f"{packed.numel()}; the packed tensor and its QuantState do not belong together")

    # -- serialization (no pickle) -------------------------------------------------------------

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"absmax": self.absmax.contiguous(), "code": self.code.contiguous()}
        if self.nested is not None:
            tensors["nested_absmax"] = self.nested.absmax2.contiguous()
            tensors["nested_code"] = self.nested.code.contiguous()
        return tensors

    def to_json(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "version": self.version,
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "layout": self.layout,
        }
        if self.nested is not None:
            meta["nested_blocksize"] = self.nested.blocksize
            meta["nested_offset"] = self.nested.offset
        return meta

    @classmethod
    def from_serialized(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "QuantState":
        required = ("version", "quant_type", "blocksize", "shape", "dtype")
        missing = [k for k in required if k not in meta] + [
            k for k in ("absmax", "code") if k not in tensors
        ]
        expect(not missing, QuantStateError,
               f"serialized QuantState is missing {missing}; it is truncated or not a kbitc state")
        nested = None
        if "nested_offset" in meta:
            expect("nested_absmax" in tensors and "nested_code" in tensors, QuantStateError,
                   "serialized QuantState has a nested offset but no nested_absmax/nested_code tensors")
            nested = NestedAbsmax(
                absmax2=tensors["nested_absmax"], code=tensors["nested_code"],
                offset=float(meta["nested_offset"]),
                blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
            )
        state = cls(
            quant_type=meta["quant_type"], blocksize=int(meta["blocksize"]),
            shape=tuple(int(s) for s in meta["shape"]), dtype=parse_dtype(meta["dtype"]),
            absmax=tensors["absmax"], code=tensors["code"], nested=nested,
            layout=meta.get("layout", CANONICAL_LAYOUT), version=int(meta["version"]),
        )
        state.validate()
        return state
