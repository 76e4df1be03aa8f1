"""Several hidden layers at once, the last layer before its norm, and reference-style padding (`LLM.encode`) against
diffusers' own prompt encoders run on transformers: FLUX.2 klein (Qwen3, layers stacked), Z-Image (Qwen3, layer -2),
the Qwen-Image 2.1 pre-norm last layer. Tiny random Qwen3, fp32 CPU."""
from __future__ import annotations

import types

import pytest
import torch
import transformers
from helpers import rel_err

from gen.llm import LLM
from gen.llm.models import model_class

WORDS = "a red blue green big small cat dog star circle on the of in and".split()
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<think>", "</think>", "user", "assistant", "system"]
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} "
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }} {% endfor %}{% endif %}"
            " <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant "
            "{% if not enable_thinking %}<think> </think> {% endif %}{% endif %}")


def tokenizer():
    """A word-level tokenizer with a Qwen-like chat template (enable_thinking switch); pads on the right."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                                chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def pair():
    cfg = transformers.Qwen3Config(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                                   eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    ref = transformers.Qwen3ForCausalLM(cfg).eval()
    cls = model_class("Qwen3ForCausalLM")
    ours = cls(cls.Config.from_hf(ref.config.to_dict())).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    tok = tokenizer()
    return LLM.from_parts(ours, tok, ref.config.to_dict(), device="cpu"), ref, tok


PROMPTS = ["a red star on the blue circle", "big dog", "small green cat in a big red circle of the star"]


def chat(tok, prompt: str, thinking: bool) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                                   enable_thinking=thinking)


def test_flux2_klein_layers_padded(pair):
    """encode(hidden_layer=[1, 2, 3], pad_to=L) equals Flux2KleinPipeline._get_qwen3_prompt_embeds, pads included."""
    from diffusers import Flux2KleinPipeline

    llm, ref, tok = pair
    want = Flux2KleinPipeline._get_qwen3_prompt_embeds(ref, tok, PROMPTS, max_sequence_length=40,
                                                       hidden_states_layers=(1, 2, 3))
    enc = llm.encode([chat(tok, p, False) for p in PROMPTS], hidden_layer=[1, 2, 3], pad_to=40)
    assert enc.hidden.shape == want.shape == (3, 40, 3 * 64)
    assert rel_err(enc.hidden, want) <= 1e-5
    assert enc.mask.sum(-1).tolist() == [len(tok(chat(tok, p, False))["input_ids"]) for p in PROMPTS]
    # the real tokens' states do not depend on the padding: the default (left-padded batch) path gives them too
    plain = llm.encode([chat(tok, p, False) for p in PROMPTS], hidden_layer=[1, 2, 3])
    for i, n in enumerate(enc.mask.sum(-1).tolist()):
        assert rel_err(plain.hidden[i, :n], want[i, :n]) <= 1e-5
        assert (plain.hidden[i, n:] == 0).all()


def test_z_image_layer_minus_2(pair):
    """encode(hidden_layer=-2).per_prompt() equals ZImagePipeline._encode_prompt (masked hidden_states[-2])."""
    from diffusers import ZImagePipeline

    llm, ref, tok = pair
    fake = types.SimpleNamespace(tokenizer=tok, text_encoder=ref)
    want = ZImagePipeline._encode_prompt(fake, list(PROMPTS), device="cpu", max_sequence_length=48)
    got = llm.encode([chat(tok, p, True) for p in PROMPTS], hidden_layer=-2).per_prompt()
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


def test_last_layer_before_norm(pair):
    """final_norm=False: the last layer's raw output, as Qwen-Image 2.1 reads it (a forward hook skipping the norm)."""
    llm, ref, tok = pair
    ids = tok([chat(tok, PROMPTS[0], False)])["input_ids"]
    handle = ref.model.norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        with torch.no_grad():
            want = ref(torch.tensor(ids), output_hidden_states=True).hidden_states[-1]
    finally:
        handle.remove()
    got = llm.encode(ids, hidden_layer=-1, final_norm=False).hidden
    assert rel_err(got, want) <= 1e-5
    with torch.no_grad():
        normed = ref(torch.tensor(ids), output_hidden_states=True).hidden_states[-1]
    assert rel_err(llm.encode(ids).hidden, normed) <= 1e-5
    assert rel_err(llm.encode(ids, hidden_layer=[4, -1], final_norm=False).hidden, torch.cat([want, want], -1)) <= 1e-5


def test_only_needed_layers_run(pair):
    """Layers [1, 2] run two decoder layers; the normed last state runs all four."""
    llm, _, _ = pair
    calls = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(llm.model.model.layers)]
    try:
        llm.encode([[9, 10, 11]], hidden_layer=[2, 1])
        assert calls == [0, 1]
        calls.clear()
        llm.encode([[9, 10, 11]], hidden_layer=[1, -1])
        assert calls == [0, 1, 2, 3]
    finally:
        for h in hooks:
            h.remove()


def test_bad_layers_named(pair):
    llm, _, _ = pair
    with pytest.raises(ValueError, match="hidden_layer 5 out of range"):
        llm.encode([[9, 10]], hidden_layer=[1, 5])
    with pytest.raises(TypeError, match="non-empty list"):
        llm.encode([[9, 10]], hidden_layer=[])
    with pytest.raises(ValueError, match="more than pad_to=2"):
        llm.encode([[9, 10, 11]], pad_to=2)
