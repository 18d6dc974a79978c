"""Train the bundled example: a ~2M-parameter LLaMA-architecture model on the King James Bible.

Reproducible and offline: the text comes from Debian's bible-kjv package (`apt-get install
bible-kjv`, which provides the `bible` command and its data), the tokenizer is a byte-level BPE
trained here, and everything is seeded. Writes a Hugging Face model folder (config.json,
model.safetensors in bf16, tokenizer files) that `kbitc compile` reads.

    python examples/train_tiny_llama.py --steps 1200 --out examples/tiny-llama-kjv
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import time
from pathlib import Path

import torch

HELD_OUT_FRACTION = 0.05  # the last 5% of the text (Colossians to Revelation) is never trained on


def kjv_text() -> str:
    raw = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    verses, current = [], []
    for line in raw.splitlines():
        if re.match(r"^\S.*\d+$", line) or not line.strip():  # "Genesis 1" headers and blank lines
            continue
        m = re.match(r"^\s+\d+ (.*)$", line)
        if m:
            if current:
                verses.append(" ".join(current))
            current = [m.group(1).strip()]
        else:
            current.append(line.strip())
    if current:
        verses.append(" ".join(current))
    return "\n".join(verses) + "\n"


def split(text: str) -> tuple[str, str]:
    cut = text.rfind("\n", 0, int(len(text) * (1 - HELD_OUT_FRACTION))) + 1
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int, folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq: int, max_windows: int = 64) -> float:
    model.eval()
    windows = ids[: (ids.numel() // seq) * seq].view(-1, seq)[:max_windows]
    losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    model.train()
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("tiny-llama-kjv"))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    train_text, held_out = split(kjv_text())
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(train_text, 2048, args.out)
    train_ids = torch.tensor(tokenizer(train_text).input_ids)
    val_ids = torch.tensor(tokenizer(held_out).input_ids)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; {train_ids.numel()} train tokens, "
          f"{val_ids.numel()} held-out tokens")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, train_ids.numel() - args.seq - 1, (args.batch,), generator=g)
        batch = torch.stack([train_ids[i: i + args.seq] for i in idx.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    print(f"held-out perplexity {perplexity(model, val_ids, args.seq):.2f}")
    model.config.use_cache = False
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    (args.out / "README.md").write_text(
        f"Tiny LLaMA trained by examples/train_tiny_llama.py on the KJV Bible (Debian bible-kjv), "
        f"{args.steps} steps, batch {args.batch}x{args.seq}, seed {args.seed}. Held-out text: the last "
        f"{HELD_OUT_FRACTION:.0%} of the Bible.\n")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
