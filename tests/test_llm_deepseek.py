"""DeepSeek-V2 / V3 (gen.llm.models.deepseek) against transformers on tiny random configs, fp32 CPU."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file

import transformers
from gen.llm.models.deepseek import DeepseekConfig, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, Experts, MLP

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}
COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
              v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1,
              max_position_embeddings=64, attn_implementation="eager")
CASES = {
    "v3": ("DeepseekV3", dict(q_lora_rank=24, n_group=4, topk_group=2, n_shared_experts=1, norm_topk_prob=True,
                              routed_scaling_factor=2.5)),
    "v3_yarn_noninterleaved": ("DeepseekV3", dict(q_lora_rank=24, n_group=2, topk_group=1, n_shared_experts=2,
                                                  norm_topk_prob=False, routed_scaling_factor=1.5,
                                                  rope_interleave=False, rope_parameters=dict(YARN))),
    "v2_lite": ("DeepseekV2", dict(q_lora_rank=None, n_shared_experts=2, topk_method="greedy")),
    "v2_yarn_grouped": ("DeepseekV2", dict(q_lora_rank=24, n_shared_experts=1, topk_method="group_limited_greedy",
                                           n_group=4, topk_group=2, routed_scaling_factor=16.0,
                                           rope_parameters=dict(YARN))),
}
OURS = {"DeepseekV2": DeepseekV2ForCausalLM, "DeepseekV3": DeepseekV3ForCausalLM}


def make_pair(name: str, tmp_path, tie: bool = False):
    """A random transformers model, saved with save_pretrained, and ours loaded from that checkpoint (strict)."""
    family, extra = CASES[name]
    cfg = getattr(transformers, family + "Config")(**COMMON, **extra, tie_word_embeddings=tie)
    torch.manual_seed(0)
    ref = getattr(transformers, family + "ForCausalLM")(cfg).eval()
    with torch.no_grad():  # larger random weights than the init so routing and attention are far from uniform
        for pname, p in ref.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.2 * torch.randn_like(p))
        for pname, b in ref.named_buffers():
            if "e_score_correction_bias" in pname:
                b.copy_(0.1 * torch.randn_like(b))
    ref.save_pretrained(tmp_path)
    cls = OURS[family]
    config = cls.Config.from_hf(json.loads((tmp_path / "config.json").read_text()))
    with torch.device("meta"):
        ours = cls(config)
    state = load_file(tmp_path / "model.safetensors")
    if tie:
        state.pop("lm_head.weight", None)
        ours.load_state_dict(state, strict=False, assign=True)
        ours.tie_weights()
    else:
        ours.load_state_dict(state, strict=True, assign=True)
    return ref, ours.eval()


def full_inputs(B: int, T: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (B, T), generator=g)
    return ids, torch.arange(T).expand(B, T), torch.ones(B, T, dtype=torch.bool)


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_prefill_matches_transformers(name, tmp_path):
    ref, ours = make_pair(name, tmp_path)
    ids, pos, mask = full_inputs(2, 9)
    out = ref(input_ids=ids, output_hidden_states=True)
    last, hidden = ours(ids, pos, mask, output_hidden_states=True)
    assert len(hidden) == len(out.hidden_states) == COMMON["num_hidden_layers"] + 1
    for h, r in zip(hidden, out.hidden_states):
        assert rel_err(h, r) <= 1e-5
    assert rel_err(last, out.hidden_states[-1]) <= 1e-5
    assert rel_err(ours.compute_logits(last), out.logits) <= 1e-5


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_decode_with_cache_matches_full_forward(name, tmp_path):
    """Prefill 5 tokens into the latent cache, then decode one token at a time: logits equal a full forward."""
    _, ours = make_pair(name, tmp_path)
    B, T, P = 2, 10, 5
    ids, pos, mask = full_inputs(B, T)
    full = ours.compute_logits(ours(ids, pos, mask)[0])
    for absorb in (None, False, True):  # auto (absorbed decode), up-projected, absorbed everywhere
        ours.absorb = absorb
        cache = ours.new_cache(B, 16, "cpu", torch.float32)
        steps = [ours.compute_logits(ours(ids[:, :P], pos[:, :P], mask[:, :P], cache, 0)[0])]
        for t in range(P, T):
            h, _ = ours(ids[:, t : t + 1], pos[:, t : t + 1], mask[:, : t + 1], cache, t)
            steps.append(ours.compute_logits(h))
        assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5, absorb
    ours.absorb = None


@pytest.mark.parametrize("name", ["v3", "v2_lite"])
@torch.no_grad()
def test_greedy_32_tokens_match_transformers_generate(name, tmp_path):
    ref, ours = make_pair(name, tmp_path)
    ids = torch.tensor([[5, 17, 3, 42, 8, 61]])
    expect = ref.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, ids.shape[1] :].tolist()
    cache = ours.new_cache(1, 64, "cpu", torch.float32)
    T = ids.shape[1]
    h, _ = ours(ids, torch.arange(T)[None], torch.ones(1, T, dtype=torch.bool), cache, 0)
    got = []
    for _ in range(32):
        tok = ours.compute_logits(h[:, -1]).argmax(-1)  # (1,)
        got.append(tok.item())
        S = T + len(got)
        h, _ = ours(tok[:, None], torch.tensor([[S - 1]]), torch.ones(1, S, dtype=torch.bool), cache, S - 1)
    assert got == expect


@pytest.mark.parametrize("name", ["v3_yarn_noninterleaved", "v2_lite"])
@torch.no_grad()
def test_left_padded_batch_equals_each_alone(name, tmp_path):
    """Prompts of different lengths, left-padded into one batch (prefill + 3 decode steps) equal each run alone."""
    _, ours = make_pair(name, tmp_path)
    prompts = [[4, 9, 33, 2, 71, 5, 60], [12, 8], [90, 1, 1, 7]]
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (L - len(p)) + [True] * len(p) for p in prompts])
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    cache = ours.new_cache(3, 16, "cpu", torch.float32)
    batch = [ours.compute_logits(ours(ids, pos, mask, cache, 0)[0][:, -1:])]
    nxt = torch.tensor([[3], [50], [11]])
    for step in range(3):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], dim=1)
        pos = pos[:, -1:] + 1
        batch.append(ours.compute_logits(ours(nxt + step, pos, mask, cache, L + step)[0]))
    batch = torch.cat(batch, dim=1)  # (3, 4, V)
    for b, p in enumerate(prompts):
        seq = torch.tensor([p + [nxt[b, 0].item() + s for s in range(3)]])
        n = seq.shape[1]
        alone = ours.compute_logits(ours(seq, torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool))[0])
        assert rel_err(batch[b], alone[0, len(p) - 1 :]) <= 1e-5, b


def test_moe_experts_same_for_any_token_count():
    """The routed-expert sum for a token does not depend on which or how many other tokens share the call."""
    torch.manual_seed(0)
    experts = Experts(MLP(16, 8) for _ in range(6))
    x = torch.randn(13, 16)
    idx = torch.stack([torch.randperm(6)[:2] for _ in range(13)])
    w = torch.rand(13, 2)
    with torch.no_grad():
        together = experts(x, idx, w)
        alone = torch.cat([experts(x[i : i + 1], idx[i : i + 1], w[i : i + 1]) for i in range(13)])
        by_hand = torch.stack([sum(w[i, k] * experts[idx[i, k]](x[i]) for k in range(2)) for i in range(13)])
    assert rel_err(together, alone) <= 1e-6
    assert rel_err(together, by_hand) <= 1e-6


def test_tied_embeddings(tmp_path):
    ref, ours = make_pair("v2_lite", tmp_path, tie=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids, pos, mask = full_inputs(1, 6)
    with torch.no_grad():
        assert rel_err(ours.compute_logits(ours(ids, pos, mask)[0]), ref(input_ids=ids).logits) <= 1e-5


def test_config_reads_old_rope_scaling_and_rejects_unknown():
    old = {"rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                                    "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}}
    new = {"rope_parameters": dict(YARN)}
    assert DeepseekV3ForCausalLM.Config.from_hf(old) == DeepseekV3ForCausalLM.Config.from_hf(new)
    assert DeepseekV3ForCausalLM.Config.from_hf(new).topk_method == "noaux_tc"
    assert DeepseekV2ForCausalLM.Config.from_hf({"topk_method": None}).topk_method == "greedy"
    with pytest.raises(ValueError, match="dynamic"):
        DeepseekConfig.from_hf({"rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="n_group"):
        DeepseekConfig.from_hf({"topk_method": "group_limited_greedy", "n_routed_experts": 8, "n_group": 3})


def test_meta_construction_and_cache_shapes():
    cfg = DeepseekV3ForCausalLM.Config.from_hf({**{k: v for k, v in COMMON.items() if k != "attn_implementation"},
                                                "q_lora_rank": 24, "n_group": 4, "topk_group": 2})
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    cache = model.new_cache(2, 10, "cpu", torch.bfloat16)
    assert cache.latent.shape == (3, 2, 10, 16) and cache.k_pe.shape == (3, 2, 10, 8)
    assert cache.latent.dtype == torch.bfloat16


def save_word_tokenizer(folder, vocab_size: int = 97):
    """A word-level tokenizer over the words t0 .. t{V-1} (one id each), no special tokens, saved into folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)


