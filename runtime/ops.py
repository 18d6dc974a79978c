"""Every kbitc op schema in ONE place (torch.library), with fake kernels and device dispatch.

The default implementation is the pure-PyTorch reference (runtime/reference.py). On CPU and CUDA,
a call is routed to a generated kernel when a loaded library has one for its (dtype, quant type,
blocksize) (runtime/dispatch.py). Codebooks and scales are op inputs. Ops are opaque to
torch.compile / torch.export (no graph breaks) and launch without host synchronization.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from kbitc.runtime import dispatch, reference
from kbitc.runtime.errors import UnsupportedInputError, expect

_DEVICES = ("cpu", "cuda")


def _same_device(what: str, *tensors: Optional[torch.Tensor]) -> None:
    devices = {t.device for t in tensors if t is not None}
    expect(len(devices) <= 1, UnsupportedInputError,
           f"expected all tensors of {what} on one device, got {sorted(map(str, devices))}; move them with .to()")


def _check_4bit(op: str, packed, code, absmax, absmax2, code2, n_elements: int, blocksize: int) -> None:
    _same_device(op, packed, code, absmax, absmax2, code2)
    expect(packed.dtype == torch.uint8 and packed.numel() == (n_elements + 1) // 2, UnsupportedInputError,
           f"{op}: expected {(n_elements + 1) // 2} packed uint8 bytes for {n_elements} weights, got "
           f"{packed.numel()} {packed.dtype}; the packed weight does not match its QuantState")
    blocks = -(-n_elements // blocksize)
    expect(absmax.numel() == blocks and absmax.dtype in (torch.float32, torch.uint8), UnsupportedInputError,
           f"{op}: expected {blocks} float32 (or double-quantized uint8) absmax values, got "
           f"{absmax.numel()} {absmax.dtype}")
    expect(absmax.dtype != torch.uint8 or (absmax2 is not None and code2 is not None), UnsupportedInputError,
           f"{op}: a double-quantized (uint8) absmax needs absmax2 and code2")
    expect(code.numel() == 16 and code.dtype == torch.float32, UnsupportedInputError,
           f"{op}: expected a float32 codebook of 16 entries, got {code.numel()} {code.dtype}")


def _scale_inputs(absmax, absmax2, code2):
    """Kernel slots (absmax f32 | NULL, absmax_q u8 | NULL, absmax2, code2)."""
    if absmax.dtype == torch.uint8:
        return [None, absmax, absmax2, code2]
    return [absmax, None, None, None]


def _sorted_code(code: torch.Tensor):
    values, order = torch.sort(code, stable=True)
    return ((values[:-1] + values[1:]) / 2).contiguous(), order.to(torch.uint8)


# -- 4-bit ------------------------------------------------------------------------------------

@torch.library.custom_op("kbitc::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                    absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: float,
                    quant_type: str, blocksize: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= int(s)
    _check_4bit("dequantize_4bit", packed, code, absmax, absmax2, code2, n, blocksize)
    found = dispatch.lookup("dequantize_4bit", packed.device, dtype, quant_type, blocksize)
    if found is None:
        return reference.dequantize_4bit(packed, code, absmax, absmax2, code2, offset, blocksize, shape, dtype)
    library, spec = found
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    library.call(spec, [packed, code] + _scale_inputs(absmax, absmax2, code2), [out], [n], [offset])
    return out


@dequantize_4bit.register_fake
def _(packed, code, absmax, absmax2, code2, offset, quant_type, blocksize, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.custom_op("kbitc::linear_4bit", mutates_args=())
def linear_4bit(x: torch.Tensor, packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: float,
                bias: Optional[torch.Tensor], quant_type: str, blocksize: int, out_features: int) -> torch.Tensor:
    """x @ W^T + bias with W [out_features, in_features] stored as packed 4-bit codes."""
    k = x.shape[-1]
    _check_4bit("linear_4bit", packed, code, absmax, absmax2, code2, out_features * k, blocksize)
    _same_device("linear_4bit", x, packed, bias)
    expect(bias is None or (bias.numel() == out_features and bias.dtype == x.dtype), UnsupportedInputError,
           f"linear_4bit: expected a bias of {out_features} {x.dtype} values, got "
           f"{None if bias is None else (bias.numel(), bias.dtype)}")
    found = dispatch.lookup("linear_4bit", x.device, x.dtype, quant_type, blocksize)
    if found is None:
        return reference.linear_4bit(x, packed, code, absmax, absmax2, code2, offset, bias, blocksize, out_features)
    library, spec = found
    rows = x.reshape(-1, k).contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    library.call(spec, [rows, packed, code] + _scale_inputs(absmax, absmax2, code2) + [bias], [out],
                 [rows.shape[0], out_features, k], [offset])
    return out.view(*x.shape[:-1], out_features)


@linear_4bit.register_fake
def _(x, packed, code, absmax, absmax2, code2, offset, bias, quant_type, blocksize, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("kbitc::quantize_4bit", mutates_args=())
def quantize_4bit(x: torch.Tensor, code: torch.Tensor, quant_type: str, blocksize: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [(n+1)//2], float32 absmax per block); double quant composes quantize_blockwise."""
    _same_device("quantize_4bit", x, code)
    found = dispatch.lookup("quantize_4bit", x.device, x.dtype, quant_type, blocksize)
    if found is None:
        return reference.quantize_4bit(x, code, blocksize)
    library, spec = found
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    midpoints, order = _sorted_code(code)
    library.call(spec, [flat, midpoints, order], [packed, absmax], [n])
    return packed, absmax


