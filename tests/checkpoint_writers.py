"""Small writers of the single-file checkpoint layouts and formats people publish, for the tests: our (diffusers)
keys -> the original BFL FLUX / Wan keys, ComfyUI's prefix and fp8_scaled files, and GGUF files quantized to Q8_0
(gguf-py's own quantizer) or Q4_K / Q5_K / Q6_K (encoders below: plain min/max scales, not llama.cpp's search, in
ggml's exact block layout, checked against gguf-py's decoder)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

COMFY_PREFIX = "model.diffusion_model."


# ---------------------------------------------------------------- key layouts (ours -> theirs)


def flux_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our FLUX keys -> the original BFL layout (q/k/v fused into qkv, linear1 = q|k|v|mlp, final (shift, scale))."""
    out, sd = {}, dict(sd)

    def take(ours, theirs):
        for suffix in ("weight", "bias"):
            if f"{ours}.{suffix}" in sd:
                out[f"{theirs}.{suffix}"] = sd.pop(f"{ours}.{suffix}")

    def fuse(parts, theirs):
        for suffix in ("weight", "bias"):
            out[f"{theirs}.{suffix}"] = torch.cat([sd.pop(f"{p}.{suffix}") for p in parts])

    take("x_embedder", "img_in")
    take("context_embedder", "txt_in")
    for ours, theirs in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"),
                         ("guidance_embedder", "guidance_in")):
        take(f"time_text_embed.{ours}.linear_1", f"{theirs}.in_layer")
        take(f"time_text_embed.{ours}.linear_2", f"{theirs}.out_layer")
    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for i in range(n_double):
        t, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        take(t + "norm1.linear", d + "img_mod.lin")
        take(t + "norm1_context.linear", d + "txt_mod.lin")
        fuse([t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"], d + "img_attn.qkv")
        fuse([t + "attn.add_q_proj", t + "attn.add_k_proj", t + "attn.add_v_proj"], d + "txt_attn.qkv")
        for ours, theirs in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                             ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[d + theirs + ".scale"] = sd.pop(t + f"attn.{ours}.weight")
        take(t + "attn.to_out.0", d + "img_attn.proj")
        take(t + "attn.to_add_out", d + "txt_attn.proj")
        take(t + "ff.net.0.proj", d + "img_mlp.0")
        take(t + "ff.net.2", d + "img_mlp.2")
        take(t + "ff_context.net.0.proj", d + "txt_mlp.0")
        take(t + "ff_context.net.2", d + "txt_mlp.2")
    for i in range(n_single):
        u, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        take(u + "norm.linear", s + "modulation.lin")
        fuse([u + "attn.to_q", u + "attn.to_k", u + "attn.to_v", u + "proj_mlp"], s + "linear1")
        out[s + "norm.query_norm.scale"] = sd.pop(u + "attn.norm_q.weight")
        out[s + "norm.key_norm.scale"] = sd.pop(u + "attn.norm_k.weight")
        take(u + "proj_out", s + "linear2")
    take("proj_out", "final_layer.linear")
    for suffix in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{suffix}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift, scale])
    assert not sd, f"keys left: {sorted(sd)}"
    return out


