"""The fused optimizer-step kernels: built lazily on the first step for a device, cached per process.

One library per target holds every update rule for every supported param dtype (3 kinds x 2-3
dtypes), so a process builds at most one CPU and one CUDA library (then the content-hash cache in
KBITC_CACHE_DIR serves later processes). Without a toolchain the optimizers fall back to the
pure-PyTorch reference step (runtime/optim/reference.py) with one warning.
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional

import torch

from kbitc.runtime.kernel_spec import CPU_ACT_DTYPES, CUDA_ACT_DTYPES, KernelSpec
from kbitc.runtime.library import KernelError
from kbitc.runtime.optim.reference import BLOCKSIZE, KINDS, Hyper, TWO_STATE
from kbitc.runtime.quant.codebooks import dynamic_map, encoder_dynamic

DTYPE_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_LIBRARIES: dict[str, object] = {}  # target -> KernelLibrary, or None when the toolchain is missing
_TABLES: dict[torch.device, tuple[torch.Tensor, ...]] = {}
_LOCK = threading.Lock()


class KernelFallbackWarning(UserWarning):
    """The fused optimizer kernels could not be built here; the (slower) reference step runs."""


def target_for(device: torch.device) -> str:
    from kbitc.runtime.dispatch import native_cpu_target

    if device.type == "cpu":
        return native_cpu_target()
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def specs_for(target: str) -> list[KernelSpec]:
    dtypes = CPU_ACT_DTYPES if target.startswith("cpu") else CUDA_ACT_DTYPES
    return [KernelSpec("optim_8bit", target, d, kind, BLOCKSIZE) for kind in KINDS for d in dtypes]


def library_for(device: torch.device):
    """The KernelLibrary for this device's target, building it on first use; None without a toolchain."""
    target = target_for(device)
    with _LOCK:
        if target not in _LIBRARIES:
            from kbitc.compiler.kernels import build_kernels
            from kbitc.runtime.build import ToolchainMissingError

            try:
                _LIBRARIES[target] = build_kernels(specs_for(target), register=False)
            except ToolchainMissingError as exc:
                warnings.warn(f"kbitc.optim: no kernel toolchain for {target} ({exc}); using the pure-PyTorch "
                              "reference step (same numerics, slower)", KernelFallbackWarning, stacklevel=3)
                _LIBRARIES[target] = None
        return _LIBRARIES[target]


GUESS_ENTRIES = 8192  # sign x 32 exponent slots x 128 mantissa buckets (cuda/optim_8bit.cu.j2 guess_key)


def guess_table(midpoints: torch.Tensor) -> torch.Tensor:
    """uint8[8192]: for each float bucket of the CUDA kernel's guess_key, #{midpoints < the smallest
    float in the bucket}. The nearest-code walk starts there, so the result is exact for any input.

    Key = sign * 4096 + e * 128 + m with e = clamp(biased exponent - 103, 0, 24) and m the top 7
    mantissa bits (0 when e == 0; 127 for every float at or above 2.0, infinities and NaN included).
    """
    key = torch.arange(GUESS_ENTRIES, dtype=torch.int64)
    sign, e, mant = key // 4096, (key % 4096) // 128, key % 128
    exponent = e + 103
    low_bits = (exponent << 23) | (mant << 16)
    high_bits = low_bits | 0xFFFF
    # e == 0 holds every float with a biased exponent <= 103 (zeros and denormals included)
    low_bits = torch.where(e == 0, torch.zeros_like(low_bits), low_bits)
    high_bits = torch.where(e == 0, (torch.full_like(high_bits, 103) << 23) | 0x7FFFFF, high_bits)
    # (e, m) = (24, 127) holds everything from the top bucket of [1, 2) to infinity (and NaN)
    top = (e == 24) & (mant == 127)
    high_bits = torch.where(top, torch.full_like(high_bits, 0x7F800000), high_bits)
    magnitude_low = low_bits.to(torch.int32).view(torch.float32)
    magnitude_high = high_bits.to(torch.int32).view(torch.float32)
    smallest = torch.where(sign == 1, -magnitude_high, magnitude_low)
    guess = torch.searchsorted(midpoints.cpu().float().contiguous(), smallest, side="left")
    unused = ((e == 0) & (mant != 0)) | (e > 24)
    return torch.where(unused, torch.zeros_like(guess), guess).to(torch.uint8)


def _midpoint_table(signed: bool) -> torch.Tensor:
    """float32[2304]: the 255 sorted midpoints, +inf, then the 8192-byte guess table (read by the CUDA
    kernels; CPU kernels read the midpoints only)."""
    mid = encoder_dynamic(signed).midpoints.float()
    table = torch.empty(256 + GUESS_ENTRIES // 4, dtype=torch.float32)
    table[:255] = mid
    table[255] = float("inf")
    table[256:].view(torch.uint8).copy_(guess_table(mid))
    return table


def tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signed map, its midpoint table, unsigned map, its midpoint table) on device."""
    if device not in _TABLES:
        _TABLES[device] = (dynamic_map(True, device), _midpoint_table(True).to(device),
                           dynamic_map(False, device), _midpoint_table(False).to(device))
    return _TABLES[device]


def supported(param: torch.Tensor) -> bool:
    short = DTYPE_SHORT.get(param.dtype)
    allowed = CPU_ACT_DTYPES if param.device.type == "cpu" else CUDA_ACT_DTYPES
    return short in allowed and param.device.type in ("cpu", "cuda")


def fused_step(kind: str, param: torch.Tensor, grad: torch.Tensor, state1: torch.Tensor,
               state2: Optional[torch.Tensor], absmax: torch.Tensor, h: Hyper) -> bool:
    """Run the fused kernel in place; False if no kernel serves this param (the caller falls back).

    absmax is the [states, blocks] float32 buffer whose rows are absmax1 (and absmax2).
    """
    if not supported(param):
        return False
    library = library_for(param.device)
    if library is None:
        return False
    spec = KernelSpec("optim_8bit", target_for(param.device), DTYPE_SHORT[param.dtype], kind, BLOCKSIZE)
    qmap1, mid1, qmap2, mid2 = tables(param.device)
    two = TWO_STATE[kind]
    hparams = h.tensor()  # host memory: the launcher reads it before returning
    inputs = [grad, qmap1, mid1, qmap2 if two else None, mid2 if two else None, hparams]
    outputs = [param, state1, state2 if two else None, absmax]
    stream = torch.cuda.current_stream(param.device).cuda_stream if param.device.type == "cuda" else 0
    # KernelLibrary.call, but with an optional (NULL) output slot: state2 of one-state rules
    status = getattr(library.module, spec.name)(
        [0 if t is None else t.data_ptr() for t in inputs], [0 if t is None else t.data_ptr() for t in outputs],
        [param.numel()], [], stream)
    if status != 0:
        raise KernelError(f"kernel {spec.name} failed (status {status}): {library.module.last_error()}")
    return True
