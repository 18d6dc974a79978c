"""LayerPlan: what the compiler decided for one linear layer, and the tensors it will write."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch

from kbitc.runtime.quant.state import NESTED_BLOCKSIZE


@dataclasses.dataclass
class LayerPlan:
    name: str  # module path, e.g. model.layers.0.mlp.down_proj
    weight: str  # parameter name in the program
    bias: Optional[str]
    out_features: int
    in_features: int
    scheme: str  # nf4 | fp4 | int8
    blocksize: int
    double_quant: bool
    threshold: float
    transposed: bool = False  # the stored weight is [in, out] (GPT-2's Conv1D, an aten.addmm)
    # filled by QuantizeLinears
    quant_meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    sqnr_db: float = float("nan")
    bits_per_param: float = float("nan")

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def tensor_name(self, part: str) -> str:
        return f"{self.name}.kbitc_{part}"

    def output_layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Every tensor this layer writes to weights.safetensors, with dtype and shape."""
        if self.scheme == "int8":
            return {self.tensor_name("weight"): (torch.int8, (self.out_features, self.in_features)),
                    self.tensor_name("scb"): (torch.float32, (self.out_features,))}
        blocks = math.ceil(self.numel / self.blocksize)
        layout = {self.tensor_name("packed"): (torch.uint8, ((self.numel + 1) // 2,)),
                  self.tensor_name("code"): (torch.float32, (16,))}
        if self.double_quant:
            layout[self.tensor_name("absmax")] = (torch.uint8, (blocks,))
            layout[self.tensor_name("absmax2")] = (torch.float32, (math.ceil(blocks / NESTED_BLOCKSIZE),))
            layout[self.tensor_name("code2")] = (torch.float32, (256,))
        else:
            layout[self.tensor_name("absmax")] = (torch.float32, (blocks,))
        return layout

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items()}
