"""Writes examples/tiny_llama_linears.safetensors: the linear weights of one LLaMA-style decoder
layer (hidden 256, intermediate 688) in bf16, drawn N(0, 0.02) with a few outlier input features as
real LLMs have. Seeded, so the file is reproducible. `kbitc compile`'s issue replaces this with a
trained model."""

from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE = 256, 688


def main(out: Path = Path(__file__).with_name("tiny_llama_linears.safetensors")) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
        "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTERMEDIATE, HIDDEN),
        "up_proj": (INTERMEDIATE, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE),
    }
    tensors = {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=g) * 0.02
        cols = torch.randint(0, shape[1], (3,), generator=g)
        w[:, cols] *= 8  # outlier input features
        prefix = "model.layers.0.self_attn." if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) \
            else "model.layers.0.mlp."
        tensors[prefix + name + ".weight"] = w.bfloat16()
    save_file(tensors, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
