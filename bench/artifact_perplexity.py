"""Perplexity of one compiled artifact on token windows saved by another machine, to check that an
artifact compiled here (e.g. --target sm90 on a machine without a GPU) gives there what the CPU
artifact gives here.

    python bench/artifact_perplexity.py --save-windows windows.pt /tmp/gemma-3-270m   # here: tokenize once
    python bench/artifact_perplexity.py model.kbit --windows windows.pt --device cuda [--expect 15.27]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from perplexity import kjv_windows, perplexity  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a .kbit artifact, or (with --save-windows) a tokenizer folder")
    parser.add_argument("--windows", type=Path, help="token windows saved by --save-windows")
    parser.add_argument("--save-windows", type=Path, help="tokenize the KJV windows with PATH's tokenizer and save")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--expect", type=float, help="the perplexity measured elsewhere (e.g. the CPU artifact)")
    args = parser.parse_args()
    if args.save_windows:
        from transformers import AutoTokenizer

        torch.save(kjv_windows(AutoTokenizer.from_pretrained(str(args.path)), None), args.save_windows)
        return
    import kbitc

    windows = torch.load(args.windows, weights_only=True)
    start = time.perf_counter()
    model = kbitc.load(args.path, device=args.device)
    loaded = time.perf_counter() - start
    ppl = perplexity(model, windows, args.device)
    line = f"{args.path.name} on {args.device}: perplexity {ppl:.4f} (load {loaded:.1f} s)"
    if args.expect:
        line += f"; expected {args.expect:.4f}, ratio {ppl / args.expect:.4f}"
    print(line)


if __name__ == "__main__":
    main()
