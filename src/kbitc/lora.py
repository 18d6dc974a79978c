"""kbitc.lora: LoRA adapters on a loaded artifact (attach, train, save / load in PEFT's layout, merge).

    m = kbitc.load("model.kbit")
    kbitc.lora.attach(m, r=16, alpha=32, targets=["*q_proj", "*v_proj"])
    opt = torch.optim.AdamW(kbitc.lora.trainable_parameters(m), lr=1e-4)
    ...
    kbitc.lora.save(m, "adapters/")                 # loads into peft.PeftModel on the 16-bit model
    report = kbitc.lora.merge(m, "merged.kbit")     # fold into the base weights, re-quantize

Faster steps: `m.compile()` (torch.compile, in place) fuses the ops between kbitc kernels, and on CUDA
`kbitc.lora.CudaGraphStep` captures forward + backward as one CUDA graph (runtime/graph_step.py).
"""

from kbitc.runtime.graph_step import CudaGraphStep, GraphStepError  # noqa: F401
from kbitc.runtime.lora import (  # noqa: F401
    LoraAdapter, LoraConfig, LoraError, adapters, attach, config, load, quantized_layers, save, trainable_parameters,
)


def merge(model, output, force: bool = False):
    """Fold the adapters into the quantized weights and write a new artifact (see
    kbitc.compiler.lora_merge.merge); returns a MergeReport with the added quantization error."""
    from kbitc.compiler.lora_merge import merge as _merge

    return _merge(model, output, force=force)
