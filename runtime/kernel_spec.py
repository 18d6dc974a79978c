"""KernelSpec: one generated kernel, named procedurally. The name is the cache key, the dispatch
key and the profiler label (DESIGN.md section 8).

Every generated kernel has the same C ABI (see codegen_templates/common/kbitc_abi.h):
`int NAME(const kbitc_args*)`, with per-op slot conventions listed in OP_SLOTS below.
"""

from __future__ import annotations

import dataclasses
import functools

from kbitc.runtime.errors import UnsupportedInputError, expect

CPU_TARGETS = ("cpu_avx2", "cpu_avx512", "cpu_avx512_bf16")
CUDA_TARGETS = ("sm75", "sm80", "sm86", "sm89", "sm90")
TARGETS = CPU_TARGETS + CUDA_TARGETS

# op -> (uses quant_type, uses blocksize). Slots: inputs / outputs / dims / scalars, in order.
OP_SLOTS = {
    "dequantize_4bit": dict(quant=True, blocksize=True,
                            inputs=["packed", "code", "absmax", "absmax_q", "absmax2", "code2"],
                            outputs=["out"], dims=["n"], scalars=["offset"]),
    # ws_partial / splits (CUDA, optional): float32 [splits, m, n] workspace to split K over blocks
    "linear_4bit": dict(quant=True, blocksize=True,
                        inputs=["x", "packed", "code", "absmax", "absmax_q", "absmax2", "code2", "bias"],
                        outputs=["out", "ws_partial"], dims=["m", "n", "k", "splits"], scalars=["offset"]),
    "quantize_4bit": dict(quant=True, blocksize=True, inputs=["x", "midpoints", "order"],
                          outputs=["packed", "absmax"], dims=["n"], scalars=[]),
    "quantize_blockwise": dict(quant=False, blocksize=True, inputs=["x", "midpoints"],
                               outputs=["q", "absmax"], dims=["n"], scalars=[]),
    "dequantize_blockwise": dict(quant=False, blocksize=True, inputs=["q", "code", "absmax"],
                                 outputs=["out"], dims=["n"], scalars=[]),
    "int8_quant": dict(quant=False, blocksize=False, inputs=["x"],
                       outputs=["codes", "rowmax", "mask"], dims=["rows", "cols"], scalars=["threshold"]),
    # acc (CUDA, optional): the int32 product codes @ w^T, precomputed; ws_* then hold int8_quant's results
    "int8_linear": dict(quant=False, blocksize=False, inputs=["x", "w", "scb", "bias", "acc"],
                        outputs=["out", "ws_codes", "ws_rowmax", "ws_mask"], dims=["m", "n", "k"],
                        scalars=["threshold"]),
    # backward of linear_4bit w.r.t. x: grad_x[m,k] = sum_n grad_out[m,n] * w[n,k] (w decoded on the fly)
    "linear_4bit_grad_input": dict(quant=True, blocksize=True, stem="linear_grad_input",
                                   inputs=["grad_out", "packed", "code", "absmax", "absmax_q", "absmax2", "code2"],
                                   outputs=["grad_x"], dims=["m", "n", "k"], scalars=["offset"]),
    # backward of int8_linear w.r.t. x: grad_out @ (w * scb[:, None] / 127)
    "int8_linear_grad_input": dict(quant=False, blocksize=False, inputs=["grad_out", "w", "scb"],
                                   outputs=["grad_x"], dims=["m", "n", "k"], scalars=[]),
    # fused 8-bit optimizer step (runtime/optim): quant_type names the update rule, dtype the param/grad
    # dtype; param, codes and absmax are updated in place; hparams is a HOST float64[8] (docs/kernel_abi.md)
    "optim_8bit": dict(quant=True, blocksize=True, stem="optim8", quant_types=("adam", "lion", "momentum"),
                       inputs=["grad", "qmap1", "mid1", "qmap2", "mid2", "hparams"],
                       outputs=["param", "state1", "state2", "absmax"], dims=["n"], scalars=[]),
}
DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
CPU_ACT_DTYPES = ("f32", "bf16")
CUDA_ACT_DTYPES = ("f16", "bf16", "f32")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    op: str
    target: str
    dtype: str  # activation / input dtype: f32 | f16 | bf16
    quant_type: str = ""  # nf4 | fp4 for 4-bit ops, "" otherwise
    blocksize: int = 0  # 0 for ops without blocks
    config: tuple[tuple[str, int], ...] = ()  # tile / launch parameters, part of the name

    def __post_init__(self) -> None:
        expect(self.op in OP_SLOTS, UnsupportedInputError,
               f"expected a kernel op in {sorted(OP_SLOTS)}, got {self.op!r}")
        expect(self.target in TARGETS, UnsupportedInputError,
               f"expected a target in {TARGETS}, got {self.target!r}")
        allowed = CPU_ACT_DTYPES if self.is_cpu else CUDA_ACT_DTYPES
        expect(self.dtype in allowed, UnsupportedInputError,
               f"expected dtype in {allowed} for target {self.target}, got {self.dtype!r}")
        slots = OP_SLOTS[self.op]
        expect(bool(self.quant_type) == slots["quant"], UnsupportedInputError,
               f"op {self.op} {'needs' if slots['quant'] else 'takes no'} quant_type, got {self.quant_type!r}")
        if "quant_types" in slots:
            expect(self.quant_type in slots["quant_types"], UnsupportedInputError,
                   f"expected quant_type in {slots['quant_types']} for op {self.op}, got {self.quant_type!r}")
        expect(bool(self.blocksize) == slots["blocksize"], UnsupportedInputError,
               f"op {self.op} {'needs' if slots['blocksize'] else 'takes no'} blocksize, got {self.blocksize}")

    @property
    def is_cpu(self) -> bool:
        return self.target in CPU_TARGETS

    @property
    def device_type(self) -> str:
        return "cpu" if self.is_cpu else "cuda"

    @functools.cached_property  # read on every op call (library.call); the fields are frozen
    def name(self) -> str:
        parts = ["kbitc", self.target]
        parts.append(self.quant_type or ("q8" if "blockwise" in self.op else "int8" if "int8" in self.op else ""))
        stem = OP_SLOTS[self.op].get("stem") or self.op.removeprefix("int8_").removesuffix("_4bit").removesuffix("_blockwise")
        parts += [stem, self.dtype]
        if self.blocksize:
            parts.append(f"b{self.blocksize}")
        parts += [f"{k}{v}" for k, v in self.config]
        return "_".join(p for p in parts if p)

    def to_json(self) -> dict:
        return {"op": self.op, "target": self.target, "dtype": self.dtype, "quant_type": self.quant_type,
                "blocksize": self.blocksize, "config": [list(c) for c in self.config], "name": self.name}

    @classmethod
    def from_json(cls, d: dict) -> "KernelSpec":
        return cls(op=d["op"], target=d["target"], dtype=d["dtype"], quant_type=d.get("quant_type", ""),
                   blocksize=int(d.get("blocksize", 0)), config=tuple(tuple(c) for c in d.get("config", ())))
