"""Pure-PyTorch kernel for every kbitc op: the CPU fallback and the test oracle.

Built from kbitc.quant, so every generated kernel is checked against the same numerics.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from kbitc.runtime.quant import blockwise, int8
from kbitc.runtime.quant.codebooks import encoder_for
from kbitc.runtime.quant.state import NestedAbsmax, QuantState


def block_scales(absmax: torch.Tensor, absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor],
                 offset: float) -> torch.Tensor:
    """float32 scale per 4-bit block (decoding a double-quantized uint8 absmax)."""
    if absmax.dtype != torch.uint8:
        return absmax
    return blockwise.dequantize_blockwise(absmax, absmax2, 256, code=code2) + offset


def dequantize_4bit(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                    absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: float,
                    blocksize: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= int(s)
    codes = blockwise.unpack_4bit(packed, n)
    values = code[codes.long()]
    scales = block_scales(absmax, absmax2, code2, offset)
    return blockwise._scale_blocks(values, scales, blocksize).view(tuple(shape)).to(dtype)


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: float,
                bias: Optional[torch.Tensor], blocksize: int, out_features: int) -> torch.Tensor:
    k = x.shape[-1]
    w = dequantize_4bit(packed, code, absmax, absmax2, code2, offset, blocksize, (out_features, k),
                        torch.float32)
    b = None if bias is None else bias.float()
    return torch.nn.functional.linear(x.float(), w, b).to(x.dtype)


def quantize_4bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1)
    n = flat.numel()
    encoder = encoder_for(code)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    zero = encoder.encode(torch.zeros(1, device=x.device))

    def store(start: int, stop: int, q: torch.Tensor) -> None:
        if q.numel() % 2:
            q = torch.cat([q, zero])
        packed[start // 2: (stop + 1) // 2] = (q[0::2] << 4) | q[1::2]

    absmax = blockwise._encode_blocks(flat, blocksize, encoder, "the tensor to quantize", store)
    return packed, absmax


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    return blockwise.quantize_blockwise(x, blocksize=blocksize, code=code)


def dequantize_blockwise(q: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                         dtype: torch.dtype) -> torch.Tensor:
    return blockwise.dequantize_blockwise(q, absmax, blocksize, code=code, dtype=dtype)


def int8_quant(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, rowmax, mask = int8.int8_quantize_activations(x, threshold)
    return codes, rowmax, mask.to(torch.uint8)


def int8_linear(x: torch.Tensor, w: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor],
                threshold: float) -> torch.Tensor:
    return int8.int8_linear(x, w, scb, bias, threshold)


def linear_4bit_grad_input(grad_out: torch.Tensor, packed: torch.Tensor, code: torch.Tensor,
                           absmax: torch.Tensor, absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor],
                           offset: float, blocksize: int, in_features: int) -> torch.Tensor:
    """grad_x = grad_out @ W_hat (float32 W_hat and accumulation, cast to grad_out's dtype)."""
    n = grad_out.shape[-1]
    w = dequantize_4bit(packed, code, absmax, absmax2, code2, offset, blocksize, (n, in_features), torch.float32)
    return (grad_out.float() @ w).to(grad_out.dtype)


def int8_weight_dequant(w: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """float32 W_hat[n, k] = w[n, k] * (scb[n] / 127): kbitc.quant.int8_vectorwise_dequant."""
    return int8.int8_vectorwise_dequant(w, scb)


def int8_linear_grad_input(grad_out: torch.Tensor, w: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """grad_x = grad_out @ W_hat, W_hat the whole dequantized int8 weight (outlier columns included)."""
    return (grad_out.float() @ int8_weight_dequant(w, scb)).to(grad_out.dtype)


def quant_state_args(state: QuantState) -> tuple:
    """(code, absmax, absmax2, code2, offset) of a QuantState, as the 4-bit ops take them."""
    nested: Optional[NestedAbsmax] = state.nested
    if nested is None:
        return state.code, state.absmax, None, None, 0.0
    return state.code, state.absmax, nested.absmax2, nested.code, nested.offset
