"""Text generation with a compiled causal LM: the loop behind `kbitc generate`.

An artifact compiled with --kv-cache N decodes one token per step through its static-cache program
(runtime/decode.py; a CUDA graph on CUDA). Without one, or for a batch of prompts, each step
re-runs the whole sequence through the main program.
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


def _pick(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    logits = logits.float()
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)
    return logits.argmax(dim=-1, keepdim=True)


@torch.no_grad()
def generate_ids(model, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None, eos_token_id: int | None = None,
                 decoder=None) -> torch.Tensor:
    """Append up to max_new_tokens to ids [batch, L]. With a `decoder` (batch 1 only) each new
    token costs one cached step instead of a pass over the whole sequence."""
    if decoder is not None and ids.shape[0] == 1 and ids.shape[1] + max_new_tokens <= decoder.max_cache_len:
        decoder.reset()
        logits = decoder.prefill(ids)[:, -1]
        for i in range(max_new_tokens):
            nxt = _pick(logits, temperature, generator)
            ids = torch.cat([ids, nxt], dim=1)
            if (eos_token_id is not None and bool((nxt == eos_token_id).all())) or i == max_new_tokens - 1:
                break
            logits = decoder.step(nxt)
        return ids
    for _ in range(max_new_tokens):
        nxt = _pick(model(input_ids=ids).logits[:, -1, :], temperature, generator)
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
    decoder = None
    if model.kbitc_manifest.get("decode"):
        decoder = model.decoder(cuda_graph=torch.device(device).type == "cuda")
    out = generate_ids(model, ids, max_new_tokens, temperature, torch.Generator().manual_seed(seed),
                       tokenizer.eos_token_id, decoder)
    return tokenizer.decode(out[0], skip_special_tokens=True)
