"""Text generation with a compiled causal LM: the loop behind `kbitc generate`.

The exported program has no KV cache yet, so each step re-runs the whole sequence; fine for the
small models it is used with today.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kbitc.runtime.errors import KbitcError
from kbitc.runtime.loader import load


class GenerateError(KbitcError):
    """The artifact cannot generate text (not a causal LM, or no tokenizer bundled)."""


def load_tokenizer(artifact: Path):
    folder = artifact / "tokenizer"
    if not folder.is_dir():
        raise GenerateError(f"{artifact} has no bundled tokenizer: compile from a model folder that has one")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise GenerateError("generating text needs `pip install transformers` for the tokenizer") from exc
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@torch.no_grad()
def generate_ids(model, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None, eos_token_id: int | None = None) -> torch.Tensor:
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids).logits[:, -1, :].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)
        else:
            nxt = logits.argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if eos_token_id is not None and bool((nxt == eos_token_id).all()):
            break
    return ids


def generate_text(artifact: Path, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0,
                  seed: int = 0, device: str = "cpu") -> str:
    artifact = Path(artifact)
    model = load(artifact, device=device)
    if not model.kbitc_manifest.get("is_causal_lm"):
        raise GenerateError(f"{artifact} is not a causal language model")
    tokenizer = load_tokenizer(artifact)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = generate_ids(model, ids, max_new_tokens, temperature, torch.Generator().manual_seed(seed),
                       tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)
