"""Tiny random-init Hugging Face models (LLaMA, Mistral, Qwen2, GPT-2) saved as model folders."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face front end needs transformers")

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)),
}
VOCAB = 300


def _tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    folders = {}
    for name, (config_cls, model_cls, kwargs) in ARCHS.items():
        torch.manual_seed(0)
        extra = {} if name == "gpt2" else {"max_position_embeddings": 128}
        model = model_cls(config_cls(vocab_size=VOCAB, **kwargs, **extra))
        folders[name] = root / name
        model.save_pretrained(folders[name])
        if name == "llama":
            _tokenizer(folders[name])
    return folders