@pytest.mark.parametrize("name", ["v3", "v2_yarn_grouped"])
@torch.no_grad()
def test_llm_api_greedy_and_batch(name, tmp_path):
    """Through `LLM(path)` (loader + engine): greedy 32 tokens equal transformers' generate, and a batch of
    different-length prompts equals each prompt run alone."""
    from gen.llm import LLM

    family, extra = CASES[name]
    CASES[f"{name}_noeos"] = (family, {**extra, "eos_token_id": None, "bos_token_id": None, "pad_token_id": 0})
    try:
        ref, _ = make_pair(f"{name}_noeos", tmp_path)
    finally:
        del CASES[f"{name}_noeos"]
    save_word_tokenizer(tmp_path)
    llm = LLM(tmp_path, device="cpu", dtype="fp32")
    assert type(llm.model) is OURS[family] and llm.stop_ids == []
    prompts = [[5, 17, 3, 42, 8, 61], [70, 9], [33, 1, 64, 20]]
    alone = []
    for p in prompts:
        ids = torch.tensor([p])
        expect = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(p) :].tolist()
        got = llm.generate(p, max_new_tokens=32)
        assert got == [" ".join(f"t{i}" for i in expect)]
        alone += got
    assert llm.generate(prompts, max_new_tokens=32) == alone
    assert llm.encode(prompts).hidden.shape == (3, 6, 32)


def test_loader_drops_mtp_layer_keys(tmp_path):
    """V3 / R1 checkpoints store the multi-token-prediction layer as model.layers.{num_hidden_layers}.*: ignored."""
    from safetensors.torch import save_file

    from gen.llm.loader import load_model

    ref, _ = make_pair("v3", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)  # an extra layer after the 3 real ones
    save_file(state, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1
    model, _ = load_model(tmp_path, torch.device("cpu"), torch.float32)
    assert model.ignored_checkpoint_keys
    cfg["num_nextn_predict_layers"] = 0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.layers\.3\.eh_proj"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)
