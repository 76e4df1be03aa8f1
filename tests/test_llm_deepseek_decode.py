"""DeepSeek static-shape decode (gen.llm.models.deepseek): stacked experts, the gathered MoE path for few tokens vs
the loop over experts, and the engine's static decode against its dynamic decode and transformers; fp32 CPU."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file
from test_llm_deepseek import CASES, OURS, make_pair

from gen.llm.engine import Engine
from gen.llm.models.deepseek import MoE
from gen.llm.sampling import SamplingParams


def load_ours(name: str, folder):
    """Another copy of our model from the checkpoint make_pair saved in `folder` (own tensors)."""
    cls = OURS[CASES[name][0]]
    with torch.device("meta"):
        ours = cls(cls.Config.from_hf(json.loads((folder / "config.json").read_text())))
    ours.load_state_dict(load_file(folder / "model.safetensors"), strict=True, assign=True)
    return ours.eval()


def make_pair_without_eos(name: str, folder):
    """make_pair with no eos / bos token, so that transformers' generate runs every step on the plain argmax."""
    family, extra = CASES[name]
    CASES[f"{name}_noeos"] = (family, {**extra, "eos_token_id": None, "bos_token_id": None, "pad_token_id": 0})
    try:
        return make_pair(f"{name}_noeos", folder)
    finally:
        del CASES[f"{name}_noeos"]


def engine(model, **kw) -> Engine:
    return Engine(model, torch.device("cpu"), torch.float32, 64, stop_ids=[], pad_id=0, **kw)


def moe_layers(model) -> list[MoE]:
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]


@pytest.mark.parametrize("name", ["v3", "v2_lite"])
@torch.no_grad()
def test_gathered_path_equals_loop_around_threshold(name, tmp_path):
    """Both routed paths give the same output for 1, 2, 3, 7 and 64 tokens; forward takes the gathered one exactly
    when tokens * top_k <= gather_max (8 experts, top-3 here: 1 and 2 tokens), also when called eagerly."""
    _, ours = make_pair(name, tmp_path)
    moe = moe_layers(ours)[0]
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    assert moe.stack_experts()
    # names, values and storage: the per-expert parameters are views of the stacked tensors
    after = ours.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    inter = moe.experts[0].gate_proj.weight.shape[0]
    assert moe.experts[3].up_proj.weight.data_ptr() == moe.w13[3, inter:].data_ptr()
    assert moe.experts[5].down_proj.weight.data_ptr() == moe.w2[5].data_ptr()
    assert moe.gather_max == 8 and moe.gate.cfg.num_experts_per_tok == 3

    taken = []
    gathered, loop = moe.gathered, moe.experts.forward
    moe.gathered = lambda *a: taken.append("gathered") or gathered(*a)
    moe.experts.forward = lambda *a: taken.append("loop") or loop(*a)
    g = torch.Generator().manual_seed(7)
    for n in (1, 2, 3, 7, 64):
        x = torch.randn(1, n, 32, generator=g)
        idx, w = moe.gate(x[0])
        assert rel_err(gathered(x[0], idx, w), loop(x[0], idx, w)) <= 1e-5, n
        taken.clear()
        out = moe(x)
        assert taken == (["gathered"] if n * 3 <= 8 else ["loop"]), (n, taken)
        moe.w13, saved = None, moe.w13  # unstacked: the loop path serves every call
        assert rel_err(out, moe(x)) <= 1e-5, n
        assert taken[-1] == "loop"
        moe.w13 = saved


def test_experts_with_bias_stay_unstacked():
    from gen.llm.models.deepseek import DeepseekConfig

    cfg = DeepseekConfig(hidden_size=16, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2, mlp_bias=True)
    moe = MoE(cfg)
    assert moe.stack_experts() is False and moe.w13 is None
    with pytest.raises(RuntimeError, match="stack_experts"):
        moe.gathered(torch.zeros(1, 16), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))


