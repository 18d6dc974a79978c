"""Which generated kernel serves an op call: a registry filled when kernel libraries load.

Ops look up (op, device type, activation dtype, quant type, blocksize); a miss means the
pure-PyTorch reference runs. Loading a library for a target this machine cannot run is refused.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from kbitc.runtime.errors import KbitcError
from kbitc.runtime.kernel_spec import KernelSpec
from kbitc.runtime.library import KernelLibrary

DTYPE_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

_REGISTRY: dict[tuple, tuple[KernelLibrary, KernelSpec]] = {}


class TargetUnavailableError(KbitcError):
    """Kernels were built for a target (CPU ISA or GPU architecture) this machine cannot run."""


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


AVX512_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
AVX512_BF16_FLAGS = AVX512_FLAGS | {"avx512_bf16", "avx512_vnni"}


def native_cpu_target() -> str:
    """The best CPU target this machine runs: cpu_avx512_bf16, cpu_avx512 or cpu_avx2."""
    flags = cpu_flags()
    if AVX512_BF16_FLAGS <= flags:
        return "cpu_avx512_bf16"
    return "cpu_avx512" if AVX512_FLAGS <= flags else "cpu_avx2"


def check_target_runs_here(target: str) -> None:
    if target in ("cpu_avx512", "cpu_avx512_bf16") and not AVX512_FLAGS <= cpu_flags():
        raise TargetUnavailableError(
            f"kernels were built for {target} but this CPU lacks AVX-512 (F/BW/VL/DQ); "
            "compile with --target cpu-avx2")
    if target == "cpu_avx512_bf16" and not AVX512_BF16_FLAGS <= cpu_flags():
        missing = ", ".join(sorted(AVX512_BF16_FLAGS - cpu_flags()))
        raise TargetUnavailableError(
            f"kernels were built for cpu_avx512_bf16 but this CPU lacks {missing} (AVX512_BF16 / AVX512_VNNI); "
            "compile with --target cpu-avx512 (or --target cpu for this machine's best ISA)")
    if target == "cpu_avx2" and not {"avx2", "fma", "f16c"} <= cpu_flags():
        raise TargetUnavailableError("kernels were built for cpu_avx2 but this CPU lacks AVX2/FMA/F16C")
    if target.startswith("sm"):
        if not torch.cuda.is_available():
            raise TargetUnavailableError(f"kernels were built for {target} but no CUDA GPU is available")
        major, minor = torch.cuda.get_device_capability()
        if f"sm{major}{minor}" != target:
            raise TargetUnavailableError(
                f"kernels were built for {target} but the GPU is sm{major}{minor}; compile with "
                f"--target sm{major}{minor} (machine code is built for exactly one architecture)")


def _key(op: str, device_type: str, dtype: str, quant_type: str, blocksize: int) -> tuple:
    return (op, device_type, dtype, quant_type, blocksize)


def register_library(library: KernelLibrary) -> None:
    """Route op calls matching the library's specs to its kernels."""
    for spec in library.specs.values():
        check_target_runs_here(spec.target)
    for spec in library.specs.values():
        _REGISTRY[_key(spec.op, spec.device_type, spec.dtype, spec.quant_type, spec.blocksize)] = (library, spec)


def unregister_all() -> None:
    _REGISTRY.clear()


def lookup(op: str, device: torch.device, dtype: torch.dtype, quant_type: str = "",
           blocksize: int = 0) -> Optional[tuple[KernelLibrary, KernelSpec]]:
    short = DTYPE_SHORT.get(dtype)
    if short is None:
        return None
    return _REGISTRY.get(_key(op, device.type, short, quant_type, blocksize))
