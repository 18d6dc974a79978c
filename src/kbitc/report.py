"""Per-layer quantization report for a safetensors file: what `kbitc report` prints.

Until `kbitc compile` lands this is the main job: it quantizes every 2-D weight with the chosen
scheme and measures, against float64 math, how much each layer loses.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors import SafetensorError

from kbitc.runtime import quant as kq
from kbitc.runtime.errors import UnsupportedInputError


@dataclasses.dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, ...]
    scheme: str
    bits_per_param: float
    sqnr_db: float
    max_rel_error: float  # max |w - w_hat| / max |w|
    quantized_bytes: int
    original_bytes: int


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def quantize_and_measure(name: str, w: torch.Tensor, scheme: str, blocksize: int,
                         double_quant: bool) -> LayerReport:
    if scheme == "int8":
        codes, scale = kq.int8_vectorwise_quant(w)
        w_hat = kq.int8_vectorwise_dequant(codes, scale)
        size = _nbytes(codes, scale)
    else:
        packed, state = kq.quantize_4bit(w, scheme, blocksize, double_quant=double_quant)
        w_hat = kq.dequantize_4bit(packed, state)
        size = _nbytes(packed, *state.to_tensors().values()) - _nbytes(state.code)  # codebook is shared
    ref = w.double()
    err = ref - w_hat.double()
    noise = float(err.pow(2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(float(ref.pow(2).sum()) / noise)
    peak = float(ref.abs().max()) or 1.0
    return LayerReport(name, tuple(w.shape), scheme, 8 * size / w.numel(), sqnr,
                       float(err.abs().max()) / peak, size, _nbytes(w))


def iter_weights(path: Path):
    """(name, tensor) for every 2-D floating tensor, read one at a time (memory-mapped)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.dim() == 2 and tensor.is_floating_point():
                    yield name, tensor
    except (SafetensorError, OSError) as exc:
        raise UnsupportedInputError(
            f"expected a readable .safetensors file at {path}, got an error: {exc}") from exc


def format_table(rows: list[LayerReport]) -> str:
    header = f"{'layer':<40} {'shape':>12} {'scheme':>6} {'bits/param':>10} {'SQNR dB':>8} {'max rel err':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.name:<40} {shape:>12} {r.scheme:>6} {r.bits_per_param:>10.3f} "
                     f"{r.sqnr_db:>8.2f} {r.max_rel_error:>11.4f}")
    total_q = sum(r.quantized_bytes for r in rows)
    total_o = sum(r.original_bytes for r in rows)
    lines.append("-" * len(header))
    lines.append(f"{len(rows)} layers: {total_o / 2**20:.2f} MiB -> {total_q / 2**20:.2f} MiB "
                 f"({total_o / max(total_q, 1):.2f}x smaller)")
    return "\n".join(lines)
