"""LoRA adapters over a loaded artifact's quantized linears (QLoRA), saved in PEFT's layout.

`attach` inserts, after every matching kbitc::linear_4bit / kbitc::int8_linear call in the loaded
program, `out = base(x) + lora_B(lora_A(dropout(x))) * scaling`. The adapters are submodules of the
program (call_module nodes), registered on the quantized layer's own module as `kbitc_lora`, so
`model.parameters()` lists them and `model.train()` / `model.eval()` switch their dropout. Only
adapter parameters require grad; the quantized ops pass gradients to x (runtime/ops.py).

`save` writes `adapter_config.json` + `adapter_model.safetensors` with PEFT's key names
(`base_model.model.<layer>.lora_A.weight`), so `peft.PeftModel.from_pretrained(hf_model, folder)`
loads them onto the original 16-bit model, and `load` reads adapters saved by PEFT or by `save`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import operator
import types
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kbitc.runtime import ops  # noqa: F401  (registers torch.ops.kbitc.*)
from kbitc.runtime.errors import KbitcError

QUANT_LINEARS = (torch.ops.kbitc.linear_4bit.default, torch.ops.kbitc.int8_linear.default)
ADAPTER_ATTR = "kbitc_lora"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoraError(KbitcError):
    """LoRA adapters cannot be attached, saved or loaded as asked."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    layers: tuple[str, ...]  # adapted layers (module paths), sorted

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraAdapter(torch.nn.Module):
    """delta(x) = lora_B(lora_A(dropout(x))) * scaling, initialised as PEFT does (A kaiming-uniform,
    B zero: a fresh adapter adds exactly 0)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.lora_dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.lora_A = torch.nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = torch.nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return (self.lora_B(self.lora_A(h)) * self.scaling).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float32: what merging adds to the base weight [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def _program(model: torch.nn.Module) -> torch.fx.GraphModule:
    gm = getattr(model, "program", model)
    if not isinstance(gm, torch.fx.GraphModule):
        raise LoraError(f"expected a model from kbitc.load (or its .program GraphModule), got {type(model).__name__}")
    return gm


def _layer_name(node: torch.fx.Node) -> Optional[str]:
    weight = node.args[1]
    if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
        return None
    owner, sep, _ = weight.target.rpartition(".kbitc_")
    return owner if sep else weight.target.rpartition(".")[0]


def quantized_layers(model: torch.nn.Module) -> dict[str, list[torch.fx.Node]]:
    """Every quantized linear of the program: layer name -> its call sites (several when tied)."""
    found: dict[str, list[torch.fx.Node]] = {}
    for node in _program(model).graph.nodes:
        if node.op == "call_function" and node.target in QUANT_LINEARS:
            name = _layer_name(node)
            if name is not None:
                found.setdefault(name, []).append(node)
    return found


def _get_attr(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _features(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[int, int]:
    """(in_features, out_features) of a quantized linear call."""
    if node.target == torch.ops.kbitc.int8_linear.default:
        w = _get_attr(gm, node.args[1].target)
        return int(w.shape[1]), int(w.shape[0])
    out_features = int(node.args[10])
    n_bytes = _get_attr(gm, node.args[1].target).numel()
    val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if val is not None and isinstance(val.shape[-1], int):
        return int(val.shape[-1]), out_features
    return (2 * n_bytes) // out_features, out_features  # even element counts (odd ones carry meta)


def adapters(model: torch.nn.Module) -> dict[str, LoraAdapter]:
    """Attached adapters: layer name -> LoraAdapter."""
    suffix = "." + ADAPTER_ATTR
    return {name[: -len(suffix)]: m for name, m in _program(model).named_modules()
            if isinstance(m, LoraAdapter) and name.endswith(suffix)}


def config(model: torch.nn.Module) -> LoraConfig:
    cfg = getattr(_program(model), "_kbitc_lora_config", None)
    if cfg is None:
        raise LoraError("no LoRA adapters are attached to this model; call kbitc.lora.attach first")
    return cfg


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter parameters (lora_A / lora_B weights): what an optimizer should update."""
    return [p for a in adapters(model).values() for p in a.parameters()]


def attach(model: torch.nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
           targets: Optional[Sequence[str]] = None, use_rslora: bool = False,
           dtype: torch.dtype = torch.float32, *, target: Optional[Sequence[str]] = None) -> list[str]:
    """Add a LoRA adapter to every quantized linear whose module path matches one of `targets`
    (fnmatch globs, e.g. ["*q_proj", "*v_proj"]; default: all). Freezes everything else.
    Returns the adapted layer names. (`target=` is accepted as an alias of `targets=`.)"""
    if target is not None and targets is not None:
        raise LoraError("pass targets= or target=, not both")
    targets = target if targets is None else targets
    if isinstance(targets, str):
        targets = [targets]
    if not (isinstance(r, int) and r > 0) or not 0.0 <= dropout < 1.0:
        raise LoraError(f"expected r a positive int and 0 <= dropout < 1, got r={r!r}, dropout={dropout!r}")
    gm = _program(model)
    if getattr(gm, "_kbitc_lora_config", None) is not None:
        raise LoraError("LoRA adapters are already attached to this model")
    layers = quantized_layers(gm)
    if not layers:
        raise LoraError("the model has no quantized linears (kbitc::linear_4bit / int8_linear) to adapt")
    globs = list(targets) if targets else ["*"]
    chosen = sorted(n for n in layers if any(fnmatch.fnmatchcase(n, g) for g in globs))
    if not chosen:
        raise LoraError(f"no quantized layer matches {globs}; available layers: {sorted(layers)}")
    for name in chosen:
        sites = layers[name]
        in_features, out_features = _features(gm, sites[0])
        device = _get_attr(gm, sites[0].args[1].target).device
        _insert_adapter(gm, name, sites, LoraAdapter(in_features, out_features, r, alpha, dropout, use_rslora,
                                                     device=device, dtype=dtype))
    gm.graph.lint()
    gm.recompile()
    for p in gm.parameters():
        p.requires_grad_(False)
    for p in trainable_parameters(gm):
        p.requires_grad_(True)
    gm._kbitc_lora_config = LoraConfig(r, float(alpha), float(dropout), bool(use_rslora), tuple(chosen))
    # torch.export's unlifted module refuses train()/eval() (its graph is fixed to one mode): from now
    # on they switch the adapters' dropout only
    gm.train = types.MethodType(_train_adapters, gm)
    gm.eval = types.MethodType(lambda self: self.train(False), gm)
    return chosen


