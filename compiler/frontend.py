"""Front end: turn MODEL (a Hugging Face folder, a saved .pt2 program, or package.module:factory)
into an exported graph plus a lazy source of its weights.

A Hugging Face model is built with its parameters on the meta device (no memory, no network) and
exported with dynamic batch and sequence dimensions; its weights are read one tensor at a time
from the memory-mapped safetensors files when the compiler needs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from kbitc.compiler.kv_cache import DecodeExport, export_decode
from kbitc.runtime.errors import KbitcError
from kbitc.runtime.manifest import sha256_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json")


class FrontendError(KbitcError):
    """MODEL could not be read or exported."""


class WeightSource:
    """name -> tensor, read lazily; aliases cover tied weights (e.g. lm_head = embed_tokens)."""

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]], aliases: Optional[dict[str, str]] = None):
        self._loaders = loaders
        self._aliases = aliases or {}

    def __contains__(self, name: str) -> bool:
        return name in self._loaders or self._aliases.get(name) in self._loaders

    def get(self, name: str) -> torch.Tensor:
        if name in self._loaders:
            return self._loaders[name]()
        if self._aliases.get(name) in self._loaders:
            return self._loaders[self._aliases[name]]()
        raise FrontendError(f"weight {name!r} is not in the model's checkpoint")


@dataclasses.dataclass
class FrontendResult:
    program: torch.export.ExportedProgram  # parameters may live on the meta device
    weights: WeightSource
    example_args: tuple
    example_kwargs: dict
    dynamic_shapes: Any
    source: dict  # kind, path, sha256 of inputs
    tokenizer_dir: Optional[Path] = None
    is_causal_lm: bool = False
    decode: Optional[DecodeExport] = None  # the static-KV-cache program (compile --kv-cache)


@contextlib.contextmanager
def parameters_on_meta():
    """Create every nn.Parameter on the meta device while buffers (e.g. rotary tables) stay real."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _safetensors_loaders(folder: Path) -> tuple[dict[str, Callable[[], torch.Tensor]], list[Path]]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FrontendError(f"expected *.safetensors weights in {folder}, found none "
                            "(convert .bin checkpoints with save_pretrained(safe_serialization=True))")
    loaders = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                loaders[name] = (lambda file=file, name=name: _read_tensor(file, name))
    return loaders, files


def _read_tensor(file: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name)


def load_hf_folder(folder: Path, dtype: torch.dtype = torch.float32, kv_cache: int = 0) -> FrontendResult:
    try:
        import transformers
    except ImportError as exc:
        raise FrontendError("reading a Hugging Face model folder needs `pip install transformers`") from exc
    if not (folder / "config.json").is_file():
        raise FrontendError(f"expected a Hugging Face model folder with config.json at {folder}")
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    config.use_cache = False
    architectures = getattr(config, "architectures", None) or []
    is_causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) or (
        not architectures and type(config) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING)
    auto = transformers.AutoModelForCausalLM if is_causal else transformers.AutoModel
    with parameters_on_meta():
        model = auto.from_config(config)
    model.eval()
    if is_causal:
        _return_logits_dict(model)
    for param in model.parameters():  # run (and export) in the compute dtype: free on meta
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    buffers = {name: b for name, b in model.named_buffers()}
    for module in model.modules():  # the export runs entirely on meta; real buffers are kept above
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = b.to("meta")
    loaders, files = _safetensors_loaders(folder)
    for name, value in buffers.items():
        loaders.setdefault(name, lambda value=value: value)
    aliases = _tied_aliases(model, loaders)
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    batch, seq = torch.export.Dim("batch", max=4096), torch.export.Dim("seq", min=2, max=_max_positions(config))
    dynamic = {"input_ids": {0: batch, 1: seq}}
    try:
        program = torch.export.export(model, (), {"input_ids": ids}, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # export failures come in many types; report them as one
        raise FrontendError(f"torch.export failed for {folder.name} ({type(model).__name__}): {exc}") from exc
    decode = None
    if kv_cache:
        if not is_causal:
            raise FrontendError(f"--kv-cache needs a causal language model; {folder.name} is "
                                f"{type(model).__name__}")
        if kv_cache > _max_positions(config):
            raise FrontendError(f"--kv-cache {kv_cache} exceeds the model's {_max_positions(config)} positions")
        try:
            decode = export_decode(model, kv_cache, dtype)
        except Exception as exc:  # export failures come in many types; report them as one
            raise FrontendError(f"exporting {folder.name} with a static KV cache failed: {exc}") from exc
    tokenizer = folder if any((folder / f).is_file() for f in TOKENIZER_FILES[:5]) else None
    source = {"kind": "huggingface", "path": str(folder), "model_class": type(model).__name__,
              "sha256": {f.name: sha256_file(f) for f in files + [folder / "config.json"]}}
    return FrontendResult(program, WeightSource(loaders, aliases), (), {"input_ids": ids}, dynamic, source,
                          tokenizer, is_causal, decode)


def _return_logits_dict(model: torch.nn.Module) -> None:
    """Make the exported program return {"logits": tensor}: a plain dict needs no transformers
    import to deserialize (a ModelOutput does), so artifacts load where transformers is absent."""
    forward = type(model).forward

    def logits_only(self, input_ids):
        return {"logits": forward(self, input_ids=input_ids, use_cache=False).logits}

    model.forward = logits_only.__get__(model)


def _max_positions(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048) or 2048)


