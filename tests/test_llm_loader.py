"""gen/llm/loader.py on folders written by transformers' save_pretrained: single file, sharded index, ties, bad keys."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import rel_err
from safetensors.torch import load_file, save_file

from gen.llm.loader import load_model

WORDS = "the a cat dog sat on mat red blue green big small and or is was it this that run jump fast slow".split()
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1, pad_token_id=0, bos_token_id=None)


def tiny_tokenizer():
    """A word-level tokenizer over WORDS with a chat template: enough to drive the API end to end."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    special = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special + WORDS + ["user", "assistant", "system"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                                chat_template=template)


def save_tiny(folder, family="qwen2", seed=0, **save_kw):
    """Write a tiny random model (and tokenizer) with save_pretrained; return the transformers model."""
    cfg_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    torch.manual_seed(seed)
    ref = model_cls(cfg_cls(**TINY, tie_word_embeddings=family == "qwen2")).eval()
    ref.save_pretrained(folder, **save_kw)
    tiny_tokenizer().save_pretrained(folder)
    return ref


def test_single_file_tied(tmp_path):
    ref = save_tiny(tmp_path, "qwen2")
    assert (tmp_path / "model.safetensors").is_file()
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))  # tied: not stored
    model, cfg = load_model(tmp_path, torch.device("cpu"), torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[3, 9, 12, 7, 20]])
    with torch.no_grad():
        want = ref(ids).logits
        h, _ = model(ids, torch.arange(5)[None], torch.ones_like(ids, dtype=torch.bool))
        assert rel_err(model.compute_logits(h), want) <= 1e-5


def test_sharded_index(tmp_path):
    ref = save_tiny(tmp_path, "llama", max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _ = load_model(tmp_path, torch.device("cpu"), torch.float32)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_dtype_cast(tmp_path):
    save_tiny(tmp_path, "qwen3")
    model, _ = load_model(tmp_path, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_and_unexpected_keys_named(tmp_path):
    save_tiny(tmp_path, "llama")
    f = tmp_path / "model.safetensors"
    state = load_file(str(f))
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys model\.layers\.1\.mlp\.up_proj\.weight.*unexpected keys model\.layers\.0\.extra\.weight"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)


def test_unknown_architecture_named(tmp_path):
    save_tiny(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["FooBarForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FooBarForCausalLM.*known: .*LlamaForCausalLM"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)


def test_no_weights(tmp_path):
    save_tiny(tmp_path, "llama")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("tied", [True, False])
def test_bare_decoder_checkpoint_encodes(tmp_path, tied):
    """A Qwen3Model saved without a head (keys without `model.`, no lm_head; how a re-saved text encoder looks)
    loads as an encoder with the same hidden states as transformers; generating needs a tied head."""
    from gen.llm import LLM

    torch.manual_seed(0)
    ref = transformers.Qwen3Model(transformers.Qwen3Config(**TINY, tie_word_embeddings=tied)).eval()
    ref.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen3Model"]
    llm = LLM(tmp_path, device="cpu", dtype="fp32")
    ids = [3, 9, 12, 7, 20]
    with torch.no_grad():
        want = ref(torch.tensor([ids]), output_hidden_states=True).hidden_states
    enc = llm.encode([ids], hidden_layer=-2)
    assert rel_err(enc.hidden[0], want[-2][0]) <= 1e-5
    if tied:
        assert len(llm.generate([ids], max_new_tokens=2)) == 1
    else:
        with pytest.raises(ValueError, match="bare decoder without an LM head"):
            llm.generate([ids], max_new_tokens=2)
