"""The 8-bit optimizer step in pure PyTorch: the fallback without a kernel toolchain and the oracle
the fused kernels are tested against (docs/kernel_abi.md "optim_8bit").

A step is: dequantize the state blocks (code[q] * absmax), update state and parameter in float32,
requantize the new state block-wise with nearest-code encoding. Every float32 operation is a
separate PyTorch op (one rounding each, never an fma), in the order the kernels use, so a fused
kernel matches this bit for bit. The hyperparameters enter as float32 constants that `hyperparams`
derives once per step in float64 (bias corrections included), exactly as the kernels receive them.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional

import torch

from kbitc.runtime.quant.blockwise import quantize_blockwise
from kbitc.runtime.quant.codebooks import dynamic_map

KINDS = ("adam", "lion", "momentum")
TWO_STATE = {"adam": True, "lion": False, "momentum": False}
BLOCKSIZE = 256  # bitsandbytes' block size for 8-bit optimizer state
# hparams slots (a float64[8] the kernels read on the host; every value is a float32 number)
H_B1, H_OMB1, H_B2, H_OMB2, H_EPS, H_STEP, H_WD, H_FIRST = range(8)


def _f32(x: float) -> float:
    """x rounded to the nearest float32 (as a Python float; struct rounds to nearest even, and is
    ~100x cheaper than a tensor round trip, which matters for per-step host overhead)."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass(frozen=True)
class Hyper:
    """One step's float32 constants (see `hyperparams`)."""

    values: tuple[float, ...]

    def __getitem__(self, i: int) -> float:
        return self.values[i]

    def tensor(self) -> torch.Tensor:
        """The host float64[8] the kernels take as their `hparams` input."""
        return torch.tensor(self.values, dtype=torch.float64)


def hyperparams(kind: str, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                step: int) -> Hyper:
    """Per-step constants, computed in float64 and rounded once to float32.

    adam:     step = -lr * sqrt(1 - beta2^t) / (1 - beta1^t), eps = eps * sqrt(1 - beta2^t),
              wd slot = 1 - lr * weight_decay (decoupled decay, as bitsandbytes' Adam8bit/AdamW8bit)
    lion:     step = -lr, wd slot = 1 - lr * weight_decay (decoupled)
    momentum: step = -lr, wd slot = weight_decay (L2: added to the gradient), first = (t == 1)
    """
    h = [0.0] * 8
    h[H_B1], h[H_OMB1] = beta1, 1.0 - beta1
    h[H_B2], h[H_OMB2] = beta2, 1.0 - beta2
    if kind == "adam":
        c1 = 1.0 - beta1 ** step
        c2 = math.sqrt(1.0 - beta2 ** step)
        h[H_STEP] = -lr * c2 / c1
        h[H_EPS] = eps * c2
        h[H_WD] = 1.0 - lr * weight_decay
    elif kind == "lion":
        h[H_STEP] = -lr
        h[H_WD] = 1.0 - lr * weight_decay
    elif kind == "momentum":
        h[H_STEP] = -lr
        h[H_WD] = weight_decay
        h[H_FIRST] = 1.0 if step == 1 else 0.0
    else:
        raise ValueError(f"unknown optimizer kind {kind!r}")
    return Hyper(tuple(_f32(v) for v in h))


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (the kernels' sqrt). torch's CPU float32 sqrt is not: it differs
    from the IEEE result in the last bit for ~16% of inputs; float64 sqrt rounded to float32 is exact."""
    return torch.sqrt(x.double()).float()


def update_fp32(kind: str, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: Optional[torch.Tensor],
                h: Hyper) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(new p, new m, new v) from float32 p, g, m, v: the exact per-element arithmetic of the kernels."""
    if kind == "adam":
        m = torch.add(torch.mul(m, h[H_B1]), torch.mul(g, h[H_OMB1]))
        v = torch.add(torch.mul(v, h[H_B2]), torch.mul(torch.mul(g, g), h[H_OMB2]))
        if h[H_WD] != 1.0:
            p = torch.mul(p, h[H_WD])
        update = torch.div(m, torch.add(sqrt_rn(v), h[H_EPS]))
        p = torch.add(p, torch.mul(update, h[H_STEP]))
    elif kind == "lion":
        if h[H_WD] != 1.0:
            p = torch.mul(p, h[H_WD])
        direction = torch.sign(torch.add(torch.mul(m, h[H_B1]), torch.mul(g, h[H_OMB1])))
        p = torch.add(p, torch.mul(direction, h[H_STEP]))
        m = torch.add(torch.mul(m, h[H_B2]), torch.mul(g, h[H_OMB2]))
    elif kind == "momentum":
        if h[H_WD] != 0.0:
            g = torch.add(g, torch.mul(p, h[H_WD]))
        m = g.clone() if h[H_FIRST] != 0.0 else torch.add(torch.mul(m, h[H_B1]), g)
        p = torch.add(p, torch.mul(m, h[H_STEP]))
    else:
        raise ValueError(f"unknown optimizer kind {kind!r}")
    return p, m, v


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """float32 state from uint8 codes and per-block absmax: code[q] * absmax[block]."""
    n = codes.numel()
    code = dynamic_map(signed, codes.device)
    values = code[codes.reshape(-1).long()]
    scale = absmax.repeat_interleave(BLOCKSIZE)[:n]
    return torch.mul(values, scale)


def step_8bit(kind: str, param: torch.Tensor, grad: torch.Tensor, state1: torch.Tensor, absmax1: torch.Tensor,
              state2: Optional[torch.Tensor], absmax2: Optional[torch.Tensor], h: Hyper) -> None:
    """One step on 8-bit state, in place (param, codes and absmax), as the fused kernel does it."""
    p = param.detach().reshape(-1).float()
    g = grad.reshape(-1).float()
    m = dequantize_state(state1, absmax1, signed=True)
    v = dequantize_state(state2, absmax2, signed=False) if TWO_STATE[kind] else None
    p, m, v = update_fp32(kind, p, g, m, v, h)
    param.detach().copy_(p.view(param.shape))
    q1, a1 = quantize_blockwise(m, BLOCKSIZE, signed=True)
    state1.view(-1).copy_(q1)
    absmax1.copy_(a1)
    if v is not None:
        q2, a2 = quantize_blockwise(v, BLOCKSIZE, signed=False)
        state2.view(-1).copy_(q2)
        absmax2.copy_(a2)


def step_32bit(kind: str, param: torch.Tensor, grad: torch.Tensor, state1: torch.Tensor,
               state2: Optional[torch.Tensor], h: Hyper) -> None:
    """One step on float32 state (small tensors, optim_bits=32), in place."""
    p, m, v = update_fp32(kind, param.detach().float(), grad.float(), state1, state2, h)
    param.detach().copy_(p)
    state1.copy_(m)
    if v is not None:
        state2.copy_(v)
