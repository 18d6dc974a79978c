"""Render, build and load kernel libraries: the compiler's one call for "kernels for these specs"."""

from __future__ import annotations

from kbitc.compiler.codegen import render_library
from kbitc.runtime import dispatch
from kbitc.runtime.build import build_library
from kbitc.runtime.kernel_spec import KernelSpec
from kbitc.runtime.library import KernelLibrary


def build_kernels(specs: list[KernelSpec], register: bool = True) -> KernelLibrary:
    """Build (or fetch from the cache) one library for `specs` and, if asked, route ops to it."""
    rendered = render_library(specs)
    path = build_library(rendered.module_name, rendered.sources, is_cuda=not specs[0].is_cpu,
                         spec_names=[s.name for s in rendered.specs])
    if register:
        for spec in rendered.specs:
            dispatch.check_target_runs_here(spec.target)
    library = KernelLibrary(rendered.module_name, path, rendered.specs)
    if register:
        dispatch.register_library(library)
    return library


def all_specs(target: str, dtypes: tuple[str, ...], quant_types=("nf4", "fp4"), blocksizes=(64,),
              blockwise_sizes=(256,)) -> list[KernelSpec]:
    """Every op for a target: the spec set a full test or benchmark needs."""
    specs = []
    for dtype in dtypes:
        for qt in quant_types:
            for bs in blocksizes:
                specs += [KernelSpec(op, target, dtype, qt, bs)
                          for op in ("dequantize_4bit", "linear_4bit", "quantize_4bit", "linear_4bit_grad_input")]
        for bs in blockwise_sizes:
            specs += [KernelSpec(op, target, dtype, "", bs) for op in ("quantize_blockwise", "dequantize_blockwise")]
        specs += [KernelSpec(op, target, dtype) for op in ("int8_quant", "int8_linear", "int8_linear_grad_input")]
    return specs
