"""kbitc.quant.quantize_4bit (NF4 + double quant) vs bitsandbytes' CPU quantize_4bit, same process.

Run: python bench/quantize_cpu.py   (appends its table to bench/RESULTS.md)
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # bnb's own torch.compile wrapper: time it eagerly

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import append_results, median_seconds  # noqa: E402

import kbitc.quant as kq  # noqa: E402


def main() -> None:
    import bitsandbytes.functional as F

    shape = (4096, 11008)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    kbitc_s = median_seconds(lambda: kq.quantize_4bit(w, "nf4", 64, double_quant=True))
    bnb_s = median_seconds(lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True))
    packed, _ = kq.quantize_4bit(w, "nf4", 64, double_quant=True)
    b_packed, _ = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, b_packed.view(-1)), "kbitc and bitsandbytes disagree: benchmark invalid"
    in_bytes = w.numel() * w.element_size()
    table = "\n".join([
        "| quantize_4bit NF4+DQ, 4096x11008 bf16 | median ms (5 runs) | GB/s of input | vs bitsandbytes |",
        "|---|---|---|---|",
        f"| bitsandbytes CPU | {bnb_s * 1e3:.1f} | {in_bytes / bnb_s / 1e9:.3f} | 1.00x |",
        f"| kbitc.quant (pure PyTorch) | {kbitc_s * 1e3:.1f} | {in_bytes / kbitc_s / 1e9:.3f} | {bnb_s / kbitc_s:.2f}x |",
    ])
    append_results("quantize_4bit on CPU (pure-PyTorch reference quantizer)",
                   "python bench/quantize_cpu.py", table)


if __name__ == "__main__":
    main()
