"""DeepSeek-V3 checkpoints as released: block-scaled FP8 weights (`weight_scale_inv`) dequantized at load, and the
float32 routing bias kept float32 in a bf16 load. A tiny random V3 is written dequantized (the reference) and as FP8
with 16x16 blocks (edge blocks partial) by the small writer below; fp32 CPU."""
from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from helpers import rel_err
from safetensors.torch import load_file, save_file

from gen.llm.loader import load_model

BLOCK = (16, 16)
CONFIG = dict(vocab_size=97, hidden_size=40, intermediate_size=48, moe_intermediate_size=20, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
              qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
              n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
              max_position_embeddings=64, eos_token_id=None, bos_token_id=None, pad_token_id=0)
QUANTIZED = re.compile(r"(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def block_scales(w: torch.Tensor) -> torch.Tensor:
    """One fp32 scale per 16x16 block (partial at the edges) so the block's absmax maps to e4m3's 448."""
    o, i = w.shape
    pad = torch.zeros(-(-o // BLOCK[0]) * BLOCK[0], -(-i // BLOCK[1]) * BLOCK[1])
    pad[:o, :i] = w.abs()
    amax = pad.view(pad.shape[0] // BLOCK[0], BLOCK[0], pad.shape[1] // BLOCK[1], BLOCK[1]).amax((1, 3))
    return amax.clamp_min(1e-12) / 448.0


def expand(scale: torch.Tensor, shape) -> torch.Tensor:
    return scale.repeat_interleave(BLOCK[0], 0)[: shape[0]].repeat_interleave(BLOCK[1], 1)[:, : shape[1]]


def write_pair(root):
    """(reference folder: dequantized fp32 weights, fp8 folder: e4m3 weights + scales in two shards, ref state)."""
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**CONFIG)).eval()
    with torch.no_grad():  # larger random weights than the init so routing and attention are far from uniform
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.1 * torch.randn_like(b))
    ref_dir, fp8_dir = root / "ref", root / "fp8"
    model.save_pretrained(ref_dir)
    state = load_file(ref_dir / "model.safetensors")
    fp8, deq = {}, dict(state)
    for k, w in state.items():
        if QUANTIZED.search(k):
            scale = block_scales(w)
            q = (w / expand(scale, w.shape)).to(torch.float8_e4m3fn)
            fp8[k], fp8[k + "_scale_inv"] = q, scale
            deq[k] = q.float() * expand(scale, w.shape)
        else:
            fp8[k] = w
    save_file(deq, ref_dir / "model.safetensors", metadata={"format": "pt"})
    fp8_dir.mkdir()
    keys = sorted(fp8)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for f, ks in shards.items():  # a weight and its scale land in different shards
        save_file({k: fp8[k] for k in ks}, fp8_dir / f, metadata={"format": "pt"})
    (fp8_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    cfg = json.loads((ref_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK),
                                  "activation_scheme": "dynamic"}
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    return ref_dir, fp8_dir, deq


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("deepseek_fp8"))


@torch.no_grad()
def test_fp8_load_equals_dequantized_reference(folders):
    ref_dir, fp8_dir, deq = folders
    quantized = [k for k in deq if QUANTIZED.search(k)]
    assert any(deq[k].shape[0] % BLOCK[0] for k in quantized) and any(deq[k].shape[1] % BLOCK[1] for k in quantized)
    ours, _ = load_model(fp8_dir, torch.device("cpu"), torch.float32)
    plain, _ = load_model(ref_dir, torch.device("cpu"), torch.float32)
    got, want = ours.state_dict(), plain.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)

    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    last, _ = ours(ids, torch.arange(9).expand(2, 9), torch.ones(2, 9, dtype=torch.bool))
    assert rel_err(ours.compute_logits(last), ref(input_ids=ids).logits) <= 1e-5

    prompt = torch.tensor([[5, 17, 3, 42, 8, 61]])
    expect = ref.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, 6:].tolist()
    from gen.llm.engine import Engine
    from gen.llm.sampling import SamplingParams

    eng = Engine(ours, torch.device("cpu"), torch.float32, 64, stop_ids=[], pad_id=0)
    assert eng.generate([prompt[0].tolist()], SamplingParams(max_new_tokens=16))[0] == expect


@torch.no_grad()
def test_bf16_load_dequantizes_once_and_keeps_routing_bias_fp32(folders):
    """bf16: each FP8 weight is the fp32 product rounded once; e_score_correction_bias stays the file's fp32 values."""
    ref_dir, fp8_dir, deq = folders
    for folder in (fp8_dir, ref_dir):
        model, _ = load_model(folder, torch.device("cpu"), torch.bfloat16)
        state = model.state_dict()
        biases = [k for k in state if k.endswith("e_score_correction_bias")]
        assert len(biases) == 2  # the two MoE layers
        for k in biases:
            assert state[k].dtype == torch.float32
            assert torch.equal(state[k], deq[k])
            assert not torch.equal(deq[k].bfloat16().float(), deq[k])  # a bf16 cast would have changed them
        assert all(t.dtype == torch.bfloat16 for k, t in state.items() if k not in biases)
        for k in [k for k in deq if QUANTIZED.search(k)][:6]:
            assert torch.equal(state[k], deq[k].bfloat16())


def test_unsupported_quantization_and_bad_scales_named(folders, tmp_path):
    _, fp8_dir, _ = folders
    cfg = json.loads((fp8_dir / "config.json").read_text())
    for f in fp8_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "awq", "bits": 4}}))
    with pytest.raises(ValueError, match="quant_method 'fp8'.*awq|awq.*not supported"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    with pytest.raises(ValueError, match="weight_scale_inv.*no quantization_config"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)
    bad = {**cfg, "quantization_config": {**cfg["quantization_config"], "weight_block_size": [8, 8]}}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"does not fit a .* weight in 8x8 blocks"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)
