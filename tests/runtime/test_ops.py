"""The op schemas: opcheck, torch.compile(fullgraph=True), torch.export, and bad input.

Runs the reference path (no kernel library registered), so it checks schemas and fake kernels.
"""

import pytest
import torch

import kbitc.quant as kq
from kbitc.runtime import dispatch, ops
from kbitc.runtime.errors import UnsupportedInputError
from kbitc.runtime.reference import quant_state_args


@pytest.fixture(autouse=True)
def reference_only():
    saved = dict(dispatch._REGISTRY)
    dispatch.unregister_all()
    yield
    dispatch._REGISTRY.update(saved)


def _linear_args(rng, m=3, n=40, k=70, dtype=torch.float32, double_quant=True, bias=True):
    w = torch.randn(n, k, generator=rng)
    packed, state = kq.quantize_4bit(w, "nf4", 64, double_quant=double_quant)
    code, absmax, absmax2, code2, offset = quant_state_args(state)
    x = torch.randn(m, k, generator=rng).to(dtype)
    b = torch.randn(n, generator=rng).to(dtype) if bias else None
    return (x, packed, code, absmax, absmax2, code2, offset, b, "nf4", 64, n), (packed, state, w)


def _all_op_calls(rng):
    (lin, (packed, state, w)) = _linear_args(rng)
    code, absmax, absmax2, code2, offset = quant_state_args(state)
    x = torch.randn(5, 70, generator=rng)
    x[1, 3] = 9.0
    wq, scb = kq.int8_vectorwise_quant(torch.randn(16, 70, generator=rng))
    dmap = kq.dynamic_map(True)
    q8, a8 = kq.quantize_blockwise(x, 256)
    return [
        (ops.dequantize_4bit, (packed, code, absmax, absmax2, code2, offset, "nf4", 64, [40, 70], torch.bfloat16)),
        (ops.linear_4bit, lin),
        (ops.quantize_4bit, (x, kq.code_4bit("fp4"), "fp4", 64)),
        (ops.quantize_blockwise, (x, dmap, 256)),
        (ops.dequantize_blockwise, (q8, dmap, a8, 256, torch.float32)),
        (ops.int8_quant, (x, 6.0)),
        (ops.int8_linear, (x, wq, scb, None, 6.0)),
    ]


def test_opcheck_every_op(rng):
    for op, args in _all_op_calls(rng):
        torch.library.opcheck(op, args)


def test_ops_equal_kbitc_quant(rng):
    (args, (packed, state, w)) = _linear_args(rng)
    x, bias = args[0], args[7]
    expected = x.double() @ kq.dequantize_4bit(packed, state).double().t() + bias.double()
    torch.testing.assert_close(ops.linear_4bit(*args).double(), expected, rtol=1e-5, atol=1e-5)
    p2, a2 = ops.quantize_4bit(w, kq.code_4bit("nf4"), "nf4", 64)
    p_ref, s_ref = kq.quantize_4bit(w, "nf4", 64, double_quant=False)
    assert torch.equal(p2, p_ref) and torch.equal(a2, s_ref.absmax)


def test_linear_4bit_compiles_fullgraph_and_exports(rng):
    args, _ = _linear_args(rng)
    x, packed, code, absmax, absmax2, code2, offset, bias = args[:8]

    class QuantLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in dict(packed=packed, codebook=code, absmax=absmax, absmax2=absmax2,
                                codebook2=code2, bias=bias).items():
                self.register_buffer(name, t)

        def forward(self, inp):
            return torch.ops.kbitc.linear_4bit(inp, self.packed, self.codebook, self.absmax, self.absmax2,
                                               self.codebook2, offset, self.bias, "nf4", 64, 40)

    module = QuantLinear()
    eager = module(x)
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (x,), dynamic_shapes={"inp": {0: batch}})
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets == ["kbitc.linear_4bit.default"]
    torch.testing.assert_close(program.module()(torch.cat([x, x])), torch.cat([eager, eager]))


def test_int8_linear_compiles_fullgraph(rng):
    x = torch.randn(4, 64, generator=rng)
    wq, scb = kq.int8_vectorwise_quant(torch.randn(8, 64, generator=rng))
    fn = torch.compile(lambda t: torch.ops.kbitc.int8_linear(t, wq, scb, None, 6.0), fullgraph=True)
    torch.testing.assert_close(fn(x), ops.int8_linear(x, wq, scb, None, 6.0))


def test_bad_input_raises(rng):
    args, _ = _linear_args(rng)
    bad = list(args)
    bad[10] = 41  # out_features that does not match the packed weight
    with pytest.raises(UnsupportedInputError, match="packed uint8 bytes"):
        ops.linear_4bit(*bad)
    bad = list(args)
    bad[7] = torch.randn(39)
    with pytest.raises(UnsupportedInputError, match="bias"):
        ops.linear_4bit(*bad)
    with pytest.raises(UnsupportedInputError, match="int8 weight"):
        ops.int8_linear(torch.randn(2, 8), torch.zeros(4, 9, dtype=torch.int8), torch.ones(4), None, 6.0)


def test_code_tables_are_cached_per_tensor_and_version():
    """_sorted_code reuses its tables for the same code tensor, and recomputes them after an
    in-place change (a stale table would silently mis-quantize)."""
    code = torch.tensor([0.5, -1.0, 0.0, 1.0])
    first = ops._sorted_code(code)
    assert ops._sorted_code(code) is first and first[2] is False
    assert torch.equal(first[0], torch.tensor([-0.5, 0.25, 0.75])) and first[1].tolist() == [1, 2, 0, 3]
    code.mul_(2)
    changed = ops._sorted_code(code)
    assert changed is not first and torch.equal(changed[0], torch.tensor([-1.0, 0.5, 1.5]))
    assert ops._sorted_code(torch.tensor([-1.0, 0.0, 1.0]))[2] is True
