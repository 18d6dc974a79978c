"""kbitc.lora on compiled tiny LLaMA artifacts: attach, train (grads), checkpointing, autocast,
save / load, and the PEFT round trip on the 16-bit model."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

import kbitc
import kbitc.lora as L
from kbitc.compiler.lora_merge import _dequantize
from kbitc.compiler.plan import LayerPlan
from kbitc.runtime.manifest import WEIGHTS

transformers = pytest.importorskip("transformers", reason="the Hugging Face front end needs transformers")
VOCAB = 300


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("hf") / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def artifacts(llama_folder, tmp_path_factory):
    """nf4 and int8 artifacts with backward kernels (trainable=True), for this CPU."""
    root = tmp_path_factory.mktemp("kbit")
    return {scheme: kbitc.compile(llama_folder, output=root / f"{scheme}.kbit", scheme=scheme, min_params=1024,
                                  progress=False, trainable=True)
            for scheme in ("nf4", "int8")}


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def _randomize_b(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in L.adapters(model).values():
            a.lora_B.weight.copy_(torch.randn(a.lora_B.weight.shape, generator=g) * std)


def _dequantized_hf_model(folder, artifact):
    """The 16-bit model whose quantized linears hold exactly the artifact's dequantized weights."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    manifest = json.loads((artifact / "manifest.json").read_text())
    state = load_file(str(artifact / WEIGHTS))
    with torch.no_grad():
        for d in manifest["layers"]:
            hf.get_submodule(d["name"]).weight.copy_(_dequantize(LayerPlan(**d), state))
    return hf


