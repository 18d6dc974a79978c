"""`kbitc.lora.merge`: fold LoRA adapters into the quantized base and write a new artifact.

Per adapted layer: dequantize W exactly (kbitc.quant), add scaling * B @ A in float32, re-quantize
with the layer's own settings (scheme, blocksize, double quant) through the compiler's quantizer,
and measure what the re-quantization added: ||Q(W') - W'||_F / ||W'||_F, W' the float merge.
Everything else of the source artifact (program, kernels, tokenizer, other tensors) is kept; the
program only changes where double quant bakes a new scale offset into a kbitc::linear_4bit call.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kbitc.compiler.artifact import staging_folder, write_manifest
from kbitc.compiler.passes import QuantizeLinears
from kbitc.compiler.plan import LayerPlan
from kbitc.runtime import lora, reference
from kbitc.runtime.manifest import KERNELS, PROGRAM, WEIGHTS, ArtifactError, read_manifest
from kbitc.runtime.quant import int8


@dataclasses.dataclass
class MergeReport:
    output: Path
    rel_error: dict[str, float]  # layer -> ||Q(W') - W'||_F / ||W'||_F of the merged weight W'
    delta_norm: dict[str, float]  # layer -> ||scaling * B @ A||_F / ||W_hat||_F (how much the adapter moved W)

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_error.values(), default=0.0)

    def to_json(self) -> dict:
        return {"rel_error": self.rel_error, "delta_norm": self.delta_norm, "max_rel_error": self.max_rel_error}


def _dequantize(plan: LayerPlan, state: dict[str, torch.Tensor]) -> torch.Tensor:
    t = {part: state[plan.tensor_name(part)] for part in
         [k.rsplit(".kbitc_", 1)[1] for k in plan.output_layout()]}
    if plan.scheme == "int8":
        return int8.int8_vectorwise_dequant(t["weight"], t["scb"])
    offset = float(plan.quant_meta.get("nested_offset", 0.0))
    return reference.dequantize_4bit(t["packed"], t["code"], t["absmax"], t.get("absmax2"), t.get("code2"), offset,
                                     plan.blocksize, (plan.out_features, plan.in_features), torch.float32)


def _set_offsets(program: torch.export.ExportedProgram, offsets: dict[str, float]) -> None:
    """Point each merged layer's kbitc::linear_4bit call at its new double-quant offset."""
    buffers = program.graph_signature.inputs_to_buffers
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.kbitc.linear_4bit.default:
            continue
        packed = node.args[1]
        target = buffers.get(packed.name, "") if isinstance(packed, torch.fx.Node) else ""
        layer = target.rpartition(".kbitc_")[0]
        if layer in offsets:
            node.args = node.args[:6] + (offsets[layer],) + node.args[7:]
    program.graph_module.recompile()


def merge(model: torch.nn.Module, output: str | Path, force: bool = False,
          source: Optional[str | Path] = None) -> MergeReport:
    """Write `output`, an artifact with every attached adapter folded into its base layer.
    `source` is the artifact the model was loaded from (default: model.kbitc_path)."""
    root = Path(source or getattr(model, "kbitc_path", None) or "")
    if not (root / WEIGHTS).is_file():
        raise lora.LoraError("merge needs the artifact the model was loaded from: load it with kbitc.load, or "
                             f"pass source=PATH (looked in {str(root) or '<unknown>'})")
    adapters = lora.adapters(model)
    if not adapters:
        raise lora.LoraError("no LoRA adapters are attached to this model: nothing to merge")
    manifest = read_manifest(root)
    plans = {d["name"]: LayerPlan(**d) for d in manifest["layers"]}
    unknown = sorted(set(adapters) - set(plans))
    if unknown:
        raise ArtifactError(f"adapted layers {unknown[:5]} are not in {root}'s manifest; was the model loaded from it?")
    with safe_open(str(root / WEIGHTS), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    quant_meta = json.loads(metadata.get("kbitc", "{}"))
    report = MergeReport(Path(output), {}, {})
    offsets = {}
    for name, adapter in sorted(adapters.items()):
        plan = plans[name]
        w_hat = _dequantize(plan, state)
        delta = adapter.delta_weight().detach().cpu()
        merged = (w_hat.double() + delta.double()).float()
        tensors, meta, requantized = QuantizeLinears._quantize(plan, merged)
        for part, tensor in tensors.items():
            state[plan.tensor_name(part)] = tensor.detach().clone().contiguous()  # codebooks are shared objects
        ref = merged.double()
        noise = float((requantized.double() - ref).pow(2).sum())
        report.rel_error[name] = math.sqrt(noise / max(float(ref.pow(2).sum()), 1e-300))
        report.delta_norm[name] = float(delta.double().norm() / w_hat.double().norm().clamp(min=1e-300))
        plan.quant_meta = meta
        plan.sqnr_db = math.inf if noise == 0 else 10 * math.log10(float(ref.pow(2).sum()) / noise)
        quant_meta[name] = meta
        if "nested_offset" in meta:
            offsets[name] = float(meta["nested_offset"])
    metadata["kbitc"] = json.dumps(quant_meta)
    try:
        program = torch.export.load(str(root / PROGRAM))
    except Exception as exc:  # torch.export raises many types for a damaged archive
        raise ArtifactError(f"{root / PROGRAM} could not be read ({type(exc).__name__}: {exc})") from exc
    _set_offsets(program, offsets)
    cfg = lora.config(model)
    with staging_folder(Path(output), force) as stage:
        save_file(state, str(stage / WEIGHTS), metadata=metadata)
        torch.export.save(program, str(stage / PROGRAM))
        for folder in (KERNELS, "tokenizer"):
            if (root / folder).is_dir():
                shutil.copytree(root / folder, stage / folder)
        fields = {k: v for k, v in manifest.items() if k not in ("format_version", "files")}
        fields["layers"] = [plans[d["name"]].to_json() for d in manifest["layers"]]
        fields["lora_merge"] = {"source": str(root), "r": cfg.r, "alpha": cfg.alpha, "use_rslora": cfg.use_rslora,
                                **report.to_json()}
        write_manifest(stage, fields)
    return report
