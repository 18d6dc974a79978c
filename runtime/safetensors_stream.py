"""Write a .safetensors file tensor by tensor, so a compile never holds all weights in memory.

The safetensors layout is an 8-byte little-endian header length, a JSON header with every
tensor's dtype, shape and byte range, then the raw bytes. The sizes of quantized tensors are known
before quantizing, so the header is written first and each tensor is written into its slot as
soon as it exists. Files stay readable by the `safetensors` package.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Optional

import torch

from kbitc.runtime.errors import KbitcError

DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
               torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
               torch.float64: "F64"}


class SafetensorsWriteError(KbitcError):
    """A tensor did not match the layout declared for it, or some were never written."""


class StreamingSafetensorsWriter:
    def __init__(self, path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Optional[dict[str, str]] = None, metadata_reserve: int = 0):
        """`metadata_reserve` bytes of header room let `set_metadata` fill in metadata known only
        after the tensors are written (e.g. a QuantState's double-quant offset)."""
        self.layout = layout
        header: dict = {}
        offset = 0
        for name, (dtype, shape) in layout.items():
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (metadata_reserve + (-(len(blob) + metadata_reserve)) % 8)
        self._header = header
        self._header_len = len(blob)
        self._data_start = 8 + len(blob)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._file.truncate(self._data_start + offset)
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.layout:
            raise SafetensorsWriteError(f"tensor {name!r} was not declared in the layout")
        dtype, shape = self.layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise SafetensorsWriteError(f"expected {name} as {dtype} {list(shape)}, got {tensor.dtype} "
                                        f"{list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        begin = self._header[name]["data_offsets"][0]
        self._file.seek(self._data_start + begin)
        self._file.write(data)
        self._written.add(name)

    def set_metadata(self, metadata: dict[str, str]) -> None:
        """Rewrite the header's __metadata__ in place (must fit in the reserved room)."""
        self._header["__metadata__"] = metadata
        blob = json.dumps(self._header, separators=(",", ":")).encode()
        if len(blob) > self._header_len:
            raise SafetensorsWriteError(f"metadata needs {len(blob) - self._header_len} more header bytes "
                                        "than were reserved")
        self._file.seek(8)
        self._file.write(blob + b" " * (self._header_len - len(blob)))

    def close(self) -> None:
        missing = set(self.layout) - self._written
        self._file.close()
        if missing:
            raise SafetensorsWriteError(f"tensors never written: {sorted(missing)[:5]}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._file.close()