@pytest.mark.parametrize("name", ["v3", "v2_yarn_grouped"])
@torch.no_grad()
def test_engine_static_decode_equals_dynamic_and_transformers(name, tmp_path):
    """Greedy 24 tokens: the engine's static path (tensor offset, whole-cache mask, stacked experts and fused
    projections; eager) equals its dynamic path token for token, for batches of 1 (gathered MoE path), 2 (gathered)
    and 3 left-padded prompts (3 tokens * top-3 > 8: the loop path), and equals transformers' generate alone."""
    ref, dynamic_model = make_pair_without_eos(name, tmp_path)
    static = engine(load_ours(name, tmp_path), compile_decode=False, static_decode=True)
    dynamic = engine(dynamic_model)
    assert static.static and not static.compile and not dynamic.static
    assert all(m.w13 is not None for m in moe_layers(static.model))
    assert all(m.w13 is None for m in moe_layers(dynamic.model))
    p = SamplingParams(max_new_tokens=24)
    prompts = [[5, 17, 3, 42, 8, 61], [70, 9], [33, 1, 64, 20]]
    for batch in (prompts[:1], prompts[:2], prompts):
        assert static.generate(batch, p) == dynamic.generate(batch, p), len(batch)
    ids = torch.tensor([prompts[0]])
    expect = ref.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    assert static.generate(prompts[:1], p) == [expect]


@torch.no_grad()
def test_static_step_logits_equal_dynamic_step(tmp_path):
    """One decode step after a left-padded prefill: the tensor-offset step over a longer cache gives the same logits
    as the int-offset step over the filled prefix (fp32, rel <= 1e-5), absorbed and up-projected attention alike."""
    _, ours = make_pair("v3", tmp_path)
    ours.stack_experts()
    ids = torch.tensor([[0, 0, 4, 9, 33], [12, 8, 90, 1, 7]])
    mask = ids != 0
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    tok, next_pos = torch.tensor([[3], [50]]), pos[:, -1:] + 1
    for absorb in (None, False):
        ours.absorb = absorb
        caches = [ours.new_cache(2, 16, "cpu", torch.float32) for _ in range(2)]
        for c in caches:
            ours(ids, pos, mask, c, 0)
        dyn = ours(tok, next_pos, torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1), caches[0], 5)[0]
        full = torch.zeros(2, 16, dtype=torch.bool)
        full[:, :5], full[:, 5] = mask, True
        stat = ours(tok, next_pos, full, caches[1], torch.tensor(5))[0]
        assert rel_err(ours.compute_logits(stat), ours.compute_logits(dyn)) <= 1e-5, absorb
        assert rel_err(caches[1].latent[:, :, :6], caches[0].latent[:, :, :6]) <= 1e-6
    ours.absorb = None


@torch.no_grad()
def test_static_decode_step_compiles_as_one_graph(tmp_path):
    """torch.compile (aot_eager backend: dynamo + AOT autograd, no C++ codegen) traces the whole static decode step
    for batch 1 without a graph break (fullgraph=True), with the multiply-and-sum form of the gathered MoE path, and
    its logits equal the eager step; the cache is updated in place."""
    _, ours = make_pair("v3", tmp_path)
    ours.stack_experts()
    prompt = torch.tensor([[5, 17, 3, 42]])
    mask, pos = torch.ones(1, 4, dtype=torch.bool), torch.arange(4)[None]
    caches = [ours.new_cache(1, 12, "cpu", torch.float32) for _ in range(2)]
    for c in caches:
        ours(prompt, pos, mask, c, 0)
    full = torch.zeros(1, 12, dtype=torch.bool)
    full[:, :5] = True

    def step(tok, p, m, cache, offset):
        return ours.compute_logits(ours(tok, p, m, cache, offset)[0][:, -1])

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)
    tok, p = torch.tensor([[8]]), torch.tensor([[4]])
    got = compiled(tok, p, full, caches[0], torch.tensor(4))
    want = step(tok, p, full, caches[1], torch.tensor(4))
    assert rel_err(got, want) <= 1e-5
    assert rel_err(caches[0].latent[:, :, :5], caches[1].latent[:, :, :5]) <= 1e-6


@torch.no_grad()
def test_hidden_states_early_exit(tmp_path):
    """Engine.hidden_states(hidden_layer=k) stops after k layers (num_layers) and equals output_hidden_states[k]."""
    _, ours = make_pair("v2_lite", tmp_path)
    eng = engine(ours)
    assert eng.early_exit
    prompts = [[5, 17, 3, 42], [9, 1]]
    for k in (0, 2, 3):
        early, mask = eng.hidden_states(prompts, hidden_layer=k)
        ids = torch.tensor([prompts[0]])
        _, hidden = ours(ids, torch.arange(4)[None], torch.ones(1, 4, dtype=torch.bool), output_hidden_states=True)
        assert rel_err(early[0], hidden[k][0]) <= 1e-6, k
        assert mask.sum(-1).tolist() == [4, 2]
    with pytest.raises(ValueError, match="num_layers"):
        ours(ids, torch.arange(4)[None], torch.ones(1, 4, dtype=torch.bool), num_layers=4)