def _tied_aliases(model: torch.nn.Module, available) -> dict[str, str]:
    """Parameter names that share storage with another (tied embeddings) -> a name on disk."""
    by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    aliases = {}
    for names in by_param.values():
        on_disk = [n for n in names if n in available]
        for n in names:
            if on_disk and n not in available:
                aliases[n] = on_disk[0]
    for name, param in model.named_parameters(remove_duplicate=False):  # transformers ties lazily
        if name not in available and name not in aliases and name.endswith("lm_head.weight"):
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            for other, p in model.named_parameters(remove_duplicate=False):
                if emb is not None and p is emb.weight and other in available:
                    aliases[name] = other
    return aliases


def load_pt2(path: Path) -> FrontendResult:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise FrontendError(f"could not load the exported program {path}: {exc}") from exc
    state = dict(program.state_dict)
    state.update({k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)})
    loaders = {k: (lambda v=v: v) for k, v in state.items()}
    if program.example_inputs is None:
        raise FrontendError(f"{path} holds no example inputs; save it with a torch version that records "
                            "them (2.5+) or pass package.module:factory instead")
    args, kwargs = program.example_inputs
    source = {"kind": "pt2", "path": str(path), "sha256": {path.name: sha256_file(path)}}
    return FrontendResult(program, WeightSource(loaders), tuple(args), dict(kwargs),
                          _auto_dynamic(args, kwargs), source)


def _auto_dynamic(args, kwargs):
    """Let torch.export decide which dimensions stay dynamic (it keeps those the program allows)."""
    def spec(t):
        return {i: torch.export.Dim.AUTO for i in range(t.dim())} if isinstance(t, torch.Tensor) else None

    if kwargs and args:
        return None  # positional names unknown here: export with static shapes
    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(a) for a in args)


def load_factory(spec: str) -> FrontendResult:
    module_name, _, attr = spec.partition(":")
    try:
        sys.path.insert(0, str(Path.cwd()))
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise FrontendError(f"expected MODEL as package.module:factory, could not import {spec!r}: {exc}") from exc
    finally:
        sys.path.pop(0)
    made = factory()
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise FrontendError(f"{spec} must return (nn.Module, example_inputs), got {type(made).__name__}")
    model, example = made
    example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    model.eval()
    dynamic = _auto_dynamic(example, {})
    try:
        program = torch.export.export(model, example, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        raise FrontendError(f"torch.export failed for {spec}: {exc}") from exc
    state = dict(program.state_dict)
    state.update({k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)})
    loaders = {k: (lambda v=v: v) for k, v in state.items()}
    source = {"kind": "factory", "path": spec, "sha256": {}}
    return FrontendResult(program, WeightSource(loaders), example, {}, dynamic, source)


def load_model(model: str, dtype: torch.dtype = torch.float32, kv_cache: int = 0) -> FrontendResult:
    """Dispatch on what MODEL names: folder -> Hugging Face, *.pt2 -> exported program, a:b -> factory.
    `dtype` is the compute dtype a Hugging Face model is exported in; `kv_cache` > 0 also exports a
    decode program with a static cache of that many positions (Hugging Face causal LMs only)."""
    path = Path(model)
    if path.is_dir():
        return load_hf_folder(path, dtype, kv_cache)
    if kv_cache:
        raise FrontendError("--kv-cache needs MODEL as a Hugging Face causal LM folder")
    if path.suffix == ".pt2":
        if not path.is_file():
            raise FrontendError(f"no such exported program: {path}")
        return load_pt2(path)
    if ":" in model and not path.exists():
        return load_factory(model)
    raise FrontendError(f"expected MODEL as a Hugging Face folder, a .pt2 file or package.module:factory, got {model!r}")
