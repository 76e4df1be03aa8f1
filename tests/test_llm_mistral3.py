"""Mistral 3 (gen/llm/models/mistral3.py) and Mistral (llama.py with a sliding window) against transformers: checkpoint
layouts, hidden states and logits, greedy decoding, and FLUX.2 [dev]'s prompt encoder (diffusers) on a tiny random
Mistral3ForConditionalGeneration (head_dim != hidden / heads), fp32 CPU."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import rel_err
from safetensors.torch import load_file, save_file

from gen.llm import LLM
from gen.llm.engine import Engine
from gen.llm.loader import load_model
from gen.llm.models import model_class
from gen.llm.sampling import SamplingParams

TEXT = dict(model_type="mistral", vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, sliding_window=None, max_position_embeddings=128,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0}, eos_token_id=None, bos_token_id=None,
            pad_token_id=0, tie_word_embeddings=False)
VISION = dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
              head_dim=16, image_size=56, patch_size=14)
WORDS = "a red blue green big small cat dog star circle on the of in and you are helpful".split()
SPECIAL = ["<pad>", "<s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "<unk>"]
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT] {{ m['content'][0]['text'] }} "
            "[/SYSTEM_PROMPT] {% else %}[INST] {{ m['content'][0]['text'] }} [/INST] {% endif %}{% endfor %}")


def tokenizer():
    """A word-level tokenizer with a Mistral-like template over content lists; pads on the right."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                                chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Mistral3ForConditionalGeneration (vision tower included) written by save_pretrained."""
    torch.manual_seed(0)
    ref = transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
        text_config=TEXT, vision_config=VISION, tie_word_embeddings=False)).eval()
    folder = tmp_path_factory.mktemp("mistral3")
    ref.save_pretrained(folder)
    return ref, folder


def test_published_layout_loads(saved):
    """transformers 5 writes the published Mistral-Small-3.x names; the vision tower is skipped, not loaded."""
    ref, folder = saved
    keys = load_file(folder / "model.safetensors")
    assert any(k.startswith("language_model.model.layers.") for k in keys) and any(k.startswith("vision_tower.") for k in keys)
    model, _ = load_model(folder, torch.device("cpu"), torch.float32)
    assert not hasattr(model, "vision_tower") and type(model).__name__ == "Mistral3ForConditionalGeneration"
    want = {k.replace("model.language_model.", "model."): v for k, v in ref.state_dict().items()
            if "vision_tower" not in k and "multi_modal_projector" not in k}
    got = model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)


def test_transformers_4_layout_loads(saved, tmp_path):
    """The in-memory names of transformers 4.5x (model.language_model.*, lm_head, model.vision_tower.*) load too."""
    _, folder = saved
    old = {}
    for k, v in load_file(folder / "model.safetensors").items():
        k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
        k = "model." + k if k.startswith(("vision_tower.", "multi_modal_projector.")) else k
        old[k] = v
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    a, _ = load_model(folder, torch.device("cpu"), torch.float32)
    b, _ = load_model(tmp_path, torch.device("cpu"), torch.float32)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


@torch.no_grad()
def test_hidden_states_logits_and_greedy(saved):
    ref, folder = saved
    ours, hf = load_model(folder, torch.device("cpu"), torch.float32)
    assert ours.config.head_dim == 24 and ours.config.sliding_window is None
    ids = torch.randint(1, 40, (2, 13), generator=torch.Generator().manual_seed(1))
    want = ref(input_ids=ids, output_hidden_states=True)
    last, hidden = ours(ids, torch.arange(13).expand(2, -1), torch.ones_like(ids, dtype=torch.bool), output_hidden_states=True)
    assert len(hidden) == len(want.hidden_states) == 5
    for a, b in zip(hidden, want.hidden_states):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(ours.compute_logits(last), want.logits) <= 1e-5
    prompt = torch.tensor([[5, 17, 3, 22, 8, 30]])
    expect = ref.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 6:].tolist()
    eng = Engine(ours, torch.device("cpu"), torch.float32, 128, stop_ids=[], pad_id=0)
    assert eng.generate([prompt[0].tolist()], SamplingParams(max_new_tokens=32))[0] == expect


def test_flux2_dev_prompt_embeds(saved):
    """encode(hidden_layer=[1, 2, 3], pad_to=L) of the chat-templated prompts equals diffusers'
    Flux2Pipeline._get_mistral_3_small_prompt_embeds (layers (10, 20, 30) in the real model), pads included."""
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    ref, folder = saved
    tok = tokenizer()
    prompts, system = ["a red star on the blue circle", "big dog"], "you are a helpful"
    want = Flux2Pipeline._get_mistral_3_small_prompt_embeds(ref, tok, prompts, max_sequence_length=32, system_message=system,
                                                            hidden_states_layers=(1, 2, 3))
    llm = LLM(folder, device="cpu", dtype="fp32", tokenizer=tok)
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=False) for m in format_input(prompts, system)]
    enc = llm.encode(texts, hidden_layer=[1, 2, 3], pad_to=32)
    assert enc.hidden.shape == want.shape == (2, 32, 3 * 64)
    assert rel_err(enc.hidden, want) <= 1e-5


@pytest.mark.parametrize("window", [4, 7])
@torch.no_grad()
def test_sliding_window_mistral(window):
    """MistralForCausalLM with a sliding window shorter than the prompt: prefill and cached greedy decode."""
    cfg = transformers.MistralConfig(**{k: v for k, v in TEXT.items() if k not in ("model_type", "sliding_window")},
                                     sliding_window=window)
    torch.manual_seed(1)
    ref = transformers.MistralForCausalLM(cfg).eval()
    cls = model_class("MistralForCausalLM")
    ours = cls(cls.Config.from_hf(json.loads(cfg.to_json_string()) | {"architectures": ["MistralForCausalLM"]})).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.config.sliding_window == window
    ids = torch.randint(1, 40, (1, 12), generator=torch.Generator().manual_seed(2))
    last, _ = ours(ids, torch.arange(12)[None], torch.ones_like(ids, dtype=torch.bool))
    assert rel_err(ours.compute_logits(last), ref(input_ids=ids).logits) <= 1e-5
    expect = ref.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, 12:].tolist()
    for static in (False, True):
        eng = Engine(ours, torch.device("cpu"), torch.float32, 128, stop_ids=[], pad_id=0, static_decode=static)
        assert eng.generate([ids[0].tolist()], SamplingParams(max_new_tokens=16))[0] == expect
