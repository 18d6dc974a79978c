"""Each compiler pass on a tiny exported module, checked by counting ops in the rewritten graph."""

import pytest
import torch

from kbitc.compiler import passes as P
from kbitc.compiler.config import CompileConfig, LayerOverride
from kbitc.compiler.frontend import WeightSource
from kbitc.runtime.errors import NonFiniteWeightError


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 64, bias=False)
        self.small = torch.nn.Linear(64, 8)

    def forward(self, x):
        return self.small(self.down(torch.relu(self.up(x))))


def _context(config, module=None, target="cpu_avx2"):
    module = module or Tiny()
    program = torch.export.export(module, (torch.randn(2, 64),))
    state = dict(module.state_dict())
    weights = WeightSource({k: (lambda v=v: v) for k, v in state.items()})
    return P.CompileContext(config, target, program.module(), weights), module


def _count(ctx):
    counts = {}
    for node in ctx.graph.nodes:
        if node.op == "call_function":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts


def test_select_linears_respects_globs_and_min_size():
    ctx, _ = _context(CompileConfig(min_params=1024))
    P.SelectLinears()(ctx)
    assert sorted(ctx.layers) == ["down", "up"]  # small (64x8 = 512 params) stays float
    ctx, _ = _context(CompileConfig(min_params=1024, exclude=("up",)))
    assert sorted(P.SelectLinears()(ctx).layers) == ["down"]
    ctx, _ = _context(CompileConfig(min_params=0, overrides=(LayerOverride("down", "int8"),)))
    layers = P.SelectLinears()(ctx).layers
    assert {k: v.scheme for k, v in layers.items()} == {"up": "nf4", "down": "int8", "small": "nf4"}


@pytest.mark.parametrize("scheme,op", [("nf4", "kbitc.linear_4bit.default"), ("fp4", "kbitc.linear_4bit.default"),
                                       ("int8", "kbitc.int8_linear.default")])
def test_quantize_and_rewrite_replace_exactly_the_selected_linears(scheme, op):
    ctx, module = _context(CompileConfig(scheme=scheme, min_params=1024))
    assert _count(ctx)["aten.linear.default"] == 3
    for p in (P.SelectLinears(), P.QuantizeLinears(), P.RewriteLinears(), P.AddKernelSpecs(), P.Verify()):
        p(ctx)
    counts = _count(ctx)
    assert counts[op] == 2 and counts["aten.linear.default"] == 1
    assert not hasattr(ctx.graph_module.up, "weight")  # the float weight is gone
    assert all(plan.sqnr_db > (30 if scheme == "int8" else 15) for plan in ctx.layers.values())
    assert {s.op for s in ctx.kernel_specs} == {"int8_linear" if scheme == "int8" else "linear_4bit"}


def test_verify_rejects_a_missing_kernel_spec_and_a_leftover_float_linear():
    ctx, _ = _context(CompileConfig(min_params=1024))
    for p in (P.SelectLinears(), P.QuantizeLinears(), P.RewriteLinears()):
        p(ctx)
    with pytest.raises(P.CompileError, match="needs kernel kbitc_cpu_avx2_nf4_linear_f32_b64"):
        P.Verify()(ctx)
    ctx, _ = _context(CompileConfig(min_params=1024))
    P.SelectLinears()(ctx)  # selected but never rewritten
    with pytest.raises(P.CompileError, match="still a float linear"):
        P.Verify()(ctx)


def test_nan_weight_names_the_layer():
    module = Tiny()
    with torch.no_grad():
        module.down.weight[3, 5] = float("nan")
    ctx, _ = _context(CompileConfig(min_params=1024), module)
    P.SelectLinears()(ctx)
    with pytest.raises(NonFiniteWeightError, match="layer down:.*NaN"):
        P.QuantizeLinears()(ctx)
