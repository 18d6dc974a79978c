"""Paged optimizer state: CUDA managed memory (cudaMallocManaged) that the driver pages between GPU
and host under memory pressure, prefetched to the GPU before each step (as bitsandbytes' paged
optimizers). On CPU there is nothing to page: the paged optimizers warn once and keep plain memory.

Managed tensors come from a torch.cuda.MemPool over a CUDAPluggableAllocator whose malloc / free are
in a tiny generated CUDA library (codegen_templates/cuda/paged_memory.cu.j2), built once and cached
like the kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
import warnings

import torch

from kbitc.runtime.errors import KbitcError

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "lib" -> ctypes.CDLL; "path"; "pools" -> {device index: MemPool}


class PagedMemoryWarning(UserWarning):
    """Paged (managed) memory is not available: optimizer state lives in ordinary memory."""


def build(arch: str) -> str:
    """Path of the managed-memory library for a CUDA architecture ("90"), built on a cache miss."""
    from kbitc.compiler.codegen import _environment
    from kbitc.runtime.build import build_library

    env = _environment()
    source = env.get_template("cuda/paged_memory.cu.j2").render()
    name = "kbitc_paged_" + hashlib.sha256(source.encode()).hexdigest()[:16]
    sources = {"paged_memory.cu": source}
    sources["CMakeLists.txt"] = env.get_template("common/CMakeLists.txt.j2").render(
        module_name=name, sources=["paged_memory.cu"], cuda_arch=arch, cpu_flags=[])
    return str(build_library(name, sources, is_cuda=True, spec_names=["paged_memory"]))


def _library():
    with _LOCK:
        if "lib" not in _STATE:
            major, minor = torch.cuda.get_device_capability()
            path = build(f"{major}{minor}")
            lib = ctypes.CDLL(path)
            lib.kbitc_prefetch.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
            lib.kbitc_prefetch.restype = ctypes.c_int
            lib.kbitc_is_managed.argtypes = [ctypes.c_void_p]
            lib.kbitc_is_managed.restype = ctypes.c_int
            _STATE.update(lib=lib, path=path, pools={})
        return _STATE["lib"]


def _pool(device: torch.device):
    lib = _library()
    index = device.index if device.index is not None else torch.cuda.current_device()
    pools = _STATE["pools"]
    if index not in pools:
        allocator = torch.cuda.memory.CUDAPluggableAllocator(_STATE["path"], "kbitc_managed_malloc",
                                                             "kbitc_managed_free")
        pools[index] = torch.cuda.MemPool(allocator.allocator())
    return pools[index], lib


def zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor in CUDA managed memory on `device` (ordinary memory, with a warning, if that fails)."""
    try:
        pool, _ = _pool(device)
        with torch.cuda.use_mem_pool(pool, device=device):
            return torch.zeros(shape, dtype=dtype, device=device)
    except (KbitcError, AttributeError, RuntimeError, OSError) as exc:
        warnings.warn(f"kbitc.optim: CUDA managed memory is unavailable ({exc}); paged optimizer state "
                      "uses ordinary device memory", PagedMemoryWarning, stacklevel=3)
        return torch.zeros(shape, dtype=dtype, device=device)


def prefetch(t: torch.Tensor) -> None:
    """Queue a migration of t's memory to its GPU on the current stream (no-op for non-managed memory)."""
    lib = _STATE.get("lib")
    if lib is None or t.device.type != "cuda" or lib.kbitc_is_managed(t.data_ptr()) != 1:
        return
    stream = torch.cuda.current_stream(t.device).cuda_stream
    status = lib.kbitc_prefetch(t.data_ptr(), t.numel() * t.element_size(), t.device.index, stream)
    if status != 0:
        raise KbitcError(f"cudaMemPrefetchAsync of optimizer state failed (cudaError {status})")


def is_managed(t: torch.Tensor) -> bool:
    """True if t lives in CUDA managed memory."""
    if t.device.type != "cuda":
        return False
    return _library().kbitc_is_managed(t.data_ptr()) == 1
