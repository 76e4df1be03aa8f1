"""Parity of gen/llm/models/llama.py (Llama, Qwen2, Qwen3) with transformers on tiny random configs."""
from __future__ import annotations

import pytest
import torch
import transformers
from helpers import rel_err

from gen.llm.engine import Engine
from gen.llm.models import model_class
from gen.llm.sampling import SamplingParams

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None, pad_token_id=0, bos_token_id=None)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "llama3-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=24)),
}


def make_pair(family: str, seed: int = 0):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    ref = model_cls(cfg_cls(**TINY, **extra)).eval()
    hf = ref.config.to_dict()
    ours_cls = model_class(hf["architectures"][0] if hf.get("architectures") else model_cls.__name__)
    ours = ours_cls(ours_cls.Config.from_hf(hf)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def engine(model, **kw):
    return Engine(model, torch.device("cpu"), torch.float32, 256, stop_ids=[], pad_id=0, **kw)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hidden_and_logits(family):
    ours, ref = make_pair(family)
    ids = torch.randint(1, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    pos = torch.arange(11)[None].expand(2, -1)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        last, hidden = ours(ids, pos, mask, output_hidden_states=True)
        logits = ours.compute_logits(last)
    assert len(hidden) == len(out.hidden_states)
    for a, b in zip(hidden, out.hidden_states):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(logits, out.logits) <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_generate(family):
    ours, ref = make_pair(family)
    prompt = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=32, do_sample=False)[0, 7:].tolist()
    got = engine(ours).generate([prompt[0].tolist()], SamplingParams(max_new_tokens=32))[0]
    assert got == want


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_batch_left_padding_equals_alone(family):
    ours, _ = make_pair(family)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (3, 9, 6)]
    eng = engine(ours)
    batch = eng.generate(prompts, SamplingParams(max_new_tokens=32))
    alone = [eng.generate([p], SamplingParams(max_new_tokens=32))[0] for p in prompts]
    assert batch == alone
    hidden, mask = eng.hidden_states(prompts, hidden_layer=-2)
    for i, p in enumerate(prompts):
        h1, m1 = eng.hidden_states([p], hidden_layer=-2)
        assert mask[i].sum() == len(p) and m1.all()
        assert rel_err(hidden[i, : len(p)], h1[0]) <= 1e-5
        assert (hidden[i, len(p):] == 0).all()


def test_static_decode_equals_dynamic():
    ours, _ = make_pair("qwen2")
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]]
    p = SamplingParams(max_new_tokens=20)
    assert engine(ours, static_decode=True).generate(prompts, p) == engine(ours).generate(prompts, p)


def test_meta_construction():
    ours, _ = make_pair("qwen3")
    with torch.device("meta"):
        m = type(ours)(ours.config)
    assert all(t.is_meta for t in m.state_dict().values())
    assert set(m.state_dict()) == set(ours.state_dict())


@pytest.mark.parametrize("family", ["qwen2", "llama3-rope"])
def test_fused_projections_same_output(family):
    from gen.llm.engine import fuse_projections

    ours, ref = make_pair(family)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    pos, mask = torch.arange(9)[None].expand(2, -1), torch.ones(2, 9, dtype=torch.bool)
    with torch.no_grad():
        before, _ = ours(ids, pos, mask)
        fuse_projections(ours)
        after, _ = ours(ids, pos, mask)
    assert ours.model.layers[0].self_attn.fused_weight is not None
    attn = ours.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.fused_weight[attn.q_proj.weight.shape[0]:].data_ptr()
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert rel_err(after, before) <= 1e-6
    p = SamplingParams(max_new_tokens=16)
    assert engine(ours).generate([[3, 4, 5]], p) == engine(make_pair(family)[0]).generate([[3, 4, 5]], p)


@pytest.mark.slow
def test_compiled_decode_guards_batch_size():
    """The torch.compile'd static decode step (inductor on CPU here, CUDA graphs on GPUs) equals eager for batch
    sizes 1, 2, 1: a new batch size recompiles instead of reusing a graph built for another (also fuses q|k|v)."""
    eager = engine(make_pair("qwen3")[0])
    compiled = engine(make_pair("qwen3")[0], compile_decode=True, compile_mode="default")
    p = SamplingParams(max_new_tokens=12)
    for prompts in ([[1, 2, 3]], [[1, 2, 3], [4, 5, 6, 7, 8]], [[9]]):
        assert compiled.generate(prompts, p) == eager.generate(prompts, p)
