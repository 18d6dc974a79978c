"""The compiler's FX passes: small classes run in an explicit order over the exported graph.

Each pass takes and returns the CompileContext; the graph is the unlifted GraphModule of the
exported program, where parameters are `get_attr` nodes named by their module path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from kbitc.compiler.config import CompileConfig
from kbitc.compiler.frontend import WeightSource
from kbitc.compiler.plan import LayerPlan
from kbitc.runtime import ops  # noqa: F401  (registers torch.ops.kbitc.*)
from kbitc.runtime.errors import KbitcError, NonFiniteWeightError
from kbitc.runtime.kernel_spec import KernelSpec
from kbitc.runtime.quant import blockwise, int8

LINEAR_TARGETS = (torch.ops.aten.linear.default, torch.ops.aten.addmm.default)
KBITC_TARGETS = (torch.ops.kbitc.linear_4bit.default, torch.ops.kbitc.int8_linear.default)


class CompileError(KbitcError):
    """The graph cannot be compiled as asked (unsupported op, a layer left unquantized, ...)."""


@dataclasses.dataclass
class CompileContext:
    config: CompileConfig
    target: str  # resolved: cpu_avx2 | cpu_avx512 | smXX
    graph_module: torch.fx.GraphModule
    weights: WeightSource
    layers: dict[str, LayerPlan] = dataclasses.field(default_factory=dict)
    kernel_specs: set = dataclasses.field(default_factory=set)
    write: Optional[Callable[[str, torch.Tensor], None]] = None  # streams tensors into the artifact
    progress: Callable = lambda iterable, **kw: iterable

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph


def _linear_parts(node: torch.fx.Node):
    """(x, weight get_attr node, bias, transposed) of a linear-like node, or None.

    aten.linear(x, W[out, in], bias) and aten.addmm(bias, x, W[in, out]) (GPT-2's Conv1D)."""
    if node.target == torch.ops.aten.linear.default:
        x, w = node.args[0], node.args[1]
        bias, transposed = (node.args[2] if len(node.args) > 2 else None), False
    else:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        bias, x, w = node.args[0], node.args[1], node.args[2]
        transposed = True
    if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
        return None
    return x, w, bias, transposed


def _attr(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    module_path, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(module_path) if module_path else gm, name)


class SelectLinears:
    """Choose the linear layers to quantize (include/exclude globs, plan overrides, min size)."""

    def __call__(self, ctx: CompileContext) -> CompileContext:
        for node in ctx.graph.nodes:
            if node.op != "call_function" or node.target not in LINEAR_TARGETS:
                continue
            parts = _linear_parts(node)
            if parts is None:
                continue  # a linear on a computed weight (rare): stays as it is
            _, weight, bias, transposed = parts
            name = weight.target.removesuffix(".weight")
            settings = ctx.config.layer_settings(name)
            shape = tuple(_attr(ctx.graph_module, weight.target).shape)
            if settings is None or len(shape) != 2 or math.prod(shape) < ctx.config.min_params:
                continue
            if transposed:
                shape = shape[::-1]
            bias = bias if isinstance(bias, torch.fx.Node) and bias.op == "get_attr" else None
            if name in ctx.layers:  # the same weight used twice (tied): one plan, two call sites
                node.meta["kbitc_layer"] = name
                continue
            ctx.layers[name] = LayerPlan(
                name=name, weight=weight.target, bias=None if bias is None else bias.target,
                out_features=shape[0], in_features=shape[1], scheme=settings["scheme"],
                blocksize=settings["blocksize"], double_quant=ctx.config.double_quant,
                threshold=float(settings["threshold"]), transposed=transposed)
            node.meta["kbitc_layer"] = name
        return ctx


class SelectLinearsLike:
    """Select the linears of a second program of the same model (its names carry `prefix`) with the
    plans the main program made: the same layers, schemes and quantized tensors."""

    def __init__(self, plans: dict[str, LayerPlan], prefix: str):
        self.plans, self.prefix = plans, prefix

    def __call__(self, ctx: CompileContext) -> CompileContext:
        for node in ctx.graph.nodes:
            if node.op != "call_function" or node.target not in LINEAR_TARGETS:
                continue
            parts = _linear_parts(node)
            name = None if parts is None else parts[1].target.removesuffix(".weight")
            main = None if name is None else self.plans.get(name.removeprefix(self.prefix))
            if main is None or not name.startswith(self.prefix):
                continue
            if name not in ctx.layers:
                ctx.layers[name] = dataclasses.replace(
                    main, name=name, weight=self.prefix + main.weight,
                    bias=None if main.bias is None else self.prefix + main.bias)
            node.meta["kbitc_layer"] = name
        return ctx


class QuantizeLinears:
    """Quantize each selected weight, streamed one layer at a time from the source checkpoint."""

    def __call__(self, ctx: CompileContext) -> CompileContext:
        for plan in ctx.progress(list(ctx.layers.values()), desc="quantizing", unit="layer"):
            w = ctx.weights.get(plan.weight).detach()
            if plan.transposed:
                w = w.t().contiguous()
            try:
                tensors, meta, w_hat = self._quantize(plan, w)
            except NonFiniteWeightError as exc:
                raise NonFiniteWeightError(f"layer {plan.name}: {exc}") from exc
            ref = w.double()
            noise = float((ref - w_hat.double()).pow(2).sum())
            plan.sqnr_db = math.inf if noise == 0 else 10 * math.log10(float(ref.pow(2).sum()) / noise)
            plan.bits_per_param = 8 * sum(t.numel() * t.element_size() for t in tensors.values()) / plan.numel
            plan.quant_meta = meta
            if ctx.write is not None:
                for part, tensor in tensors.items():
                    ctx.write(plan.tensor_name(part), tensor)
        return ctx

    @staticmethod
    def _quantize(plan: LayerPlan, w: torch.Tensor):
        if plan.scheme == "int8":
            codes, scb = int8.int8_vectorwise_quant(w)
            return ({"weight": codes, "scb": scb}, {"scheme": "int8", "threshold": plan.threshold},
                    int8.int8_vectorwise_dequant(codes, scb))
        packed, state = blockwise.quantize_4bit(w, plan.scheme, plan.blocksize, plan.double_quant)
        tensors = {"packed": packed, "code": state.code, "absmax": state.absmax}
        if state.nested is not None:
            tensors.update(absmax2=state.nested.absmax2, code2=state.nested.code)
        return tensors, {"scheme": plan.scheme, **state.to_json()}, blockwise.dequantize_4bit(packed, state)


class RewriteLinears:
    """Replace each selected aten.linear with the kbitc op reading the quantized buffers."""

    def __call__(self, ctx: CompileContext) -> CompileContext:
        gm = ctx.graph_module
        for node in list(ctx.graph.nodes):
            name = node.meta.get("kbitc_layer")
            if name is None or node.op != "call_function" or node.target not in LINEAR_TARGETS:
                continue
            plan = ctx.layers[name]
            module = gm.get_submodule(name)
            for part, (dtype, shape) in plan.output_layout().items():
                attr = part.rsplit(".", 1)[1]
                if not hasattr(module, attr):
                    module.register_buffer(attr, torch.empty(shape, dtype=dtype, device="meta"))
            with ctx.graph.inserting_before(node):
                get = {p: ctx.graph.get_attr(plan.tensor_name(p)) for p in
                       [k.rsplit(".kbitc_", 1)[1] for k in plan.output_layout()]}
                x, _, bias, _ = _linear_parts(node)
                if plan.scheme == "int8":
                    new = ctx.graph.call_function(torch.ops.kbitc.int8_linear.default,
                                                  (x, get["weight"], get["scb"], bias, plan.threshold))
                else:
                    offset = float(plan.quant_meta.get("nested_offset", 0.0))
                    new = ctx.graph.call_function(
                        torch.ops.kbitc.linear_4bit.default,
                        (x, get["packed"], get["code"], get["absmax"], get.get("absmax2"), get.get("code2"),
                         offset, bias, plan.scheme, plan.blocksize, plan.out_features))
            new.meta.update({k: v for k, v in node.meta.items() if k != "kbitc_layer"})
            new.meta["kbitc_layer"] = name
            node.replace_all_uses_with(new)
            ctx.graph.erase_node(node)
        for plan in ctx.layers.values():  # drop the float weights: they are not in the artifact
            module_path, _, attr = plan.weight.rpartition(".")
            if not any(n.op == "get_attr" and n.target == plan.weight and n.users for n in ctx.graph.nodes):
                for n in [n for n in ctx.graph.nodes if n.op == "get_attr" and n.target == plan.weight]:
                    ctx.graph.erase_node(n)
                owner = gm.get_submodule(module_path)
                if attr in owner._parameters:
                    del owner._parameters[attr]
        ctx.graph.lint()
        gm.recompile()
        return ctx


class AddKernelSpecs:
    """Record the kernel spec each kbitc node needs on the target (and, for a trainable artifact,
    the backward kernel of each: gradients w.r.t. the layer input, for LoRA)."""

    def __call__(self, ctx: CompileContext) -> CompileContext:
        dtype = ctx.config.activation_dtype
        for plan in ctx.layers.values():
            if plan.scheme == "int8":
                ops = ("int8_linear", "int8_linear_grad_input") if ctx.config.trainable else ("int8_linear",)
                if not KernelSpec("int8_linear", ctx.target, dtype).is_cpu:
                    ops += ("int8_quant",)  # many rows on CUDA: int8_quant + cuBLASLt (runtime/ops.py)
                ctx.kernel_specs.update(KernelSpec(op, ctx.target, dtype) for op in ops)
            else:
                ops = ("linear_4bit", "linear_4bit_grad_input") if ctx.config.trainable else ("linear_4bit",)
                if not KernelSpec("linear_4bit", ctx.target, dtype, plan.scheme, plan.blocksize).is_cpu \
                        and dtype != "f32":
                    ops += ("dequantize_4bit",)  # many rows on CUDA: dequantize + cuBLAS (runtime/ops.py)
                ctx.kernel_specs.update(KernelSpec(op, ctx.target, dtype, plan.scheme, plan.blocksize) for op in ops)
        return ctx


class Verify:
    """No selected float linear is left, and every kbitc node has a kernel spec for the target."""

    def __call__(self, ctx: CompileContext) -> CompileContext:
        dtype = ctx.config.activation_dtype
        names = {s.name for s in ctx.kernel_specs}
        for node in ctx.graph.nodes:
            if node.op != "call_function":
                continue
            layer = node.meta.get("kbitc_layer")
            if node.target in LINEAR_TARGETS and layer is not None:
                raise CompileError(f"layer {layer} was selected for quantization but is still a float linear")
            if node.target in KBITC_TARGETS:
                plan = ctx.layers[layer]
                spec = (KernelSpec("int8_linear", ctx.target, dtype) if plan.scheme == "int8" else
                        KernelSpec("linear_4bit", ctx.target, dtype, plan.scheme, plan.blocksize))
                if spec.name not in names:
                    raise CompileError(f"layer {layer} needs kernel {spec.name}, which is not in the build")
        return ctx


PASSES = (SelectLinears, QuantizeLinears, RewriteLinears, AddKernelSpecs, Verify)
