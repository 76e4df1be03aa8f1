"""Quantized DiT checkpoints loaded as they are (gen/models/quantized.py, component_loaders/single_file.py): our torch
GGUF decoders equal gguf-py's numpy reference bit for bit; tiny DiTs (width 256, one block of each kind) written as
GGUF Q8_0 / Q6_K / Q5_K / Q4_K and as FP8 (per tensor, per channel, ComfyUI fp8_scaled old and new, plain cast) give
their dequantized reference's output (the same weights, decoded per layer on the fly) and stay within the
quantization error of the unquantized model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from checkpoint_writers import (comfy, dequantized_gguf, flux_to_bfl, fp8_scaled, quantize, wan_to_original,
                                write_gguf, write_safetensors)
from component_loaders.single_file import load_single_file
from gen import GenError
from gen.config import config_from_dict
from gen.families import DITS
from gen.models.quantized import BLOCKS, Fp8WeightLinear, GGUFLinear, dequantize
from gen.transforms.fp8 import Fp8Linear
from helpers import rel_err

CPU = torch.device("cpu")
CONFIGS = {  # width 256 (K-quant rows are whole blocks of 256), one block of each kind
    "flux": ("FluxTransformer2DModel", dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                            num_attention_heads=2, joint_attention_dim=256, pooled_projection_dim=256,
                                            guidance_embeds=True, axes_dims_rope=[16, 56, 56])),
    "wan": ("WanTransformer3DModel", dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=128,
                                          in_channels=16, out_channels=16, text_dim=256, freq_dim=256, ffn_dim=512,
                                          num_layers=1)),
    "qwen_image": ("QwenImageTransformer2DModel", dict(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                                       attention_head_dim=128, num_attention_heads=2,
                                                       joint_attention_dim=256, axes_dims_rope=[16, 56, 56])),
}
TO_ORIGINAL = {"flux": flux_to_bfl, "wan": wan_to_original, "qwen_image": dict}
# The quantization error: the writer's weights decode to a relative (rms) error of 0.5% (Q8_0), 1.9% (Q6_K),
# 3.8% (Q5_K), 7.7% (Q4_K), ~3% (FP8 e4m3); through a block of each kind (every Linear quantized, errors adding up)
# the output of these random tiny DiTs moves by 0.9-1.2% (Q8_0), 3.1-4.6% (Q6_K), 8.7% (Q5_K), 9.7-19.6% (Q4_K) and
# 6.8-7.6% (FP8). The bounds are 1.5x the largest measured.
BOUNDS = {"Q8_0": 0.02, "Q6_K": 0.07, "Q5_K": 0.13, "Q4_K": 0.3, "fp8": 0.12}


def tiny_dit(arch: str, folder: Path) -> tuple[nn.Module, dict]:
    """A random tiny DiT of `arch`, its config.json written in `folder`; (model, forward inputs)."""
    cls, cfg = CONFIGS[arch]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": cls, **cfg}))
    dit = DITS[cls]
    torch.manual_seed(0)
    model = dit.model(config_from_dict(dit.config, cfg)).eval()
    for p in model.parameters():  # norms and tables away from their all-ones / zero start
        p.data += 0.05 * torch.randn_like(p)
    g = torch.Generator().manual_seed(1)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if arch == "flux":
        inputs = dict(hidden_states=rnd(1, 16, 64), encoder_hidden_states=rnd(1, 8, 256),
                      pooled_projections=rnd(1, 256),
                      timestep=torch.tensor([0.5]), img_ids=torch.rand(16, 3, generator=g) * 4,
                      txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))
    elif arch == "wan":
        inputs = dict(hidden_states=rnd(1, 16, 2, 8, 8), timestep=torch.tensor([500.0]),
                      encoder_hidden_states=rnd(1, 8, 256))
    else:
        inputs = dict(hidden_states=rnd(1, 16, 64), encoder_hidden_states=rnd(1, 8, 256),
                      encoder_hidden_states_mask=None, timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]])
    return model, inputs


def load(file: Path, folder: Path, arch: str, fp8_matmul: bool = False) -> nn.Module:
    return load_single_file(file, folder, DITS[CONFIGS[arch][0]], CPU, torch.float32, fp8_matmul=fp8_matmul)


@torch.no_grad()
def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs)


def sanitized_blocks(qtype: str, rows: int, rng) -> np.ndarray:
    """Random blocks of `qtype` whose fp16 scale fields are finite (random bytes there could be inf / NaN)."""
    size, nbytes = BLOCKS[qtype]
    raw = rng.integers(0, 256, size=(rows, nbytes), dtype=np.uint8)
    fields = {"Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[qtype]
    for at in fields:
        raw[:, at:at + 2] = rng.uniform(-2, 2, size=(rows, 1)).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", sorted(BLOCKS))
def test_decoders_equal_gguf_reference(qtype):
    import gguf

    raw = sanitized_blocks(qtype, 64, np.random.default_rng(0))
    ref = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))
    ours = dequantize(torch.from_numpy(raw), qtype, ref.shape)
    assert np.array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q5_K", "Q4_K"])
def test_writer_quantizes_within_its_step(qtype):
    """The test writer's encoders (ours for the K-quants) decode, by gguf-py, to within their quantization step."""
    import gguf

    x = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)
    y = gguf.quants.dequantize(quantize(x, qtype), getattr(gguf.GGMLQuantizationType, qtype))
    err = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert err < {"Q8_0": 0.007, "Q6_K": 0.025, "Q5_K": 0.05, "Q4_K": 0.1}[qtype], err


