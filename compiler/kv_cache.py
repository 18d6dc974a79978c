"""The decode program: a causal LM exported with a static KV cache, for token-by-token generation.

The main program recomputes the whole sequence on every call. This one takes (input_ids [1, L],
cache_position [L]) and writes the keys and values of those L positions into per-layer cache
buffers in place, so a decode step reads only the weights and the cache. Shapes never change
between steps, which is what a CUDA graph needs (runtime/decode.py captures one).

Cache buffers belong to the wrapper module (not only to Hugging Face's StaticCache object):
torch.export sees a module's buffers, so the in-place cache writes stay in the graph.
"""

from __future__ import annotations

import dataclasses

import torch

CACHE_PREFIXES = ("key_cache_", "value_cache_")
MODEL_PREFIX = "model."  # the wrapped model's tensors, as named inside the decode program


@dataclasses.dataclass
class DecodeExport:
    program: torch.export.ExportedProgram
    example_kwargs: dict
    dynamic_shapes: dict
    max_cache_len: int
    cache: dict  # buffer name -> (dtype, shape), created zeroed at load time


class StaticCacheLM(torch.nn.Module):
    """A Hugging Face causal LM plus a static cache of `max_cache_len` positions (batch 1)."""

    def __init__(self, model: torch.nn.Module, max_cache_len: int, dtype: torch.dtype, device="meta"):
        import transformers
        from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

        super().__init__()
        self.model = model
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = transformers.StaticCache(config=config, max_cache_len=max_cache_len)
        for i, layer in enumerate(self.cache.layers):
            # A sliding-window layer keeps a rolling window with data-dependent indexing; a full-length
            # layer holds every position and the model's sliding mask still hides the old ones.
            if isinstance(layer, StaticSlidingWindowLayer):
                self.cache.layers[i] = StaticLayer(max_cache_len)
            elif type(layer) is not StaticLayer:
                raise ValueError(f"a static KV cache supports plain attention layers; layer {i} of this model "
                                 f"needs a {type(layer).__name__}")
        self.cache.early_initialization(1, heads, head_dim, dtype, torch.device(device))
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor):
        for i, layer in enumerate(self.cache.layers):  # the buffers as this call sees them
            layer.keys = getattr(self, f"key_cache_{i}")
            layer.values = getattr(self, f"value_cache_{i}")
            layer.cumulative_length = cache_position[0].clone()  # where this call's positions start
        out = type(self.model).forward(self.model, input_ids=input_ids, past_key_values=self.cache,
                                       position_ids=cache_position.unsqueeze(0), use_cache=True)
        return {"logits": out.logits}


def export_decode(model: torch.nn.Module, max_cache_len: int, dtype: torch.dtype) -> DecodeExport:
    """Export `model` (parameters on meta) with a static cache; prompt length is dynamic up to the cache."""
    wrapper = StaticCacheLM(model, max_cache_len, dtype)
    ids = torch.zeros(1, 2, dtype=torch.long, device="meta")
    positions = torch.arange(2, device="meta")
    seq = torch.export.Dim("seq", min=1, max=max_cache_len)
    dynamic = {"input_ids": {1: seq}, "cache_position": {0: seq}}
    kwargs = {"input_ids": ids, "cache_position": positions}
    program = torch.export.export(wrapper, (), kwargs, dynamic_shapes=dynamic, strict=False)
    cache = {name: (b.dtype, tuple(b.shape)) for name, b in wrapper.named_buffers()
             if name.startswith(CACHE_PREFIXES)}
    return DecodeExport(program, kwargs, dynamic, max_cache_len, cache)