WAN_NAMES = [  # ours -> Wan's (plain substring renames, applied in order)
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
    (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".o."),
    (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."), (".norm_added_k.", ".norm_k_img."),
    (".norm2.", ".norm3."), (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    ("proj_out.", "head.head."),
]


def wan_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Wan keys -> Wan's own layout (self_attn / cross_attn, q/k/v/o, norm3 for the cross-attention norm, head)."""
    out = {}
    for key, value in sd.items():
        new = key
        if new == "scale_shift_table":
            new = "head.modulation"
        elif new.endswith(".scale_shift_table"):
            new = new.replace(".scale_shift_table", ".modulation")
        else:
            for ours, theirs in WAN_NAMES:
                new = new.replace(ours, theirs)
        out[new] = value
    return out


def comfy(sd: dict[str, torch.Tensor], extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A ComfyUI checkpoint: every key under `model.diffusion_model.`, plus other components' keys (`extra`)."""
    return {**{COMFY_PREFIX + k: v for k, v in sd.items()}, **(extra or {})}


def fp8_scaled(sd: dict[str, torch.Tensor], linear_weights: set[str], per_channel: bool = False,
               scale_name: str = "scale_weight", marker: bool = True) -> dict[str, torch.Tensor]:
    """The Linear weights in `linear_weights` as float8_e4m3fn with an fp32 scale (`<layer>.scale_weight`: ComfyUI's
    fp8_scaled; per tensor, or per output channel), plus ComfyUI's `scaled_fp8` marker."""
    out = {}
    for key, value in sd.items():
        if key not in linear_weights:
            out[key] = value
            continue
        w = value.float()
        amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
        scale = (amax / 448.0).clamp_min(1e-12)
        out[key] = (w / (scale[:, None] if per_channel else scale)).to(torch.float8_e4m3fn)
        out[key[: -len("weight")] + scale_name] = scale.float()
    if marker:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def write_safetensors(path: Path, sd: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------- GGUF


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _round(x):
    return np.floor(x + 0.5)


def _scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins (n, 8) -> ggml's 12 packed bytes (the inverse of its get_scale_min_k4)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    d = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    m = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([d, m, md], axis=1)


def _affine_k(x: np.ndarray, levels: int):
    """Per 32-value sub-block min/max -> (d, dmin fp16 per block; 6-bit scales and mins; codes 0..levels)."""
    lo = np.minimum(x.min(axis=-1), 0)  # (n, 8), ggml's mins are <= 0
    hi = x.max(axis=-1)
    step = (hi - lo) / levels
    d = (step.max(axis=1) / 63).astype(np.float16).astype(np.float32)  # (n,)
    dmin = ((-lo).max(axis=1) / 63).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(_round(np.where(d[:, None] > 0, step / d[:, None], 0)), 0, 63)
        mn = np.clip(_round(np.where(dmin[:, None] > 0, -lo / dmin[:, None], 0)), 0, 63)
        scale, offset = d[:, None] * sc, dmin[:, None] * mn
        q = np.where(scale[..., None] > 0, _round((x + offset[..., None]) / scale[..., None]), 0)
    return d, dmin, sc, mn, np.clip(q, 0, levels).astype(np.uint8)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 144) Q4_K blocks."""
    n = x.shape[0]
    d, dmin, sc, mn, q = _affine_k(x.reshape(n, 8, 32), 15)
    q = q.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _scales_k4(sc, mn), qs], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 176) Q5_K blocks."""
    n = x.shape[0]
    d, dmin, sc, mn, q = _affine_k(x.reshape(n, 8, 32), 31)  # (n, 8, 32)
    qh = np.zeros((n, 32), dtype=np.uint8)
    for j in range(8):
        qh |= ((q[:, j] >> 4) & 1) << j
    low = (q & 0x0F).reshape(n, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _scales_k4(sc, mn), qh, qs], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 210) Q6_K blocks (16 sub-blocks of 16 with int8 scales)."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    step = np.abs(sub).max(axis=-1) / 31  # (n, 16)
    d = (step.max(axis=1) / 127).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(_round(np.where(d[:, None] > 0, step / d[:, None], 0)), -128, 127)
        scale = d[:, None] * sc
        q = np.where(scale[..., None] > 0, _round(sub / scale[..., None]), 0)
    u = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 256)
    low = (u & 0x0F).reshape(n, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = (u >> 4).reshape(n, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)


K_ENCODERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """(rows, cols) float32 -> (rows, row bytes) uint8 blocks of `qtype`."""
    import gguf

    if qtype in K_ENCODERS:
        rows = x.shape[0]
        return K_ENCODERS[qtype](x.reshape(-1, 256).astype(np.float32)).reshape(rows, -1)
    return gguf.quants.quantize(x.astype(np.float32), getattr(gguf.GGMLQuantizationType, qtype))


def write_gguf(path: Path, arch: str, sd: dict[str, torch.Tensor], qtype: str, min_numel: int = 1024) -> Path:
    """A GGUF file as city96's convert.py writes diffusion models: the keys as given, `general.architecture` =
    `arch`; matrices of more than `min_numel` values whose rows are whole blocks quantized to `qtype` (Q8_0, Q4_K, ...;
    or F16 / BF16 / F32), everything else F32 (shapes of more than 4 dims too: Wan's patch embedding)."""
    import gguf

    block = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256}.get(qtype, 32)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in sd.items():
        x = value.detach().float().numpy()
        if qtype == "F32" or x.ndim != 2 or x.size <= min_numel or x.shape[1] % block:
            writer.add_tensor(key, x.astype(np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
        elif qtype in ("F16", "BF16"):
            t = getattr(gguf.GGMLQuantizationType, qtype)
            writer.add_tensor(key, gguf.quants.quantize(x, t), raw_dtype=t)
        else:
            writer.add_tensor(key, quantize(x, qtype), raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized_gguf(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file decoded by gguf-py's numpy reference (the tests' dequantized reference)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = torch.from_numpy(np.array(x, dtype=np.float32)).reshape(tuple(reversed(t.shape.tolist())))
    return out