@quantize_4bit.register_fake
def _(x, code, quant_type, blocksize):
    n = x.numel()
    return x.new_empty((n + 1) // 2, dtype=torch.uint8), x.new_empty(-(-n // blocksize), dtype=torch.float32)


# -- 8-bit block-wise -------------------------------------------------------------------------

@torch.library.custom_op("kbitc::quantize_blockwise", mutates_args=())
def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    _same_device("quantize_blockwise", x, code)
    found = dispatch.lookup("quantize_blockwise", x.device, x.dtype, "", blocksize)
    if found is None or not bool((code[1:] >= code[:-1]).all()):
        return reference.quantize_blockwise(x, code, blocksize)
    library, spec = found
    flat = x.reshape(-1).contiguous()
    q = torch.empty(flat.numel(), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-flat.numel() // blocksize), dtype=torch.float32, device=x.device)
    midpoints, _ = _sorted_code(code)
    library.call(spec, [flat, midpoints], [q, absmax], [flat.numel()])
    return q.view(x.shape), absmax


@quantize_blockwise.register_fake
def _(x, code, blocksize):
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(-(-x.numel() // blocksize), dtype=torch.float32)


@torch.library.custom_op("kbitc::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(q: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                         dtype: torch.dtype) -> torch.Tensor:
    _same_device("dequantize_blockwise", q, code, absmax)
    found = dispatch.lookup("dequantize_blockwise", q.device, dtype, "", blocksize)
    if found is None:
        return reference.dequantize_blockwise(q, code, absmax, blocksize, dtype)
    library, spec = found
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    library.call(spec, [q.contiguous(), code, absmax], [out], [q.numel()])
    return out


@dequantize_blockwise.register_fake
def _(q, code, absmax, blocksize, dtype):
    return q.new_empty(q.shape, dtype=dtype)


# -- LLM.int8() -------------------------------------------------------------------------------

@torch.library.custom_op("kbitc::int8_quant", mutates_args=())
def int8_quant(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise int8 of activations [rows, cols]: (codes, float32 rowmax, uint8 outlier-column mask)."""
    expect(x.dim() == 2, UnsupportedInputError, f"int8_quant: expected a 2-D tensor, got shape {list(x.shape)}")
    found = dispatch.lookup("int8_quant", x.device, x.dtype)
    if found is None:
        return reference.int8_quant(x, threshold)
    library, spec = found
    rows, cols = x.shape
    codes = torch.empty(rows, cols, dtype=torch.int8, device=x.device)
    rowmax = torch.empty(rows, dtype=torch.float32, device=x.device)
    mask = torch.empty(cols, dtype=torch.uint8, device=x.device)
    library.call(spec, [x.contiguous()], [codes, rowmax, mask], [rows, cols], [threshold])
    return codes, rowmax, mask


@int8_quant.register_fake
def _(x, threshold):
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32),
            x.new_empty(x.shape[1], dtype=torch.uint8))


@torch.library.custom_op("kbitc::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, w: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor],
                threshold: float) -> torch.Tensor:
    """LLM.int8() linear: int8 x int8 -> int32 for inlier features, 16/32-bit for outlier columns."""
    k = x.shape[-1]
    _same_device("int8_linear", x, w, scb, bias)
    expect(w.dtype == torch.int8 and w.dim() == 2 and w.shape[1] == k and scb.numel() == w.shape[0],
           UnsupportedInputError,
           f"int8_linear: expected int8 weight [out, {k}] and one scale per row, got {w.dtype} "
           f"{list(w.shape)} and {scb.numel()} scales")
    found = dispatch.lookup("int8_linear", x.device, x.dtype)
    if found is None:
        return reference.int8_linear(x, w, scb, bias, threshold)
    library, spec = found
    rows = x.reshape(-1, k).contiguous()
    m, n = rows.shape[0], w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    workspace = [torch.empty(m, k, dtype=torch.int8, device=x.device),
                 torch.empty(m, dtype=torch.float32, device=x.device),
                 torch.empty(k, dtype=torch.uint8, device=x.device)]
    library.call(spec, [rows, w, scb, bias], [out] + workspace, [m, n, k], [threshold])
    return out.view(*x.shape[:-1], n)


@int8_linear.register_fake
def _(x, w, scb, bias, threshold):
    return x.new_empty(*x.shape[:-1], w.shape[0])


ALL_OPS = (dequantize_4bit, linear_4bit, quantize_4bit, quantize_blockwise, dequantize_blockwise,
           int8_quant, int8_linear)
