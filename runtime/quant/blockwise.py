"""Block-wise quantization: 4-bit NF4/FP4 (with optional double quant) and the 8-bit dynamic format.

Numerics follow bitsandbytes' reference kernels exactly: per-block absmax over the flattened tensor,
full blocks scaled by a float32 reciprocal, the partial last block divided by its (clamped) absmax,
nearest code with ties to the lower code, element 2i in the high nibble.
"""

from __future__ import annotations

import torch

from kbitc.runtime.errors import NonFiniteWeightError, UnsupportedInputError, expect
from kbitc.runtime.quant.codebooks import (
    NearestCodeEncoder, QUANT_TYPES_4BIT, code_4bit, dynamic_map, encoder_4bit, encoder_for,
)
from kbitc.runtime.quant.state import (
    ALLOWED_BLOCKSIZES_4BIT, NESTED_BLOCKSIZE, NestedAbsmax, QuantState, dtype_name,
)

FLOAT_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALLOWED_BLOCKSIZES_8BIT = ALLOWED_BLOCKSIZES_4BIT
_CHUNK = 1 << 20  # elements per step: a multiple of every blocksize, small enough to stay in cache
_TINY = 1e-38  # bitsandbytes clamps absmax to this before taking its reciprocal


def check_float_input(x: torch.Tensor, what: str) -> None:
    expect(isinstance(x, torch.Tensor), UnsupportedInputError,
           f"expected {what} as a torch.Tensor, got {type(x).__name__}")
    expect(x.dtype in FLOAT_INPUT_DTYPES, UnsupportedInputError,
           f"expected {what} as float32, float16 or bfloat16, got {dtype_name(x.dtype)}; "
           "convert it with .float() first (integer tensors are already quantized)")
    expect(x.numel() > 0, UnsupportedInputError, f"expected a non-empty {what}, got shape {list(x.shape)}")


def check_blocksize(blocksize: int, allowed: tuple[int, ...]) -> None:
    expect(isinstance(blocksize, int) and blocksize in allowed, UnsupportedInputError,
           f"expected blocksize to be a power of two in {allowed[0]}..{allowed[-1]}, got {blocksize!r}")


def _raise_non_finite(absmax: torch.Tensor, blocksize: int, what: str) -> None:
    bad = torch.nonzero(~torch.isfinite(absmax)).flatten()
    if bad.numel():
        first = int(bad[0]) * blocksize
        raise NonFiniteWeightError(
            f"expected finite values in {what}, found NaN or Inf in {bad.numel()} block(s), the first "
            f"within flat elements {first}..{first + blocksize - 1}; fix or mask the tensor before quantizing"
        )