def test_trainable_artifact_bundles_backward_kernels(artifacts):
    for scheme, path in artifacts.items():
        ops = {s["op"] for s in kbitc.load(path).kbitc_manifest["kernels"]["specs"]}
        forward = "int8_linear" if scheme == "int8" else "linear_4bit"
        assert ops == {forward, forward + "_grad_input"}


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_fresh_adapter_leaves_outputs_unchanged_and_only_adapters_train(artifacts, ids, scheme):
    model = kbitc.load(artifacts[scheme])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    names = L.attach(model, r=4, alpha=8, targets=["*q_proj", "*v_proj"])
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(".kbitc_lora.lora_" in n for n in trainable)
    assert {id(p) for p in L.trainable_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    _randomize_b(model)
    model(input_ids=ids).logits.pow(2).mean().backward()
    for p in L.trainable_parameters(model):  # gradients reached every adapter (layer 0 through layer 1)
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_attach_errors_name_globs_and_layers(artifacts):
    model = kbitc.load(artifacts["nf4"])
    with pytest.raises(L.LoraError, match=r"no quantized layer matches \['\*qkv'\].*model.layers.0.mlp.down_proj"):
        L.attach(model, targets=["*qkv"])
    L.attach(model, r=2)
    with pytest.raises(L.LoraError, match="already attached"):
        L.attach(model, r=2)


def test_dropout_follows_train_and_eval(artifacts, ids):
    model = kbitc.load(artifacts["nf4"])
    L.attach(model, r=4, alpha=8, dropout=0.5)
    _randomize_b(model, std=0.2)
    model.eval()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(0)
        c = model(input_ids=ids).logits
    assert not torch.equal(a, c)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_model_checkpointing_gives_identical_grads(artifacts, ids, use_reentrant):
    model = kbitc.load(artifacts["nf4"])
    L.attach(model, r=4, alpha=8)
    _randomize_b(model)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        emb = model.program.model.embed_tokens.weight  # frozen: feed a tensor that requires grad (reentrant)
        inputs = ids
        if ckpt:
            out = checkpoint(lambda i, _e: model(input_ids=i).logits, inputs, emb.detach().requires_grad_(),
                             use_reentrant=use_reentrant)
        else:
            out = model(input_ids=inputs).logits
        out.pow(2).mean().backward()
        grads.append([p.grad.clone() for p in L.trainable_parameters(model)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_autocast_bf16_training_step(artifacts, ids):
    model = kbitc.load(artifacts["nf4"])
    L.attach(model, r=4, alpha=8)
    _randomize_b(model)
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    reference = [p.grad.clone() for p in L.trainable_parameters(model)]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    logits.float().pow(2).mean().backward()
    for p, ref in zip(L.trainable_parameters(model), reference):
        assert p.grad.dtype == torch.float32
        # bf16 activations through two layers: measured relative error 0.0125
        assert float((p.grad - ref).norm() / ref.norm()) < 0.1


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_torch_compile_trains_like_eager(artifacts, ids, tmp_path, scheme, monkeypatch):
    """model.compile() (torch.compile in place) traces the whole program, kbitc ops and their autograd
    included, as one graph (fullgraph=True), gives eager's logits and gradients, and kbitc.lora still
    works on the model."""
    model = kbitc.load(artifacts[scheme])
    L.attach(model, r=4, alpha=8)
    _randomize_b(model)
    eager = model(input_ids=ids).logits
    eager.pow(2).mean().backward()
    reference = [p.grad.clone() for p in L.trainable_parameters(model)]
    model.zero_grad()
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # tests/conftest.py turns dynamo off for the process
    torch._dynamo.reset()  # what other tests compiled (the same program's code) must not change the trace
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model.compile(fullgraph=True)
    logits = model(input_ids=ids).logits
    logits.pow(2).mean().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # it did compile
    # float32 model; Inductor fuses and reorders the float32 math: measured relative errors 2.6e-7
    # (logits) and 1.0e-6 (gradients)
    assert float((logits - eager).norm() / eager.norm()) < 5e-6
    for p, ref in zip(L.trainable_parameters(model), reference):
        assert float((p.grad - ref).norm() / ref.norm()) < 2e-5
    L.save(model, tmp_path / "adapters")
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()


def test_save_load_round_trip_and_peft_layout(artifacts, ids, tmp_path):
    model = kbitc.load(artifacts["int8"])
    L.attach(model, r=4, alpha=16, dropout=0.1, targets=["*o_proj", "*up_proj"], use_rslora=True)
    _randomize_b(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    L.save(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["use_rslora"] is True
    assert cfg["target_modules"] == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.o_proj",
                                     "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.o_proj"]
    keys = set(load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight" in keys and len(keys) == 8

    fresh = kbitc.load(artifacts["int8"])
    assert L.load(fresh, tmp_path / "ad") == cfg["target_modules"]
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, expected)

    wrong = kbitc.load(artifacts["int8"])
    L.attach(wrong, r=8, targets=cfg["target_modules"])
    with pytest.raises(L.LoraError, match="layer model.layers.0.mlp.up_proj: lora_A.weight .* shape"):
        L.load(wrong, tmp_path / "ad")


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_adapters_load_into_peft_on_the_16bit_model(llama_folder, artifacts, ids, tmp_path, scheme):
    peft = pytest.importorskip("peft")
    model = kbitc.load(artifacts[scheme])
    L.attach(model, r=4, alpha=8, targets=["*q_proj", "*k_proj", "*down_proj"])
    model.eval()
    _randomize_b(model, std=0.1)
    L.save(model, tmp_path / "ad")
    hf = peft.PeftModel.from_pretrained(_dequantized_hf_model(llama_folder, artifacts[scheme]), tmp_path / "ad",
                                      is_trainable=True).eval()
    logits = model(input_ids=ids).logits
    peft_logits = hf(input_ids=ids).logits
    with torch.no_grad():
        base = kbitc.load(artifacts[scheme])(input_ids=ids).logits
    assert float((logits.detach() - base).norm() / base.norm()) > 0.05  # the adapters matter
    if scheme == "nf4":  # same weights, float32 both: summation order only (measured 2e-7)
        torch.testing.assert_close(logits, peft_logits, rtol=1e-4, atol=1e-4 * float(peft_logits.abs().max()))
    else:  # kbitc also quantizes activations to int8 (LLM.int8()): measured relative error 0.0066
        assert float((logits - peft_logits).detach().norm() / peft_logits.detach().norm()) < 0.02
    # and the gradients of the adapters agree (kbitc's backward through the quantized layers);
    # measured max relative error: nf4 7e-7, int8 0.017 (int8 activations in the forward)
    logits.pow(2).mean().backward()
    peft_logits.pow(2).mean().backward()
    peft_params = dict(hf.named_parameters())
    for name, adapter in L.adapters(model).items():
        for part in ("lora_A", "lora_B"):
            ours = getattr(adapter, part).weight.grad
            theirs = peft_params[f"base_model.model.{name}.{part}.default.weight"].grad
            rel = float((ours - theirs).norm() / theirs.norm())
            assert rel < (1e-4 if scheme == "nf4" else 0.05), (name, part, rel)
