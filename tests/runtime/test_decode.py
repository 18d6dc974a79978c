"""The static-KV-cache decode program (compile --kv-cache): cached steps give the logits of a full
forward pass over the whole sequence, generation matches the cache-free loop, and misuse fails
clearly. The CUDA-graph variant runs on a GPU only (skipped here without one)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kbitc
from kbitc.compiler.frontend import FrontendError
from kbitc.runtime.decode import DecodeError
from kbitc.runtime.generate import generate_ids

pytest.importorskip("transformers")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama-kjv"
CACHE = 48


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return kbitc.compile(EXAMPLE, output=tmp_path_factory.mktemp("kv") / "m.kbit", kv_cache=CACHE, progress=False)


def _tokens(n, seed=0):
    return torch.randint(0, 2048, (1, n), generator=torch.Generator().manual_seed(seed))


def _check_against_full_forward(model, decoder, ids, prompt_len):
    """Prefill `prompt_len` tokens, then one step per remaining token; compare every position with
    one full forward pass. The two differ only in float32 rounding (attention over a 48-slot masked
    cache vs the causal sequence): measured max |diff| 1.2e-5 at max |logit| 17 (7e-7 relative), so
    the bound is 1e-5 relative; a cache one position off misses it by 1000x (measured 1.9)."""
    with torch.no_grad():
        full = model(input_ids=ids).logits
    decoder.reset()
    prefill = decoder.prefill(ids[:, :prompt_len])
    steps = torch.stack([decoder.step(ids[:, t]) for t in range(prompt_len, ids.shape[1])], dim=1)
    scale = float(full.abs().max())
    torch.testing.assert_close(prefill, full[:, :prompt_len], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(steps, full[:, prompt_len:], rtol=0, atol=1e-5 * scale)


def test_cached_steps_match_full_forward(artifact):
    model = kbitc.load(artifact)
    decoder = model.decoder()
    assert decoder.max_cache_len == CACHE
    _check_against_full_forward(model, decoder, _tokens(30), prompt_len=11)
    _check_against_full_forward(model, decoder, _tokens(CACHE, seed=1), prompt_len=1)  # reuse after reset, full cache


@pytest.mark.parametrize("window", [16, 64])
def test_sliding_window_model_decodes_like_its_full_forward(tmp_path, window):
    """Gemma-3 style: sliding-window layers (window shorter, then longer, than the 40 tokens run) and
    a global one. The cache keeps every position; the model's sliding mask hides the old ones.
    (Hugging Face's rolling sliding-window cache layer gave wrong steps here: 0.9 max error.)"""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma3TextConfig"):
        pytest.skip("this transformers has no Gemma 3")
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, vocab_size=512, max_position_embeddings=256, sliding_window=window,
        layer_types=["sliding_attention"] * 3 + ["full_attention"])
    transformers.Gemma3ForCausalLM(cfg).save_pretrained(str(tmp_path / "src"))
    model = kbitc.load(kbitc.compile(tmp_path / "src", output=tmp_path / "m.kbit", kv_cache=CACHE, progress=False))
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    _check_against_full_forward(model, model.decoder(), ids, prompt_len=9)


def test_decoder_carries_attached_lora_adapters(artifact):
    """Adapters attached before decoder() run in the decode program too (the same modules)."""
    model = kbitc.load(artifact)
    names = kbitc.lora.attach(model, r=4, alpha=8, targets=["*q_proj", "*down_proj"])
    gen = torch.Generator().manual_seed(5)
    for adapter in kbitc.lora.adapters(model).values():  # B = 0 would hide a missing adapter
        adapter.lora_B.weight.data.normal_(0, 0.05, generator=gen)
    model.eval()
    decoder = model.decoder()
    assert sum(isinstance(m, kbitc.lora.LoraAdapter) for m in decoder.program.modules()) == len(names)
    _check_against_full_forward(model, decoder, _tokens(20, seed=6), prompt_len=5)


def test_generation_with_cache_equals_recompute_loop(artifact):
    model = kbitc.load(artifact)
    prompt = _tokens(7, seed=2)
    plain = generate_ids(model, prompt, max_new_tokens=20)
    cached = generate_ids(model, prompt, max_new_tokens=20, decoder=model.decoder())
    assert torch.equal(plain, cached)


COMPILED_CHECK = """
import sys, torch, kbitc
model = kbitc.load(sys.argv[1])
ids = torch.randint(0, 2048, (1, 24), generator=torch.Generator().manual_seed(4))
compiled, plain = model.decoder(compiled=True), model.decoder()
compiled.prefill(ids[:, :8]); plain.prefill(ids[:, :8])
a = torch.stack([compiled.step(ids[:, t]) for t in range(8, 24)], 1)
b = torch.stack([plain.step(ids[:, t]) for t in range(8, 24)], 1)
assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "torch.compile did not run"
err, scale = float((a - b).abs().max()), float(b.abs().max())
print(f"max |compiled - eager| = {err:.3g} at max |logit| {scale:.3g}")
assert err <= 1e-5 * scale, (err, scale)
"""