def _insert_adapter(gm: torch.fx.GraphModule, name: str, sites: list[torch.fx.Node], adapter: LoraAdapter) -> None:
    """Register `adapter` on layer `name` and add its output after each of the layer's call sites."""
    gm.get_submodule(name).add_module(ADAPTER_ATTR, adapter)
    graph = gm.graph
    for node in sites:
        with graph.inserting_after(node):
            delta = graph.call_module(f"{name}.{ADAPTER_ATTR}", (node.args[0],))
        with graph.inserting_after(delta):
            summed = graph.call_function(operator.add, (node, delta))
        node.replace_all_uses_with(summed, delete_user_cb=lambda user, s=summed: user is not s)


def share_adapters(model: torch.nn.Module, other: torch.fx.GraphModule, prefix: str = "") -> int:
    """Add `model`'s attached adapters (the same modules: shared parameters) to `other`, a second
    program of the same model whose layer names carry `prefix` (the decode program). Returns how many."""
    attached = adapters(model)
    if not attached:
        return 0
    sites = quantized_layers(other)
    missing = sorted(n for n in attached if prefix + n not in sites)
    if missing:
        raise LoraError(f"the other program has no quantized layers {missing[:5]} to carry the adapters")
    for name, adapter in attached.items():
        _insert_adapter(other, prefix + name, sites[prefix + name], adapter)
    other.graph.lint()
    other.recompile()
    return len(attached)


def _train_adapters(gm: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
    gm.training = mode
    for adapter in adapters(gm).values():
        adapter.train(mode)
    return gm


def _peft_config(cfg: LoraConfig, base_model: Optional[str]) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "target_modules": list(cfg.layers), "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
    }


def save(model: torch.nn.Module, folder: str | Path) -> Path:
    """Write the adapters as PEFT does: adapter_config.json + adapter_model.safetensors."""
    cfg = config(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, adapter in adapters(model).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = adapter.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = adapter.lora_B.weight.detach().cpu().contiguous()
    source = (getattr(model, "kbitc_manifest", None) or {}).get("source") or {}
    base = source.get("path") if source.get("kind") == "huggingface" else None
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(_peft_config(cfg, base), indent=2))
    return folder


def load(model: torch.nn.Module, folder: str | Path) -> list[str]:
    """Load adapters saved by `save` or by PEFT (LoRA, one adapter). Attaches them first when the
    model has none; otherwise the attached adapters must be exactly the saved ones."""
    folder = Path(folder)
    try:
        peft_cfg = json.loads((folder / CONFIG_FILE).read_text())
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise LoraError(f"cannot read a LoRA adapter from {folder} (expected {CONFIG_FILE} and {WEIGHTS_FILE}): "
                        f"{exc}") from exc
    if peft_cfg.get("peft_type", "LORA") != "LORA" or peft_cfg.get("use_dora") or \
            peft_cfg.get("rank_pattern") or peft_cfg.get("alpha_pattern"):
        raise LoraError(f"{folder}: expected a plain LoRA adapter (no DoRA, rank_pattern or alpha_pattern), got "
                        f"peft_type={peft_cfg.get('peft_type')!r}")
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        body = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            if body.endswith(f".{part}.weight"):
                weights.setdefault(body[: -len(f".{part}.weight")], {})[part] = t
                break
        else:
            raise LoraError(f"{folder / WEIGHTS_FILE}: unexpected tensor {key!r}; expected "
                            f"'{PEFT_PREFIX}<layer>.lora_A.weight' / '.lora_B.weight' only")
    names = sorted(weights)
    if getattr(_program(model), "_kbitc_lora_config", None) is None:
        missing = sorted(set(names) - set(quantized_layers(model)))
        if missing:
            raise LoraError(f"{folder}: adapters for layers that are not quantized linears of this model: "
                            f"{missing[:5]}; available layers: {sorted(quantized_layers(model))}")
        attach(model, r=int(peft_cfg["r"]), alpha=float(peft_cfg["lora_alpha"]),
               dropout=float(peft_cfg.get("lora_dropout", 0.0)), targets=names,
               use_rslora=bool(peft_cfg.get("use_rslora", False)))
    attached = adapters(model)
    if sorted(attached) != names:
        raise LoraError(f"{folder} holds adapters for {names[:5]}... but the model has {sorted(attached)[:5]}...")
    for name in names:
        adapter, parts = attached[name], weights[name]
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                raise LoraError(f"{folder}: layer {name} has no {part}.weight")
            param = getattr(adapter, part).weight
            if tuple(parts[part].shape) != tuple(param.shape):
                raise LoraError(f"layer {name}: {part}.weight in {folder} has shape {list(parts[part].shape)}, the "
                                f"model expects {list(param.shape)} (a different rank or base model?)")
            with torch.no_grad():
                param.copy_(parts[part])
    return names
