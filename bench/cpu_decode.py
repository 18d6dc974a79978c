"""Batch-1 decode on the CPU: kbitc's static-KV-cache decoder (eager and torch.compile'd step) vs
kbitc without a cache (the whole sequence per token) vs Hugging Face eager (float32 / bfloat16, and
bitsandbytes NF4 on its CPU backend), in one process; float32 and bf16 activations.

The model is a random-init LLaMA-style config (hidden 1024, intermediate 2816, 8 layers, 16 heads,
vocab 32000; ~170M params, float32). Every contender runs the same 32-token prompt, then --steps
greedy tokens; ms/token is wall time of the decode loop / steps (median of --repeats loops).

    python bench/cpu_decode.py [--steps 64] [--no-append]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, run_contender, speed_table  # noqa: E402

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000, max_position_embeddings=512)
PROMPT = 32


def time_loop(step, first: torch.Tensor, steps: int, repeats: int, reset) -> float:
    samples = []
    for r in range(repeats + 1):  # the first loop warms up
        reset()
        tok = first
        start = time.perf_counter()
        for _ in range(steps):
            tok = step(tok).argmax(dim=-1).reshape(1, 1)
        if r:
            samples.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(samples)


def build_source(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False)).save_pretrained(str(folder))


@torch.no_grad()
def bench_kbitc(folder: Path, tmp: Path, prompt: torch.Tensor, args, dtype: str = "f32") -> dict:
    import kbitc

    out = kbitc.compile(str(folder), output=tmp / f"m-{dtype}.kbit", target="cpu", scheme="nf4", compute_dtype=dtype,
                        kv_cache=args.cache, progress=False)
    model = kbitc.load(out)
    results = {}
    variants = [("decoder", False), ("compiled", True)] if dtype == "f32" else [("compiled", True)]
    for key, compiled in variants:
        decoder = model.decoder(compiled=compiled)
        logits = decoder.prefill(prompt)[:, -1]
        results["first_logits"] = logits

        def reset(decoder=decoder):
            decoder.length = PROMPT

        results[key] = time_loop(decoder.step, logits.argmax(-1).reshape(1, 1), args.steps, args.repeats, reset)
        print(f"kbitc {dtype} {key}: {results[key]:.2f} ms/token", flush=True)
    if dtype != "f32":
        return results
    state = {}

    def reset_plain():
        state["ids"] = prompt

    def plain_step(tok):  # no cache: the whole sequence through the main program
        state["ids"] = torch.cat([state["ids"], tok], dim=1)
        return model(input_ids=state["ids"]).logits[:, -1]

    first = results["first_logits"].argmax(-1).reshape(1, 1)
    results["recompute"] = time_loop(plain_step, first, args.steps, args.repeats, reset_plain)
    return results


@torch.no_grad()
def bench_hf(folder: Path, prompt: torch.Tensor, args, quantized: bool, dtype=torch.float32) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, DynamicCache

    kwargs = {"dtype": dtype}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).eval()
    state = {}

    def reset():
        state["cache"] = DynamicCache(config=model.config)
        model(input_ids=prompt, past_key_values=state["cache"], use_cache=True)

    def step(tok):
        return model(input_ids=tok, past_key_values=state["cache"], use_cache=True).logits[:, -1]

    logits = model(input_ids=prompt, use_cache=False).logits[:, -1]
    return {"eager": time_loop(step, logits.argmax(-1).reshape(1, 1), args.steps, args.repeats, reset),
            "first_logits": logits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=int, default=128)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    assert PROMPT + args.steps + 1 <= args.cache
    torch.manual_seed(0)
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, PROMPT))
    rows, notes = {}, []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        build_source(tmp / "src")
        for name, fn in [("kbitc", lambda: bench_kbitc(tmp / "src", tmp, prompt, args)),
                         ("fp32", lambda: bench_hf(tmp / "src", prompt, args, quantized=False)),
                         ("bnb", lambda: bench_hf(tmp / "src", prompt, args, quantized=True)),
                         ("kbitc_bf16", lambda: bench_kbitc(tmp / "src", tmp, prompt, args, "bf16")),
                         ("bf16", lambda: bench_hf(tmp / "src", prompt, args, False, torch.bfloat16)),
                         ("bnb_bf16", lambda: bench_hf(tmp / "src", prompt, args, True, torch.bfloat16))]:
            run_contender(rows, notes, name, fn)
    if "kbitc" in rows and "bnb" in rows:
        a, b = rows["kbitc"]["first_logits"], rows["bnb"]["first_logits"]
        notes.append(f"logits after the prompt, kbitc vs bitsandbytes NF4: relative L2 {float((a - b).norm() / b.norm()):.4f}")
    best = rows.get("kbitc", {}).get("compiled")
    table = speed_table(rows, [
        ("kbitc NF4, KV-cache decoder, torch.compile'd step", "kbitc", "compiled"),
        ("kbitc NF4, KV-cache decoder", "kbitc", "decoder"),
        ("kbitc NF4, no cache (whole sequence per token)", "kbitc", "recompute"),
        ("float32 HF eager (dynamic cache)", "fp32", "eager"),
        ("bitsandbytes NF4 (CPU backend) + HF eager", "bnb", "eager"),
        ("kbitc NF4, bf16 activations, KV-cache decoder, compiled step", "kbitc_bf16", "compiled"),
        ("bfloat16 HF eager (dynamic cache)", "bf16", "eager"),
        ("bitsandbytes NF4, bf16 compute + HF eager", "bnb_bf16", "eager")],
        best, "vs kbitc compiled decoder, float32", ms_digits=2, tps_digits=1)
    text = "\n".join(table + [""] + [f"- {n}" for n in notes])
    print(text)
    if not args.no_append:
        append_results(f"CPU batch-1 decode, ~170M LLaMA-style random-init model, prompt {PROMPT}, {args.steps} new "
                       f"tokens, {args.cache}-position KV cache", "python bench/cpu_decode.py", text)


if __name__ == "__main__":
    main()
