"""Load a built kernel library and call its kernels on torch tensors.

Kernels are torch-independent (they take pointers, sizes and the CUDA stream), so calling one is:
gather data pointers in slot order (runtime/kernel_spec.py OP_SLOTS), pass them, check the status.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from typing import Optional, Sequence

import torch

from kbitc.runtime.errors import KbitcError
from kbitc.runtime.kernel_spec import KernelSpec


class KernelError(KbitcError):
    """A generated kernel reported a failure."""


class KernelLibrary:
    """One loaded library: `library.call(spec, inputs, outputs, dims, scalars)`."""

    def __init__(self, module_name: str, path: Path, specs: Sequence[KernelSpec]):
        loader = importlib.machinery.ExtensionFileLoader(module_name, str(path))
        module_spec = importlib.util.spec_from_file_location(module_name, str(path), loader=loader)
        self.module = importlib.util.module_from_spec(module_spec)
        loader.exec_module(self.module)
        self.path = path
        self.specs = {s.name: s for s in specs}
        missing = [name for name in self.specs if not hasattr(self.module, name)]
        if missing:
            raise KernelError(f"library {path} lacks kernels {missing}; rebuild it from its sources")
        self._kernels = {name: getattr(self.module, name) for name in self.specs}

    def call(self, spec: KernelSpec, inputs: Sequence[Optional[torch.Tensor]],
             outputs: Sequence[torch.Tensor], dims: Sequence[int], scalars: Sequence[float] = ()) -> None:
        stream = 0
        if spec.device_type == "cuda":  # the raw handle of the current stream (capturable by CUDA graphs)
            stream = torch._C._cuda_getCurrentRawStream(outputs[0].device.index)
        status = self._kernels[spec.name](
            [0 if t is None else t.data_ptr() for t in inputs], [t.data_ptr() for t in outputs],
            [int(d) for d in dims], [float(s) for s in scalars], stream)
        if status != 0:
            raise KernelError(f"kernel {spec.name} failed (status {status}): {self.module.last_error()}")
