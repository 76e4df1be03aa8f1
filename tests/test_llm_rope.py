"""RoPE scaling types of gen/llm/models/llama.py (yarn, dynamic NTK, llama3, linear) against transformers, with prompts
longer than the original context so the scaling engages (tiny random Llama / Qwen2 / Qwen3, fp32 CPU)."""
from __future__ import annotations

import pytest
import torch
import transformers
from helpers import rel_err

from gen.llm.engine import Engine
from gen.llm.models import model_class
from gen.llm.models.llama import LlamaConfig, rope_inv_freq
from gen.llm.sampling import SamplingParams

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, eos_token_id=None, pad_token_id=0, bos_token_id=None)
ROPES = {  # original context 16: prompts of 24 tokens + 16 new ones run past it
    "yarn": dict(max_position_embeddings=64, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                              "original_max_position_embeddings": 16}),
    "yarn-mscale": dict(max_position_embeddings=64, rope_parameters={
        "rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
        "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "truncate": False}),
    "dynamic": dict(max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}),
    "llama3": dict(max_position_embeddings=64, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "linear": dict(max_position_embeddings=64, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
}
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=24)),
}
CASES = [(f, r) for f in FAMILIES for r in ("yarn", "dynamic")] + [("llama", "yarn-mscale"), ("qwen3", "llama3"),
                                                                    ("qwen2", "linear")]


def make_pair(family: str, rope: str):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    ref = model_cls(cfg_cls(**TINY, **extra, **ROPES[rope])).eval()
    hf = ref.config.to_dict()
    cls = model_class(hf["architectures"][0] if hf.get("architectures") else model_cls.__name__)
    ours = cls(cls.Config.from_hf(hf)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("family,rope", CASES)
def test_hidden_and_logits_past_original_context(family, rope):
    ours, ref = make_pair(family, rope)
    t = 24
    ids = torch.randint(1, 128, (2, t), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        last, hidden = ours(ids, torch.arange(t)[None].expand(2, -1), torch.ones_like(ids, dtype=torch.bool),
                            output_hidden_states=True)
    for a, b in zip(hidden, want.hidden_states):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(ours.compute_logits(last), want.logits) <= 1e-5


@pytest.mark.parametrize("family,rope", CASES)
def test_greedy_past_original_context(family, rope):
    """Prefill 24 tokens, then 16 decode steps through our KV cache (dynamic: a new base every step) = generate."""
    ours, ref = make_pair(family, rope)
    prompt = torch.randint(1, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=16, do_sample=False)[0, 24:].tolist()
    eng = Engine(ours, torch.device("cpu"), torch.float32, ours.config.max_context, stop_ids=[], pad_id=0)
    assert eng.generate([prompt[0].tolist()], SamplingParams(max_new_tokens=16))[0] == want


def test_inv_freq_equals_transformers():
    """The inverse frequencies (and yarn's cos / sin scale) equal transformers' ROPE_INIT_FUNCTIONS bit for bit."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from gen.llm.models.llama import rope_scale

    for rope in ("yarn", "yarn-mscale", "llama3", "linear"):
        ref_cfg = transformers.LlamaConfig(**TINY, **ROPES[rope])
        inv, scale = ROPE_INIT_FUNCTIONS[ref_cfg.rope_parameters["rope_type"]](ref_cfg, "cpu")
        cfg = LlamaConfig.from_hf(ref_cfg.to_dict())
        assert torch.equal(rope_inv_freq(cfg, "cpu"), inv), rope
        assert rope_scale(cfg) == scale, rope
    ref_cfg = transformers.LlamaConfig(**TINY, **ROPES["dynamic"])
    cfg = LlamaConfig.from_hf(ref_cfg.to_dict())
    for seq_len in (5, 16, 17, 40):
        inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](ref_cfg, "cpu", seq_len=torch.tensor(seq_len))
        assert torch.equal(rope_inv_freq(cfg, "cpu", torch.arange(seq_len)[None]), inv), seq_len


def test_config_forms_and_context():
    """Qwen2.5's documented long-context setting in the old `rope_scaling` form reads like transformers 5's
    rope_parameters; dynamic and yarn stretch the engine's context; unknown types are named."""
    qwen = {"model_type": "qwen2", "max_position_embeddings": 32768, "rope_theta": 1000000.0, "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    cfg = LlamaConfig.from_hf(qwen)
    assert (cfg.rope_type, cfg.rope_factor, cfg.original_max_position_embeddings) == ("yarn", 4.0, 32768)
    assert cfg.max_context == 131072
    via_transformers = transformers.Qwen2Config(**{k: v for k, v in qwen.items() if k != "model_type"}).to_dict()
    rope = lambda c: (c.rope_type, c.rope_theta, c.rope_factor, c.original_max_position_embeddings, c.max_context)  # noqa: E731
    assert rope(LlamaConfig.from_hf(via_transformers)) == rope(cfg)
    assert LlamaConfig.from_hf({**TINY, **ROPES["dynamic"]}).max_context == 64
    with pytest.raises(ValueError, match="longrope"):
        LlamaConfig.from_hf({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


def test_llm_encode_dynamic_batch():
    """Through LLM.encode: a prompt past the original context is accepted and equals transformers' hidden states."""
    from gen.llm import LLM

    ours, ref = make_pair("qwen3", "dynamic")

    class Tok:
        pad_token_id, eos_token_id = 0, None

    llm = LLM.from_parts(ours, Tok(), ref.config.to_dict(), device="cpu")
    assert llm.engine.max_context == 64
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    enc = llm.encode([ids[0].tolist()], hidden_layer=-2)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True).hidden_states[-2]
    assert rel_err(enc.hidden, want) <= 1e-5
