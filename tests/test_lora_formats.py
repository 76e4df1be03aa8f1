"""LoRA files (gen/lora): each format of assets/loras recognised from its keys and mapped onto our layers (fused BFL
projections split by rows, BFL's final modulation halves swapped, alphas and PEFT configs applied), and every kind
of bad file refused by a GenError naming it."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gen import GenError
from gen.lora import LoraSpec, check_specs, parse, parse_lora_arg, read_lora
from gen.lora.formats import FLUX, QWEN, WAN

LORAS = Path(__file__).resolve().parents[1] / "assets" / "loras"


@pytest.mark.parametrize("file, family, fmt", [
    ("flux-tiny/diffusers.safetensors", FLUX, "diffusers / PEFT"),
    ("flux-tiny/peft_folder", FLUX, "diffusers / PEFT"),
    ("flux-tiny/kohya.safetensors", FLUX, "kohya / sd-scripts"),
    ("flux-tiny/comfyui.safetensors", FLUX, "BFL / ComfyUI"),
    ("flux-tiny/bfl.safetensors", FLUX, "BFL / ComfyUI"),
    ("flux-tiny/xlabs.safetensors", FLUX, "XLabs"),
    ("wan-t2v-tiny/diffusers.safetensors", WAN, "diffusers / PEFT"),
    ("wan-t2v-tiny/lightx2v.safetensors", WAN, "Wan official / lightx2v / ComfyUI"),
    ("wan-t2v-tiny/comfyui.safetensors", WAN, "Wan official / lightx2v / ComfyUI"),
    ("wan-t2v-tiny/musubi.safetensors", WAN, "musubi-tuner / kohya"),
    ("qwen-image-tiny/diffusers.safetensors", QWEN, "diffusers / PEFT / Qwen-Image-Lightning"),
    ("qwen-image-tiny/lightning.safetensors", QWEN, "diffusers / PEFT / Qwen-Image-Lightning"),
    ("qwen-image-tiny/comfyui.safetensors", QWEN, "ComfyUI"),
    ("qwen-image-tiny/kohya.safetensors", QWEN, "kohya / sd-scripts"),
])
def test_every_format_is_recognised(file, family, fmt):
    w = read_lora(LORAS / file, family)
    assert w.format == fmt and w.pairs and w.rank in (2, 4)


def test_peft_folder_and_diffusers_file_hold_the_same_lora():
    """PEFT's save_pretrained (base_model.model. keys, alpha in adapter_config.json) == diffusers' save_lora_weights
    (transformer. keys, alpha in the safetensors metadata) of the same adapter."""
    a, b = read_lora(LORAS / "flux-tiny/diffusers.safetensors", FLUX), read_lora(LORAS / "flux-tiny/peft_folder", FLUX)
    assert a.pairs.keys() == b.pairs.keys()
    for k in a.pairs:
        assert torch.equal(a.pairs[k].down, b.pairs[k].down) and torch.equal(a.pairs[k].up, b.pairs[k].up)
    raw = load_file(LORAS / "flux-tiny/diffusers.safetensors")
    down = raw["transformer.x_embedder.lora_A.weight"]
    assert torch.allclose(a.pairs["x_embedder"].down, down * 8 / 4)  # lora_alpha 8 over r 4, folded into down


def test_bfl_names_split_fused_projections_and_swap_the_final_modulation():
    bfl = load_file(LORAS / "flux-tiny/bfl.safetensors")
    w = read_lora(LORAS / "flux-tiny/bfl.safetensors", FLUX)
    # single block linear1 -> q, k, v, proj_mlp by rows (1:1:1:4), one shared down scaled by alpha / rank
    up, down = bfl["single_blocks.0.linear1.lora_B.weight"], bfl["single_blocks.0.linear1.lora_A.weight"]
    alpha = bfl["single_blocks.0.linear1.alpha"].item()
    rows = up.split([32, 32, 32, 128])
    for name, r in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), rows):
        p = w.pairs[f"single_transformer_blocks.0.{name}"]
        assert torch.equal(p.up, r) and torch.allclose(p.down, down * alpha / 4)
    # final_layer.adaLN_modulation.1 writes (shift, scale); ours is (scale, shift)
    up = bfl["final_layer.adaLN_modulation.1.lora_B.weight"]
    assert torch.equal(w.pairs["norm_out.linear"].up, torch.cat(up.chunk(2)[::-1]))
    assert torch.equal(w.pairs["x_embedder"].up, bfl["img_in.lora_B.weight"])
    # the ComfyUI file holds the same matrices (lora_down/up under diffusion_model.) for the blocks' layers
    comfy = read_lora(LORAS / "flux-tiny/comfyui.safetensors", FLUX)
    for k, p in comfy.pairs.items():
        assert torch.equal(p.up, w.pairs[k].up) and torch.allclose(p.down, w.pairs[k].down)


def test_lightx2v_deltas_map_onto_our_parameters():
    w = read_lora(LORAS / "wan-t2v-tiny/lightx2v_full.safetensors", WAN)
    raw = load_file(LORAS / "wan-t2v-tiny/lightx2v_full.safetensors")
    assert torch.equal(w.deltas["blocks.1.attn2.to_out.0.bias"], raw["diffusion_model.blocks.1.cross_attn.o.diff_b"])
    assert torch.equal(w.deltas["blocks.0.norm2.weight"], raw["diffusion_model.blocks.0.norm3.diff"])  # Wan's norm3
    assert torch.equal(w.deltas["blocks.0.scale_shift_table"], raw["diffusion_model.blocks.0.diff_m"])
    assert torch.equal(w.deltas["scale_shift_table"], raw["diffusion_model.head.diff_m"])
    assert torch.equal(w.deltas["proj_out.bias"], raw["diffusion_model.head.head.diff_b"])
    assert "patch_embedding.weight" in w.deltas and "blocks.0.attn1.norm_q.weight" in w.deltas


def test_peft_adapter_names_and_rslora():
    g = torch.Generator().manual_seed(0)
    t = {"transformer_blocks.0.attn.to_q.lora_A.default.weight": torch.randn(4, 32, generator=g),
         "transformer_blocks.0.attn.to_q.lora_B.default.weight": torch.randn(32, 4, generator=g)}
    from gen.lora.formats import peft_alphas

    w = parse(t, QWEN, "mem", peft_alphas({"lora_alpha": 8, "use_rslora": True}))
    scale = 8 / math.sqrt(4)
    assert torch.allclose(w.pairs["transformer_blocks.0.attn.to_q"].down,
                          t["transformer_blocks.0.attn.to_q.lora_A.default.weight"] * scale)


def _write(tmp_path, tensors, name="x.safetensors", metadata=None) -> Path:
    path = tmp_path / name
    save_file(tensors, path, metadata=metadata)
    return path


def test_foreign_unknown_and_unsupported_files_are_refused_by_name(tmp_path):
    flux = LORAS / "flux-tiny/kohya.safetensors"
    with pytest.raises(GenError, match=r"kohya.safetensors is a FLUX.1 LoRA \(kohya / sd-scripts format\); this model "
                                       r"is Wan2.1 / Wan2.2"):
        read_lora(flux, WAN)
    bad = _write(tmp_path, {"model.layers.0.q_proj.lora_A.weight": torch.zeros(2, 4),
                            "transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 4),
                            "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(4, 2)})
    with pytest.raises(GenError, match=r"match no Qwen-Image LoRA format.*does not explain 1 of 3 keys: "
                                       r"model.layers.0.q_proj.lora_A.weight"):
        read_lora(bad, QWEN)
    dora = _write(tmp_path, {"transformer.x_embedder.lora_magnitude_vector": torch.ones(4)}, "dora.safetensors")
    with pytest.raises(GenError, match="DoRA adapters are not supported"):
        read_lora(dora, FLUX)
    half = _write(tmp_path, {"transformer.x_embedder.lora_A.weight": torch.zeros(2, 16)}, "half.safetensors")
    with pytest.raises(GenError, match="x_embedder has a down matrix but no up one"):
        read_lora(half, FLUX)
    nan = _write(tmp_path, {"transformer.x_embedder.lora_A.weight": torch.full((2, 16), math.nan),
                            "transformer.x_embedder.lora_B.weight": torch.zeros(32, 2)}, "nan.safetensors")
    with pytest.raises(GenError, match="nan.safetensors: tensor transformer.x_embedder.lora_A.weight holds NaN"):
        read_lora(nan, FLUX)


@pytest.mark.parametrize("key", ["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                                 "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                                 "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
                                 "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight"])
def test_text_encoder_keys_are_refused_by_name_where_the_encoder_takes_no_loras(tmp_path, key):
    """kohya / diffusers text-encoder keys (CLIP or T5) in a LoRA of a family whose text encoder takes none (here
    Qwen-Image's, on the LLM runtime): refused, the first ones named, the family said; a file of only them too.
    FLUX.1's are read: tests/test_lora_text_encoder.py."""
    t = dict(load_file(LORAS / "qwen-image-tiny/kohya.safetensors"))
    t[key] = torch.zeros(2, 4)
    with pytest.raises(GenError, match=rf"has 1 text-encoder keys \({key}\): text-encoder LoRAs are not supported "
                                      r"for Qwen-Image: its text encoder .* runs on gen's LLM runtime"):
        read_lora(_write(tmp_path, t), QWEN)
    with pytest.raises(GenError, match="text-encoder keys .* not supported for Wan2.1 / Wan2.2: its UMT5"):
        read_lora(_write(tmp_path, {key: torch.zeros(2, 4)}, "te.safetensors"), WAN)


def test_truncated_corrupt_and_pickled_files_are_named(tmp_path):
    data = (LORAS / "flux-tiny/xlabs.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(GenError, match=r"cut.safetensors is truncated: its tensors need \d+ bytes"):
        read_lora(tmp_path / "cut.safetensors", FLUX)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(GenError, match="junk.safetensors has an unreadable safetensors header"):
        read_lora(tmp_path / "junk.safetensors", FLUX)
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(GenError, match="tiny.safetensors is not a safetensors file"):
        read_lora(tmp_path / "tiny.safetensors", FLUX)
    (tmp_path / "old.bin").write_bytes(b"x")
    with pytest.raises(GenError, match="not a .safetensors file"):
        read_lora(tmp_path / "old.bin", FLUX)
    with pytest.raises(GenError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors", FLUX)
    (tmp_path / "two").mkdir()
    for n in ("a", "b"):
        _write(tmp_path / "two", {"transformer.x_embedder.lora_A.weight": torch.zeros(1, 1)}, f"{n}.safetensors")
    with pytest.raises(GenError, match=r"holds 2 .safetensors files \(\['a.safetensors', 'b.safetensors'\]\)"):
        read_lora(tmp_path / "two", FLUX)
    meta = _write(tmp_path, dict(load_file(LORAS / "flux-tiny/diffusers.safetensors")), "meta.safetensors",
                  {"lora_adapter_metadata": "{not json"})
    with pytest.raises(GenError, match="meta.safetensors: unreadable lora_adapter_metadata"):
        read_lora(meta, FLUX)


def test_requested_sets_are_checked_with_their_position():
    assert check_specs([("a.safetensors", 0.5), "b.safetensors", LoraSpec("c", -2, "transformer_2")],
                       slots=("transformer", "transformer_2")) == (
        LoraSpec("a.safetensors", 0.5), LoraSpec("b.safetensors", 1.0), LoraSpec("c", -2.0, "transformer_2"))
    for scale in (math.nan, math.inf, 10.5, -11, "1", True):
        with pytest.raises(GenError) as e:
            check_specs([("a", 1.0), ("b", scale)])
        assert e.value.param == "loras[1].scale"
    with pytest.raises(GenError, match="at most 4 LoRAs per request, got 5"):
        check_specs(["a"] * 5)
    with pytest.raises(GenError) as e:
        check_specs([("a", 1.0, "transformer_2")], slots=("transformer",))
    assert e.value.param == "loras[0].target" and "it has ['transformer']" in str(e.value)
    with pytest.raises(GenError) as e:
        check_specs([3])
    assert e.value.param == "loras[0]"


def test_cli_lora_argument(tmp_path):
    assert parse_lora_arg("style.safetensors") == LoraSpec("style.safetensors", 1.0)
    assert parse_lora_arg("style.safetensors:0.75") == LoraSpec("style.safetensors", 0.75)
    assert parse_lora_arg("high.safetensors:1.5@transformer") == LoraSpec("high.safetensors", 1.5, "transformer")
    assert parse_lora_arg("/x/low.safetensors@transformer_2") == LoraSpec("/x/low.safetensors", 1.0, "transformer_2")
    odd = tmp_path / "a:b@c.safetensors"
    odd.write_bytes(b"")
    assert parse_lora_arg(str(odd)) == LoraSpec(str(odd))  # an existing path is taken whole
    with pytest.raises(GenError, match="LoRA scale must be a finite number in"):
        parse_lora_arg("style.safetensors:nan")
    with pytest.raises(GenError, match="empty target"):
        parse_lora_arg("style.safetensors@")
