"""`kbitc.compile`: the stage order, in one function."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import kbitc
from kbitc.compiler import passes as P
from kbitc.compiler.artifact import staging_folder, write_manifest
from kbitc.compiler.codegen import render_library
from kbitc.compiler.config import CompileConfig
from kbitc.compiler.frontend import TOKENIZER_FILES, load_model
from kbitc.runtime import build, dispatch
from kbitc.runtime.kernel_spec import DTYPES
from kbitc.compiler.kv_cache import MODEL_PREFIX
from kbitc.runtime.manifest import DECODE_PROGRAM, KERNELS, PROGRAM, WEIGHTS
from kbitc.runtime.safetensors_stream import StreamingSafetensorsWriter

METADATA_ROOM_PER_LAYER = 512


def resolve_target(target: str) -> str:
    return dispatch.native_cpu_target() if target == "cpu" else target


def compile(model, config: Optional[CompileConfig] = None, output: str | Path = "model.kbit",
            force: bool = False, progress: bool = True, **config_fields) -> Path:
    """Compile MODEL (HF folder, .pt2, or package.module:factory) into a .kbit artifact folder."""
    config = config or CompileConfig(**config_fields)
    output = Path(output)
    started = time.perf_counter()
    target = resolve_target(config.target)
    dtype = getattr(torch, DTYPES[config.activation_dtype])
    bar = (lambda it, **kw: tqdm(it, file=sys.stderr, **kw)) if progress else (lambda it, **kw: it)
    with staging_folder(output, force) as stage:
        stages = bar(["export", "select", "quantize", "rewrite", "verify", "kernels", "manifest"],
                     desc="compile", unit="stage", leave=False)
        stage_iter = iter(stages)
        next(stage_iter)
        front = load_model(str(model), dtype, config.kv_cache)
        ctx = P.CompileContext(config, target, front.program.module(), front.weights, progress=bar)
        next(stage_iter)
        P.SelectLinears()(ctx)
        next(stage_iter)
        kept, tied = _kept_tensors(ctx)
        layout = {name: (t.dtype, tuple(t.shape)) for name, t in kept.items()}
        for plan in ctx.layers.values():
            layout.update(plan.output_layout())
        writer = StreamingSafetensorsWriter(stage / WEIGHTS, layout,
                                            metadata_reserve=METADATA_ROOM_PER_LAYER * (len(ctx.layers) + 1))
        with writer:
            ctx.write = writer.write
            P.QuantizeLinears()(ctx)
            for name, like in kept.items():
                writer.write(name, ctx.weights.get(name).detach().to(like.dtype))
            writer.set_metadata({"kbitc": json.dumps({name: plan.quant_meta for name, plan in ctx.layers.items()})})
        next(stage_iter)
        P.RewriteLinears()(ctx)
        P.AddKernelSpecs()(ctx)
        next(stage_iter)
        P.Verify()(ctx)
        program = torch.export.export(ctx.graph_module, front.example_args, front.example_kwargs,
                                      dynamic_shapes=front.dynamic_shapes, strict=False)
        torch.export.save(program, str(stage / PROGRAM))
        decode = _compile_decode(ctx, front, kept, tied, stage) if front.decode is not None else None
        next(stage_iter)
        kernels = _build_kernels(ctx, stage / KERNELS)
        if front.tokenizer_dir is not None:
            (stage / "tokenizer").mkdir()
            for f in TOKENIZER_FILES + ("config.json",):
                if (front.tokenizer_dir / f).is_file():
                    shutil.copy2(front.tokenizer_dir / f, stage / "tokenizer" / f)
        next(stage_iter)
        write_manifest(stage, {
            "kbitc_version": kbitc.__version__, "source": front.source, "config": config.to_json(),
            "target": target, "is_causal_lm": front.is_causal_lm, "tied_weights": tied,
            "layers": [plan.to_json() for plan in ctx.layers.values()], "kernels": kernels, "decode": decode,
            "compile_seconds": round(time.perf_counter() - started, 2)})
    return output


def _kept_tensors(ctx: P.CompileContext) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor the program reads that is not a quantized weight (embeddings, norms, biases),
    once each: a tied weight (lm_head = embed_tokens) is stored under one name, the other aliased."""
    quantized = {plan.weight for plan in ctx.layers.values()}
    state = dict(ctx.graph_module.named_parameters(remove_duplicate=False))
    state.update(dict(ctx.graph_module.named_buffers(remove_duplicate=False)))
    used = {n.target for n in ctx.graph.nodes if n.op == "get_attr"}
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, t in state.items():
        if name not in used or name in quantized:
            continue
        if id(t) in first_name:
            tied[name] = first_name[id(t)]
        else:
            first_name[id(t)] = name
            kept[name] = t
    return kept, tied


def _compile_decode(ctx: P.CompileContext, front, kept: dict, tied: dict, stage: Path) -> dict:
    """Rewrite the static-KV-cache program's linears with the plans (and tensors) of the main
    program, verify it reads nothing the artifact lacks, and save it next to the main program."""
    export = front.decode
    dctx = P.CompileContext(ctx.config, ctx.target, export.program.module(), front.weights)
    P.SelectLinearsLike(ctx.layers, MODEL_PREFIX)(dctx)
    P.RewriteLinears()(dctx)
    dctx.kernel_specs = ctx.kernel_specs
    P.Verify()(dctx)
    stored = set(kept) | set(tied)
    for plan in ctx.layers.values():
        stored |= set(plan.output_layout())
    used = {n.target for n in dctx.graph.nodes
            if n.op == "get_attr" and isinstance(P._attr(dctx.graph_module, n.target), torch.Tensor)}
    missing = sorted(n for n in used if n not in export.cache and n.removeprefix(MODEL_PREFIX) not in stored)
    if missing:
        raise P.CompileError(f"the decode program reads tensors the artifact does not store: {missing[:5]}")
    program = torch.export.export(dctx.graph_module, (), export.example_kwargs, dynamic_shapes=export.dynamic_shapes,
                                  strict=False)
    torch.export.save(program, str(stage / DECODE_PROGRAM))
    return {"program": DECODE_PROGRAM, "prefix": MODEL_PREFIX, "max_cache_len": export.max_cache_len,
            "cache": {name: [str(dtype).removeprefix("torch."), list(shape)]
                      for name, (dtype, shape) in export.cache.items()}}


def _build_kernels(ctx: P.CompileContext, folder: Path) -> dict:
    """Render the specs, build the library (cross-compiling CUDA with nvcc), bundle both."""
    folder.mkdir()
    if not ctx.kernel_specs:
        return {"specs": [], "module_name": None}
    rendered = render_library(sorted(ctx.kernel_specs, key=lambda s: s.name))
    (folder / "src").mkdir()
    for name, text in rendered.sources.items():
        (folder / "src" / name).write_text(text)
    is_cuda = not rendered.specs[0].is_cpu
    built = build.build_library(rendered.module_name, rendered.sources, is_cuda,
                                [s.name for s in rendered.specs])
    shutil.copy2(built, folder / built.name)
    return {"module_name": rendered.module_name, "library": f"{KERNELS}/{built.name}",
            "abi": build.abi_tag(is_cuda), "specs": [s.to_json() for s in rendered.specs]}
