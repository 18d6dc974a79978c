"""QLoRA fine-tuning of the bundled example artifact: `kbitc finetune` learns, saves PEFT-layout
adapters, and a Ctrl-C checkpoint resumes bit for bit."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import kbitc
from kbitc.cli import main
from kbitc.runtime import lora
from kbitc.runtime.finetune import CHECKPOINT, FinetuneConfig, FinetuneError, finetune

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny-llama-kjv"
# a real text the example model (trained on the KJV Bible) has never seen: this project's README
TEXT = (ROOT / "README.md").read_text()
CFG = dict(r=4, alpha=8, dropout=0.1, steps=6, lr=5e-3, batch_size=2, seq_len=32, warmup_steps=2, eval_windows=4)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "m.kbit"
    return kbitc.compile(EXAMPLE, output=out, scheme="nf4", trainable=True, progress=False)


class _StopAt:
    """A progress wrapper that raises KeyboardInterrupt (as Ctrl-C would) before step `at`."""

    def __init__(self, at):
        self.at = at

    def __call__(self, iterable, **kw):
        for step in iterable:
            if step == self.at:
                raise KeyboardInterrupt
            yield step


def test_finetune_lowers_heldout_perplexity_and_saves_peft_adapters(artifact, tmp_path):
    report = finetune(artifact, TEXT, tmp_path / "a", FinetuneConfig(**CFG))
    assert report["heldout_ppl_after"] < report["heldout_ppl_before"], report
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert tensors and all(k.startswith("base_model.model.") for k in tensors)
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_B" in k)  # B moved from zero
    # the saved adapters reproduce the trained model's held-out perplexity
    model = kbitc.load(artifact)
    lora.load(model, tmp_path / "a")
    from kbitc.runtime.finetune import TextSplit, perplexity
    from kbitc.runtime.generate import load_tokenizer

    split = TextSplit.from_text(TEXT, load_tokenizer(Path(artifact)), 0.1, 32)
    assert perplexity(model, split.heldout_windows(32, 4), "cpu") == pytest.approx(report["heldout_ppl_after"],
                                                                                   rel=1e-6)


def test_interrupted_run_resumes_bit_for_bit(artifact, tmp_path):
    whole = finetune(artifact, TEXT, tmp_path / "whole", FinetuneConfig(**CFG))
    with pytest.raises(KeyboardInterrupt, match="interrupted after step 3"):
        finetune(artifact, TEXT, tmp_path / "cut", FinetuneConfig(**CFG), progress=_StopAt(3))
    checkpoint = tmp_path / "cut" / CHECKPOINT
    assert (checkpoint / "trainer_state.pt").is_file() and not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    resumed = finetune(artifact, TEXT, tmp_path / "cut", FinetuneConfig(**CFG), resume=checkpoint)
    assert resumed["resumed_from_step"] == 3
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["heldout_ppl_after"] == whole["heldout_ppl_after"]
    assert resumed["heldout_ppl_before"] == whole["heldout_ppl_before"]


def test_finetune_with_torch_compile(artifact, tmp_path, monkeypatch):
    """--compile: the same loop through torch.compile learns as well (the eager run's perplexity within
    2%: Inductor rounds the float32 math differently) and saves the adapters."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # tests/conftest.py turns dynamo off for the process
    cfg = dict(CFG, dropout=0.0)
    eager = finetune(artifact, TEXT, tmp_path / "eager", FinetuneConfig(**cfg))
    compiled = finetune(artifact, TEXT, tmp_path / "compiled", FinetuneConfig(**cfg, compile=True))
    assert compiled["heldout_ppl_after"] < compiled["heldout_ppl_before"]
    assert compiled["heldout_ppl_after"] == pytest.approx(eager["heldout_ppl_after"], rel=0.02)
    assert (tmp_path / "compiled" / "adapter_model.safetensors").is_file()


def test_bad_inputs_are_clear_errors(artifact, tmp_path):
    with pytest.raises(FinetuneError, match="too short"):
        finetune(artifact, "In the beginning", tmp_path / "x", FinetuneConfig(**CFG))
    with pytest.raises(FinetuneError, match="optimizer"):
        FinetuneConfig(optimizer="sgd9bit")
    with pytest.raises(FinetuneError, match="cuda_graph needs a CUDA device"):
        FinetuneConfig(cuda_graph=True, device="cpu")
    with pytest.raises(FinetuneError, match="not a kbitc finetune checkpoint"):
        finetune(artifact, TEXT, tmp_path / "x", FinetuneConfig(**CFG), resume=tmp_path)


def test_cli_finetune(artifact, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    result = CliRunner().invoke(main, ["finetune", str(artifact), "--data", str(data), "--out", str(tmp_path / "a"),
                                       "--r", "4", "--steps", "2", "--seq-len", "32", "--batch-size", "2",
                                       "--target", "*q_proj"])
    assert result.exit_code == 0, result.output
    assert "held-out perplexity" in result.output
    assert sorted(json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]) == [
        f"model.layers.{i}.self_attn.q_proj" for i in range(4)]


def test_cli_cuda_graph_needs_a_cuda_device(artifact, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    result = CliRunner().invoke(main, ["finetune", str(artifact), "--data", str(data), "--out", str(tmp_path / "a"),
                                       "--steps", "1", "--cuda-graph", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "cuda_graph needs a CUDA device" in result.output
    assert not (tmp_path / "a").exists()