def _encode_blocks(flat: torch.Tensor, blocksize: int, encoder: NearestCodeEncoder, what: str,
                   sink) -> torch.Tensor:
    """Scale each block by its absmax and encode it; `sink(start, stop, codes)` stores the codes.

    Returns the float32 absmax per block (the partial last block's is clamped to 1e-38).
    """
    n = flat.numel()
    full = n - n % blocksize
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    for start in range(0, full, _CHUNK):
        stop = min(start + _CHUNK, full)
        block = flat[start:stop].float().view(-1, blocksize)
        block_absmax = block.abs().amax(dim=1)
        absmax[start // blocksize: stop // blocksize] = block_absmax
        scaled = block * (1.0 / block_absmax.clamp(min=_TINY)).unsqueeze(1)
        sink(start, stop, encoder.encode(scaled.view(-1)))
    if full < n:
        tail = flat[full:].float()
        tail_absmax = tail.abs().max().clamp(min=_TINY)
        absmax[-1] = tail_absmax
        sink(full, n, encoder.encode(tail / tail_absmax))
    if not bool(torch.isfinite(absmax).all()):
        _raise_non_finite(absmax, blocksize, what)
    return absmax


# -- 8-bit block-wise (dynamic map): optimizer states and the nested absmax ---------------------

def quantize_blockwise(x: torch.Tensor, blocksize: int = 256, signed: bool = True,
                       code: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit block-wise quantization: (uint8 codes shaped like x, float32 absmax per block)."""
    check_float_input(x, "the tensor to quantize")
    check_blocksize(blocksize, ALLOWED_BLOCKSIZES_8BIT)
    code = dynamic_map(signed) if code is None else code
    flat = x.reshape(-1)
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=x.device)

    def store(start: int, stop: int, q: torch.Tensor) -> None:
        codes[start:stop] = q

    absmax = _encode_blocks(flat, blocksize, encoder_for(code), "the tensor to quantize", store)
    return codes.view(x.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256,
                         signed: bool = True, dtype: torch.dtype = torch.float32,
                         code: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of quantize_blockwise: code[q] * absmax[block], computed in float32, cast to dtype."""
    expect(q.dtype == torch.uint8, UnsupportedInputError,
           f"expected uint8 codes, got {dtype_name(q.dtype)}")
    check_blocksize(blocksize, ALLOWED_BLOCKSIZES_8BIT)
    blocks = -(-q.numel() // blocksize)
    expect(absmax.numel() == blocks, UnsupportedInputError,
           f"expected {blocks} absmax values for {q.numel()} codes at blocksize {blocksize}, "
           f"got {absmax.numel()}")
    code = (dynamic_map(signed) if code is None else code).to(q.device)
    values = code[q.reshape(-1).long()]
    return _scale_blocks(values, absmax.float(), blocksize).view(q.shape).to(dtype)


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = values.numel()
    pad = (-n) % blocksize
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    return (values.view(-1, blocksize) * absmax.view(-1, 1)).view(-1)[:n]


# -- 4-bit NF4 / FP4 --------------------------------------------------------------------------

def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """Quantize `w` to packed 4-bit codes (uint8, (numel + 1) // 2 bytes) and its QuantState."""
    check_float_input(w, "the weight")
    expect(quant_type in QUANT_TYPES_4BIT, UnsupportedInputError,
           f"expected quant_type 'nf4' or 'fp4', got {quant_type!r}")
    check_blocksize(blocksize, ALLOWED_BLOCKSIZES_4BIT)
    encoder = encoder_4bit(quant_type)
    flat = w.reshape(-1)
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    zero_code = encoder.encode(torch.zeros(1, device=w.device))

    def store(start: int, stop: int, q: torch.Tensor) -> None:
        if q.numel() % 2:  # only the very end of an odd-sized tensor: pad with the code of 0.0
            q = torch.cat([q, zero_code])
        packed[start // 2: (stop + 1) // 2] = (q[0::2] << 4) | q[1::2]

    absmax = _encode_blocks(flat, blocksize, encoder, "the weight", store)
    nested = None
    if double_quant:
        offset = absmax.mean()
        absmax, absmax2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE, signed=True)
        nested = NestedAbsmax(absmax2=absmax2, code=dynamic_map(True, w.device), offset=float(offset))
    state = QuantState(quant_type=quant_type, blocksize=blocksize, shape=tuple(w.shape),
                       dtype=w.dtype, absmax=absmax, code=code_4bit(quant_type, w.device), nested=nested)
    return packed, state


def absmax_of(state: QuantState) -> torch.Tensor:
    """The float32 absmax per 4-bit block, decoding the double quantization if present."""
    if state.nested is None:
        return state.absmax
    nested = state.nested
    decoded = dequantize_blockwise(state.absmax, nested.absmax2, nested.blocksize, code=nested.code)
    return decoded + nested.offset


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 codes 0..15, one per element (high nibble first)."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).view(-1)[:numel]


def dequantize_4bit(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Inverse of quantize_4bit: code[q] * absmax[block] in float32, cast to state.dtype."""
    expect(isinstance(state, QuantState), UnsupportedInputError,
           f"expected a kbitc QuantState, got {type(state).__name__}")
    state.validate(packed)
    codes = unpack_4bit(packed, state.numel)
    values = state.code.to(packed.device)[codes.long()]
    absmax = absmax_of(state.to(packed.device))
    return _scale_blocks(values, absmax, state.blocksize).view(state.shape).to(state.dtype)
