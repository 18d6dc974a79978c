"""The bundled example model: compile -> load -> generate, and its NF4 perplexity stays close."""

import math
from pathlib import Path

import pytest
import torch

import kbitc

transformers = pytest.importorskip("transformers")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-llama-kjv"
TEXT = ("And God said, Let there be light: and there was light. And God saw the light, that it was good: "
        "and God divided the light from the darkness. And God called the light Day, and the darkness he "
        "called Night. And the evening and the morning were the first day.")


def _perplexity(logits, ids):
    return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item())


@pytest.mark.parametrize("scheme,max_ratio", [
    # measured on this text: NF4 1.02x, int8 1.00x the float model's perplexity (37.1)
    ("nf4", 1.25), ("int8", 1.05),
])
def test_example_compiles_loads_and_keeps_perplexity(tmp_path, scheme, max_ratio):
    out = kbitc.compile(EXAMPLE, output=tmp_path / "m.kbit", scheme=scheme, progress=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(EXAMPLE))
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    base = transformers.AutoModelForCausalLM.from_pretrained(str(EXAMPLE), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ppl_base = _perplexity(base(input_ids=ids).logits, ids)
        ppl = _perplexity(kbitc.load(out)(input_ids=ids).logits, ids)
    assert ppl_base < 60  # it learned the text (measured 37; an untrained model: ~2000)
    assert ppl <= ppl_base * max_ratio, (ppl, ppl_base)


def test_example_generates_text(tmp_path):
    from kbitc.runtime.generate import generate_text

    out = kbitc.compile(EXAMPLE, output=tmp_path / "m.kbit", progress=False)
    text = generate_text(out, "In the beginning God", max_new_tokens=12)
    assert text.startswith("In the beginning God") and len(text.split()) >= 8