@pytest.mark.parametrize("arch, qtype", [("flux", "Q8_0"), ("flux", "Q6_K"), ("flux", "Q5_K"), ("flux", "Q4_K"),
                                         ("wan", "Q8_0"), ("wan", "Q4_K"), ("qwen_image", "Q8_0"),
                                         ("qwen_image", "Q4_K")])
def test_gguf_dit_equals_its_dequantized_reference(tmp_path, arch, qtype):
    model, inputs = tiny_dit(arch, tmp_path / "transformer")
    original = TO_ORIGINAL[arch](model.state_dict())
    file = write_gguf(tmp_path / "t.gguf", arch, original, qtype)
    quantized = load(file, tmp_path / "transformer", arch)
    layers = [m for m in quantized.modules() if isinstance(m, GGUFLinear)]
    assert layers and all(m.qtype == qtype for m in layers)
    reference = load(write_safetensors(tmp_path / "ref.safetensors", dequantized_gguf(file)), tmp_path / "transformer",
                     arch)
    out, ref, full = run(quantized, inputs), run(reference, inputs), run(model, inputs)
    assert rel_err(out, ref) <= 1e-6  # the same weights, decoded per layer by our torch code
    assert 0 < rel_err(out, full) <= BOUNDS[qtype], rel_err(out, full)


