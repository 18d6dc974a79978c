"""kbitc.runtime.optim: 8-bit (block-wise dynamic) optimizers with fused CPU / CUDA step kernels."""

from kbitc.runtime.optim.optimizers import (
    Adam8bit, AdamW8bit, Lion8bit, Optimizer8bit, PagedAdam8bit, PagedAdamW8bit, PagedLion8bit, SGD8bit,
)
from kbitc.runtime.optim.paged import PagedMemoryWarning
from kbitc.runtime.optim.kernels import KernelFallbackWarning

__all__ = ["Adam8bit", "AdamW8bit", "KernelFallbackWarning", "Lion8bit", "Optimizer8bit", "PagedAdam8bit",
           "PagedAdamW8bit", "PagedLion8bit", "PagedMemoryWarning", "SGD8bit"]
