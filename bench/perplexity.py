"""Perplexity of a model compiled by kbitc (nf4 / fp4 / int8) next to bitsandbytes with the same
settings and the unquantized baseline, in one run, on 8 windows x 1024 tokens of the KJV Bible.

    python bench/prepare_gemma.py --out /tmp/gemma-3-270m
    python bench/perplexity.py /tmp/gemma-3-270m [--device cuda --target sm90]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import append_results  # noqa: E402

import kbitc  # noqa: E402

WINDOWS, SEQ = 8, 1024


def kjv_windows(tokenizer, text_file: Path | None) -> torch.Tensor:
    if text_file is not None:
        text = text_file.read_text()
    else:
        text = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    ids = tokenizer(text[: 200_000]).input_ids  # the first ~45k tokens: Genesis
    ids = torch.tensor(ids[: WINDOWS * SEQ]).view(WINDOWS, SEQ)
    return ids


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: str) -> float:
    nll = 0.0
    for w in windows:
        ids = w[None].to(device)
        logits = model(input_ids=ids).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
    return math.exp(nll / (windows.numel() - len(windows)))


def bnb_model(folder: Path, scheme: str, device: str):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head") or module.weight.numel() < 4096:
            continue
        if scheme == "int8":
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
        else:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      quant_type=scheme, compress_statistics=True, compute_dtype=torch.float32)
        layer.load_state_dict(module.state_dict())
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
    return model.to(device)


def bf16_size_mib(folder: Path) -> float:
    """What the source model's weights take in bf16 (2 bytes per stored parameter)."""
    from safetensors import safe_open

    numel = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                count = 1
                for d in shape:
                    count *= d
                numel += count
    return numel * 2 / 2**20


def compile_in_subprocess(model: Path, out: Path, target: str, scheme: str) -> tuple[float, float]:
    """Compile in a fresh process, so its peak RSS is the compile's alone: (seconds, GiB). VmHWM, not
    ru_maxrss: Linux keeps ru_maxrss across exec, so it would report this (forked) process's peak."""
    code = ("import sys, time, kbitc; t = time.perf_counter(); "
            f"kbitc.compile({str(model)!r}, output={str(out)!r}, target={target!r}, scheme={scheme!r}, "
            "progress=False, compute_dtype='f32'); "
            "print(time.perf_counter() - t, [l.split()[1] for l in open('/proc/self/status') "
            "if l.startswith('VmHWM')][0])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, rss_kib = result.stdout.split()[-2:]
    return float(seconds), float(rss_kib) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--schemes", default="nf4,fp4,int8")
    parser.add_argument("--text", type=Path, help="text file (default: the KJV Bible via `bible`)")
    parser.add_argument("--no-bnb", action="store_true")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    windows = kjv_windows(tokenizer, args.text)
    rows = ["| model | scheme | kbitc ppl | bitsandbytes ppl | kbitc / bnb | compile s | peak RSS GiB | "
            "artifact weights MiB | vs bf16 |", "|---|---|---|---|---|---|---|---|---|"]
    base = AutoModelForCausalLM.from_pretrained(str(args.model), torch_dtype=torch.float32).eval().to(args.device)
    base_ppl = perplexity(base, windows, args.device)
    del base
    bf16_mib = bf16_size_mib(args.model)
    rows.append(f"| {args.model.name} | fp32 baseline | {base_ppl:.2f} | | | | | {bf16_mib:.0f} (bf16) | 1.00 |")
    tmp = Path(tempfile.mkdtemp(prefix="kbitc-ppl-"))
    for scheme in args.schemes.split(","):
        out = tmp / f"{scheme}.kbit"
        seconds, rss = compile_in_subprocess(args.model, out, args.target, scheme)
        ours = perplexity(kbitc.load(out, device=args.device), windows, args.device)
        theirs = float("nan") if args.no_bnb else perplexity(bnb_model(args.model, scheme, args.device), windows,
                                                             args.device)
        size = (out / "weights.safetensors").stat().st_size / 2**20
        rows.append(f"| {args.model.name} | {scheme} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.4f} | "
                    f"{seconds:.0f} | {rss:.2f} | {size:.0f} | {size / bf16_mib:.2f} |")
        print(rows[-1], flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    append_results(f"Perplexity, {WINDOWS} x {SEQ} tokens of the KJV Bible (Genesis), device {args.device}",
                   "python bench/perplexity.py " + " ".join(sys.argv[1:]), "\n".join(rows) +
                   "\n\nCompile time and peak RSS are those of a separate process running only the compile "
                   f"(source model {sum(f.stat().st_size for f in args.model.glob('*.safetensors')) / 2**20:.0f} MiB "
                   "of safetensors).")


if __name__ == "__main__":
    main()