@pytest.mark.parametrize("variant", ["per-tensor", "per-channel", "comfy-new", "plain-cast"])
def test_fp8_dit_equals_its_dequantized_reference(tmp_path, variant):
    model, inputs = tiny_dit("flux", tmp_path / "transformer")
    bfl = flux_to_bfl(model.state_dict())
    linears = {k for k, v in bfl.items() if k.endswith(".weight") and v.ndim == 2}
    metadata = None
    if variant == "plain-cast":  # e.g. flux1-dev-fp8: weights cast, no scales
        sd = {k: v.to(torch.float8_e4m3fn) if k in linears else v for k, v in bfl.items()}
    elif variant == "comfy-new":  # ComfyUI's newer layout: weight_scale, layers listed in the file's metadata
        sd = comfy(fp8_scaled(bfl, linears, scale_name="weight_scale", marker=False))
        metadata = {"_quantization_metadata": json.dumps(
            {"layers": {k[: -len(".weight")]: {"format": "float8_e4m3fn"} for k in linears}})}
    else:  # ComfyUI's fp8_scaled: scale_weight per tensor (and the marker), or per output channel
        sd = comfy(fp8_scaled(bfl, linears, per_channel=variant == "per-channel"))
    file = write_safetensors(tmp_path / "t.safetensors", sd, metadata)
    quantized = load(file, tmp_path / "transformer", "flux")
    assert any(isinstance(m, Fp8WeightLinear) for m in quantized.modules())
    dequantized = {}
    for k, v in bfl.items():
        key = "model.diffusion_model." + k if variant != "plain-cast" else k
        w = sd[key]
        if k in linears:
            scale = sd.get(key[: -len("weight")] + ("weight_scale" if variant == "comfy-new" else "scale_weight"),
                           torch.ones(()))
            w = w.float() * (scale[:, None] if scale.ndim == 1 else scale)
        dequantized[k] = w
    reference = load(write_safetensors(tmp_path / "ref.safetensors", dequantized), tmp_path / "transformer", "flux")
    out, ref, full = run(quantized, inputs), run(reference, inputs), run(model, inputs)
    assert rel_err(out, ref) <= 1e-6
    assert 0 < rel_err(out, full) <= BOUNDS["fp8"], rel_err(out, full)


def test_fp8_weights_go_to_fp8_tensor_cores_where_there_are_some(tmp_path):
    """With fp8_matmul (a CUDA GPU of compute capability 8.9+ in bf16), e4m3 Linear weights become gen's Fp8Linear,
    the checkpoint's bytes and per-channel scales taken as they are (no requantization)."""
    model, _ = tiny_dit("flux", tmp_path / "transformer")
    bfl = flux_to_bfl(model.state_dict())
    linears = {k for k, v in bfl.items() if k.endswith(".weight") and v.ndim == 2}
    sd = fp8_scaled(bfl, linears)
    quantized = load(write_safetensors(tmp_path / "t.safetensors", sd), tmp_path / "transformer", "flux",
                     fp8_matmul=True)
    layer = quantized.transformer_blocks[0].attn.to_out[0]
    assert isinstance(layer, Fp8Linear)
    w = sd["double_blocks.0.img_attn.proj.weight"]
    assert torch.equal(layer.weight.view(torch.uint8), w.view(torch.uint8))
    assert torch.equal(layer.weight_scale, sd["double_blocks.0.img_attn.proj.scale_weight"].expand(w.shape[0]))
    assert not any(isinstance(m, Fp8WeightLinear) for m in quantized.modules())  # every size a multiple of 16


def test_unsupported_quantizations_are_refused(tmp_path):
    import gguf

    model, _ = tiny_dit("flux", tmp_path / "transformer")
    bfl = flux_to_bfl(model.state_dict())
    writer = gguf.GGUFWriter(path=None, arch="flux")
    for k, v in bfl.items():
        if k == "double_blocks.0.img_attn.proj.weight":  # IQ4_NL: 32 values in 18 bytes
            raw = np.zeros((v.shape[0], v.shape[1] // 32 * 18), dtype=np.uint8)
            writer.add_tensor(k, raw, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            writer.add_tensor(k, v.numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file(path=str(tmp_path / "iq.gguf"))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GenError, match=r"double_blocks.0.img_attn.proj.weight is IQ4_NL, a GGUF type we do not decode"):
        load(tmp_path / "iq.gguf", tmp_path / "transformer", "flux")
    file = write_safetensors(tmp_path / "n.safetensors", comfy(bfl), {"_quantization_metadata": json.dumps(
        {"layers": {"double_blocks.0.img_attn.proj": {"format": "nvfp4"}}})})
    with pytest.raises(GenError, match=r"layer double_blocks.0.img_attn.proj is quantized as 'nvfp4'"):
        load(file, tmp_path / "transformer", "flux")