def test_compiled_steps_match_eager_steps(artifact):
    """decoder(compiled=True): Inductor fuses the ops between kbitc kernels, float32 rounding aside the
    same logits (bound 1e-5 of max |logit|, as above). Run in a fresh interpreter because this test
    process disables dynamo (tests/conftest.py)."""
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "0"}
    done = subprocess.run([sys.executable, "-c", COMPILED_CHECK, str(artifact)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max |compiled - eager|" in done.stdout


def test_cli_generate_and_inspect_use_the_decode_program(artifact):
    from click.testing import CliRunner

    from kbitc.cli import main
    from kbitc.runtime.generate import generate_text, load_tokenizer

    runner = CliRunner()
    shown = runner.invoke(main, ["inspect", str(artifact)])
    assert shown.exit_code == 0 and f"static KV cache of {CACHE} positions" in shown.output
    cached = runner.invoke(main, ["generate", str(artifact), "--prompt", "In the beginning God",
                                  "--max-new-tokens", "12"])
    assert cached.exit_code == 0, cached.output
    tok = load_tokenizer(artifact)  # the same prompt through the cache-free loop
    ids = tok("In the beginning God", return_tensors="pt").input_ids
    plain = generate_ids(kbitc.load(artifact), ids, max_new_tokens=12, eos_token_id=tok.eos_token_id)
    assert cached.output.strip() == tok.decode(plain[0], skip_special_tokens=True).strip()
    assert generate_text(artifact, "In the beginning God", max_new_tokens=12).strip() == cached.output.strip()


def test_full_cache_and_bad_prompt_fail_clearly(artifact):
    decoder = kbitc.load(artifact).decoder()
    decoder.prefill(_tokens(CACHE - 1))
    decoder.step(torch.tensor([5]))
    with pytest.raises(DecodeError, match="holds 48 positions"):
        decoder.step(torch.tensor([5]))
    decoder.reset()
    with pytest.raises(DecodeError, match=r"shape \[1, L >= 1\]"):
        decoder.prefill(_tokens(4).expand(2, 4))
    with pytest.raises(DecodeError, match="needs the model on a CUDA device"):
        kbitc.load(artifact).decoder(cuda_graph=True)


def test_without_kv_cache_there_is_no_decoder(tmp_path):
    model = kbitc.load(kbitc.compile(EXAMPLE, output=tmp_path / "m.kbit", progress=False))
    with pytest.raises(DecodeError, match="compile it with --kv-cache"):
        model.decoder()


def test_kv_cache_longer_than_the_model_or_on_a_non_hf_model_is_refused(tmp_path):
    with pytest.raises(FrontendError, match="exceeds the model's"):
        kbitc.compile(EXAMPLE, output=tmp_path / "a.kbit", kv_cache=10**6, progress=False)
    with pytest.raises(FrontendError, match="Hugging Face causal LM folder"):
        kbitc.compile(tmp_path / "exported.pt2", output=tmp_path / "b.kbit", kv_cache=16, progress=False)
    assert not (tmp_path / "a.kbit").exists() and not (tmp_path / "b.kbit").exists()


def _small_llama(folder: Path) -> Path:
    """A random-init LLaMA without grouped-query attention: with torch 2.11 + transformers 5.17, export
    of a GQA model with a dynamic sequence length fails on a shape guard (the bundled example is GQA)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return folder


@pytest.mark.skipif(not torch.cuda.is_available() or shutil.which("nvcc") is None,
                    reason="needs a CUDA GPU and nvcc (none here)")
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_cuda_graph_steps_match_eager_steps_and_full_forward(tmp_path, dtype):
    major, minor = torch.cuda.get_device_capability()
    out = kbitc.compile(_small_llama(tmp_path / "src"), output=tmp_path / "m.kbit", target=f"sm{major}{minor}",
                        compute_dtype=dtype, kv_cache=CACHE, progress=False)
    model = kbitc.load(out, device="cuda")
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3)).cuda()
    graphed, eager = model.decoder(cuda_graph=True), model.decoder()
    if dtype == "f32":
        _check_against_full_forward(model, graphed, ids, prompt_len=9)
    else:  # bf16: prefill (GEMM) and steps (GEMV) round differently; measured 0.35% of max |logit| (H100)
        with torch.no_grad():
            full = model(input_ids=ids).logits.float()
        graphed.prefill(ids[:, :9])
        steps = torch.stack([graphed.step(ids[:, t]) for t in range(9, 40)], dim=1).float()
        torch.testing.assert_close(steps, full[:, 9:], rtol=0, atol=0.03 * float(full.abs().max()))
    graphed.reset()
    eager.reset()
    graphed.prefill(ids[:, :9])
    eager.prefill(ids[:, :9])
    for t in range(9, 40):
        assert torch.equal(graphed.step(ids[:, t]), eager.step(ids[:, t]))  # same kernels, same inputs
