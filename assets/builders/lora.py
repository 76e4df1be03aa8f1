"""Tiny LoRA files for the tiny FLUX, Wan, Qwen-Image, FLUX.2, Z-Image and Qwen-Image 2.1 checkpoints (assets/loras/<model>/), one per format people
download (what diffusers reads for each, for parity): the diffusers / PEFT ones from adapters PEFT puts on diffusers' own transformer, written by the pipeline's
`save_lora_weights` (and PEFT's `save_pretrained` for a PEFT folder); the others by small writers of each format's
keys (kohya / sd-scripts, ComfyUI, BFL, XLabs, Wan official / lightx2v, musubi-tuner, Qwen-Image-Lightning), from
seeded random matrices shaped after the checkpoint's layers. Names of theirs come from gen/lora/formats.py's tables.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import torch
from diffusers import (Flux2Pipeline, Flux2Transformer2DModel, FluxPipeline, FluxTransformer2DModel,
                       QwenImage21Pipeline, QwenImage21Transformer2DModel, QwenImagePipeline,
                       QwenImageTransformer2DModel, WanPipeline, WanTransformer3DModel, ZImagePipeline,
                       ZImageTransformer2DModel)
from safetensors.torch import save_file

from gen.lora.formats import (FLUX_BFL, FLUX_XLABS, QWEN21_OURS, WAN_ORIGINAL, ZIMAGE_ORIGINAL, Naming,
                              _BFL2, _ZIMAGE_OURS)

RANK = 4
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
                "norm1.linear", "norm1_context.linear", "norm.linear", "x_embedder", "norm_out.linear"]
WAN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out", "time_proj"]
QWEN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
                "img_in", "proj_out"]


def _randn(shape, g: torch.Generator, std: float = 0.4) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * std).contiguous()


# ---------------------------------------------------------------- diffusers / PEFT


def peft_adapter(transformer, targets: list[str], seed: int, r: int = RANK, alpha: float = 8, **config):
    """PEFT LoRA layers on `transformer` (seeded random A and B, so the LoRA does something); (state dict, config)."""
    from peft import LoraConfig, get_peft_model_state_dict

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **config)
    transformer.add_adapter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(transformer.named_parameters()):
            if ".lora_" in name:
                p.copy_(_randn(p.shape, g))
    return get_peft_model_state_dict(transformer), cfg


def write_diffusers(out: Path, name: str, pipeline_cls, transformer, targets, seed, **kw) -> Path:
    """A LoRA in diffusers' format, written by the pipeline's own save_lora_weights (with its PEFT config)."""
    layers, cfg = peft_adapter(transformer, targets, seed, **kw)
    metadata = {k: (list(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items()}
    pipeline_cls.save_lora_weights(out, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata,
                                   weight_name=f"{name}.safetensors")
    return out / f"{name}.safetensors"


def write_peft_folder(out: Path, transformer, targets, seed, **kw) -> Path:
    """The same LoRA as PEFT's own save_pretrained writes it: adapter_model.safetensors + adapter_config.json."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(transformer, LoraConfig(r=kw.pop("r", RANK), lora_alpha=kw.pop("alpha", 8),
                                                   target_modules=targets, init_lora_weights=False, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(transformer.named_parameters(), key=lambda x: x[0].replace("base_model.model.", "")):
            if ".lora_" in name:
                p.copy_(_randn(p.shape, g))
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model card template, not the adapter
    return out


# ---------------------------------------------------------------- the other formats


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """Our (= diffusers') path of every linear layer -> (in, out)."""
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def their_modules(naming: Naming, shapes: dict, keep=lambda name: True) -> list[tuple[str, int, int]]:
    """(their module name, in, out) for every module of theirs whose targets this model has (block indices
    expanded)."""
    found = []
    for template, target in naming.modules.items():
        for i in (range(64) if "{i}" in template else [None]):
            ours = [o.format(i=i) if i is not None else o for o in target.ours]
            if not all(o in shapes for o in ours):
                if i is not None and i > 0:
                    break
                continue
            name = template.format(i=i) if i is not None else template
            if keep(name):
                found.append((name, shapes[ours[0]][0], sum(shapes[o][1] for o in ours)))
    return found


def write_native(path: Path, modules, seed: int, prefix: str, flat: bool = False, down: str = "lora_down.weight",
                 up: str = "lora_up.weight", alpha=None, extra: dict | None = None) -> Path:
    """A LoRA file in a format of their own names: `prefix` + module (dots -> underscores when `flat`) + suffix;
    `alpha(module, rank)` -> alpha or None (no key)."""
    tensors = {}
    for name, d_in, d_out in modules:  # each module's matrices from its own seed: a subset of modules, same values
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        key = prefix + (name.replace(".", "_") if flat else name)
        tensors[f"{key}.{down}"] = _randn((RANK, d_in), g)
        tensors[f"{key}.{up}"] = _randn((d_out, RANK), g)
        a = alpha(name, RANK) if alpha else None
        if a is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(a))
    tensors.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return path


# ---------------------------------------------------------------- per family


def build_flux(root: Path) -> list[Path]:
    model_dir, out = root / "flux-tiny", root / "loras" / "flux-tiny"
    out.mkdir(parents=True, exist_ok=True)
    load = lambda: FluxTransformer2DModel.from_pretrained(model_dir / "transformer")
    write_diffusers(out, "diffusers", FluxPipeline, load(), FLUX_TARGETS, seed=1)
    write_diffusers(out, "diffusers_patterns", FluxPipeline, load(), ["to_q", "to_k", "to_v", "proj_mlp", "to_out.0"],
                    seed=2, r=2, alpha=2, rank_pattern={"proj_mlp": 4}, alpha_pattern={"proj_mlp": 6})
    write_peft_folder(out / "peft_folder", load(), FLUX_TARGETS, seed=1)
    shapes = linear_shapes(load())
    bfl = their_modules(FLUX_BFL, shapes)
    kohya_alpha = lambda name, r: None if name.startswith("final_layer") else 4.0  # diffusers drops final_layer alphas
    # diffusers' kohya reader splits single blocks' linear1 by FLUX.1's real sizes, and leaves the layers outside the
    # blocks (img_in, final_layer, ...) out of the transformer: those go in bfl.safetensors only
    no_linear1 = [m for m in bfl if m[0].startswith(("double_blocks", "single_blocks")) and not m[0].endswith("linear1")]
    write_native(out / "kohya.safetensors", no_linear1, seed=3, prefix="lora_unet_", flat=True, alpha=kohya_alpha)
    write_native(out / "comfyui.safetensors", no_linear1, seed=4, prefix="diffusion_model.", alpha=kohya_alpha)
    # the ComfyUI file's matrices again (and linear1's), with BFL's own PEFT-style names (lora_A / lora_B, no prefix)
    write_native(out / "bfl.safetensors", bfl, seed=4, prefix="", down="lora_A.weight", up="lora_B.weight",
                 alpha=kohya_alpha)
    write_native(out / "xlabs.safetensors", their_modules(FLUX_XLABS, shapes, lambda n: "double" in n), seed=5,
                 prefix="", down="down.weight", up="up.weight")
    return [out]


CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
T5_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


def build_flux_text_encoders(root: Path) -> list[Path]:
    """FLUX.1 LoRAs that also adapt the text encoders (assets/loras/flux-tiny-te): `diffusers` (transformer + CLIP,
    written by FluxPipeline.save_lora_weights with both PEFT configs, CLIP at alpha/r = 1.5), `kohya` (sd-scripts'
    `lora_unet_` blocks + `lora_te1_text_model_...` CLIP layers with `.alpha` keys) and `t5` (kohya `lora_te1_` CLIP +
    `lora_te2_` T5 with `.alpha` keys, the T5 matrices those of a PEFT adapter on transformers' T5EncoderModel, which
    diffusers' FLUX loader drops: checked against PEFT, tests/test_lora_text_encoder.py)."""
    from transformers import CLIPTextModel, T5EncoderModel

    model_dir, out = root / "flux-tiny", root / "loras" / "flux-tiny-te"
    out.mkdir(parents=True, exist_ok=True)
    transformer = FluxTransformer2DModel.from_pretrained(model_dir / "transformer")
    layers, cfg = peft_adapter(transformer, ["to_q", "to_k", "to_v", "proj_mlp", "ff.net.0.proj"], seed=31)
    clip = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    te_layers, te_cfg = peft_adapter(clip, CLIP_TARGETS, seed=32, alpha=6)
    meta = lambda c: {k: (list(v) if isinstance(v, set) else v) for k, v in c.to_dict().items()}
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=layers, text_encoder_lora_layers=te_layers,
                                   transformer_lora_adapter_metadata=meta(cfg),
                                   text_encoder_lora_adapter_metadata=meta(te_cfg),
                                   weight_name="diffusers.safetensors")
    shapes = linear_shapes(FluxTransformer2DModel.from_pretrained(model_dir / "transformer"))
    blocks = [m for m in their_modules(FLUX_BFL, shapes) if m[0].startswith(("double_blocks", "single_blocks"))
              and not m[0].endswith("linear1")]
    clip_shapes = linear_shapes(CLIPTextModel.from_pretrained(model_dir / "text_encoder"))
    clip_modules = [(f"text_model.{n}", d_in, d_out) for n, (d_in, d_out) in clip_shapes.items()]
    unet = out / "unet.tmp.safetensors"
    write_native(unet, blocks, seed=33, prefix="lora_unet_", flat=True, alpha=lambda n, r: 4.0)
    te1 = out / "te1.tmp.safetensors"
    write_native(te1, clip_modules, seed=34, prefix="lora_te1_", flat=True, alpha=lambda n, r: 2.0)
    from safetensors.torch import load_file

    save_file({**load_file(unet), **load_file(te1)}, out / "kohya.safetensors")
    t5 = T5EncoderModel.from_pretrained(model_dir / "text_encoder_2")
    t5_layers, _ = peft_adapter(t5, T5_TARGETS, seed=35, alpha=8)
    tensors = {}
    for key, value in t5_layers.items():  # encoder.block.0.layer.0.SelfAttention.q.lora_A.weight -> kohya's names
        module, _, kind = key.rpartition(".lora_")
        name = "lora_te2_" + module.replace(".", "_")
        tensors[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(8.0)
    write_native(te1, clip_modules, seed=36, prefix="lora_te1_", flat=True, alpha=lambda n, r: 4.0)
    save_file({**load_file(te1), **tensors}, out / "t5.safetensors")
    unet.unlink()
    te1.unlink()
    return [out]


def block_alpha(alpha: float):
    """Alphas on the blocks' layers only (diffusers' Wan reader refuses alphas on the others)."""
    return lambda name, rank: alpha if name.startswith("blocks.") else None


def build_wan(root: Path) -> list[Path]:
    outs = []
    for model_name in ("wan-t2v-tiny", "wan22-a14b-tiny"):
        model_dir, out = root / model_name, root / "loras" / model_name
        out.mkdir(parents=True, exist_ok=True)
        load = lambda: WanTransformer3DModel.from_pretrained(model_dir / "transformer")
        shapes = linear_shapes(load())
        linears = their_modules(WAN_ORIGINAL, shapes)
        params = dict(load().named_parameters())
        if model_name == "wan-t2v-tiny":
            write_diffusers(out, "diffusers", WanPipeline, load(), WAN_TARGETS, seed=11, alpha=4)
            write_native(out / "lightx2v.safetensors", linears, seed=12, prefix="diffusion_model.",
                         alpha=block_alpha(8.0), extra=_wan_deltas(linears, params, 12, zero_norms=True))
            write_native(out / "comfyui.safetensors", linears, seed=13, prefix="diffusion_model.", down="lora_A.weight",
                         up="lora_B.weight")
            blocks = [m for m in linears if m[0].startswith("blocks.")]
            write_native(out / "musubi.safetensors", blocks, seed=14, prefix="lora_unet_", flat=True,
                         alpha=lambda n, r: 2.0)
            # lightx2v's full deltas too: norm scales, modulation tables (diff_m), a full weight delta (diff)
            write_native(out / "lightx2v_full.safetensors", linears, seed=15, prefix="diffusion_model.",
                         alpha=block_alpha(4.0), extra=_wan_deltas(linears, params, 15, zero_norms=False, full=True))
        else:  # Wan2.2 A14B: a high-noise / low-noise pair, as lightx2v publishes them
            for name, seed in (("high_noise", 16), ("low_noise", 17)):
                write_native(out / f"{name}.safetensors", linears, seed=seed, prefix="diffusion_model.",
                             alpha=block_alpha(4.0), extra=_wan_deltas(linears, params, seed, zero_norms=True))
        outs.append(out)
    return outs


def _wan_deltas(linears, params: dict, seed: int, zero_norms: bool, full: bool = False) -> dict:
    """lightx2v's extra keys: diff_b of each linear's bias, diff of the norm scales (zeros in their releases),
    and with `full` diff_m of the modulation tables and a diff of one whole weight."""
    from gen.lora.formats import WAN_ORIGINAL as naming

    g = torch.Generator().manual_seed(seed + 1000)
    extra = {}
    for name, _, d_out in linears:
        extra[f"diffusion_model.{name}.diff_b"] = _randn((d_out,), g, 0.05)
    for template in ("blocks.{i}.self_attn.norm_q", "blocks.{i}.self_attn.norm_k", "blocks.{i}.cross_attn.norm_q",
                     "blocks.{i}.cross_attn.norm_k", "blocks.{i}.norm3"):
        for i in range(64):
            ours = naming.module(template.format(i=i), False).ours[0] + ".weight"
            if ours not in params:
                break
            shape = params[ours].shape
            extra[f"diffusion_model.{template.format(i=i)}.diff"] = torch.zeros(shape) if zero_norms \
                else _randn(shape, g, 0.05)
    if full:
        for i in range(64):
            if f"blocks.{i}.scale_shift_table" not in params:
                break
            extra[f"diffusion_model.blocks.{i}.diff_m"] = _randn(params[f"blocks.{i}.scale_shift_table"].shape, g, 0.05)
        extra["diffusion_model.head.diff_m"] = _randn(params["scale_shift_table"].shape, g, 0.05)
        extra["diffusion_model.patch_embedding.diff"] = _randn(params["patch_embedding.weight"].shape, g, 0.01)
    return extra


def build_qwen(root: Path) -> list[Path]:
    model_dir, out = root / "qwen-image-tiny", root / "loras" / "qwen-image-tiny"
    out.mkdir(parents=True, exist_ok=True)
    load = lambda: QwenImageTransformer2DModel.from_pretrained(model_dir / "transformer")
    write_diffusers(out, "diffusers", QwenImagePipeline, load(), QWEN_TARGETS, seed=21, alpha=4)
    from gen.lora.formats import QWEN_OURS

    ours = their_modules(QWEN_OURS, linear_shapes(load()))
    write_native(out / "lightning.safetensors", ours, seed=22, prefix="", alpha=lambda n, r: 8.0)  # Lightning's keys
    write_native(out / "comfyui.safetensors", ours, seed=23, prefix="diffusion_model.", down="lora_A.weight",
                 up="lora_B.weight")
    write_native(out / "kohya.safetensors", ours, seed=24, prefix="lora_unet_", flat=True, alpha=lambda n, r: 2.0)
    return [out]


def all_linears(model) -> list[str]:
    """Every linear layer's full path: PEFT targets that match exactly one module each."""
    return sorted(linear_shapes(model))


def build_flux2(root: Path) -> list[Path]:
    model_dir, out = root / "flux2-tiny", root / "loras" / "flux2-tiny"
    out.mkdir(parents=True, exist_ok=True)
    load = lambda: Flux2Transformer2DModel.from_pretrained(model_dir / "transformer")
    write_diffusers(out, "diffusers", Flux2Pipeline, load(), all_linears(load()), seed=31, alpha=8)
    shapes = linear_shapes(load())
    every = their_modules(Naming("BFL", _BFL2), shapes)
    bfl = [m for m in every if m[0] != "final_layer.adaLN_modulation.1"]  # diffusers' reader does not swap its halves
    # ComfyUI / ai-toolkit: lora_A / lora_B under diffusion_model., no alphas (diffusers' reader takes neither
    # lora_down nor alphas there)
    write_native(out / "comfyui.safetensors", bfl, seed=32, prefix="diffusion_model.", down="lora_A.weight",
                 up="lora_B.weight")
    # kohya: diffusers' reader converts the blocks' layers and img_in / txt_in / time_in / final_layer.linear
    kohya = [m for m in bfl if m[0].startswith(("double_blocks", "single_blocks", "img_in", "txt_in", "time_in",
                                                 "final_layer.linear"))]
    write_native(out / "kohya.safetensors", kohya, seed=33, prefix="lora_unet_", flat=True, alpha=lambda n, r: 2.0)
    # every BFL module, the final modulation included (its halves swapped into ours): checked against a hand merge
    write_native(out / "bfl_all.safetensors", every, seed=34, prefix="diffusion_model.", alpha=lambda n, r: 8.0)
    return [out]


def build_z_image(root: Path) -> list[Path]:
    model_dir, out = root / "z-image-tiny", root / "loras" / "z-image-tiny"
    out.mkdir(parents=True, exist_ok=True)
    load = lambda: ZImageTransformer2DModel.from_pretrained(model_dir / "transformer")
    write_diffusers(out, "diffusers", ZImagePipeline, load(), all_linears(load()), seed=41, alpha=8)
    shapes = linear_shapes(load())
    ours = their_modules(Naming("diffusers", _ZIMAGE_OURS), shapes)
    # ComfyUI: diffusion_model. + lora_down / lora_up + alpha, the output projections under their original name
    # (`attention.out`); q / k / v separate (diffusers reads the fused `attention.qkv` only in another layout)
    original = [(n.replace("attention.to_out.0", "attention.out"), i, o) for n, i, o in ours]
    write_native(out / "comfyui.safetensors", original, seed=42, prefix="diffusion_model.", alpha=lambda n, r: 8.0)
    write_native(out / "kohya.safetensors", ours, seed=43, prefix="lora_unet_", flat=True, alpha=lambda n, r: 2.0)
    # the original fused q/k/v: checked against a hand merge
    fused = their_modules(ZIMAGE_ORIGINAL, shapes, lambda n: n.endswith("attention.qkv"))
    write_native(out / "qkv.safetensors", fused, seed=44, prefix="diffusion_model.", alpha=lambda n, r: 8.0)
    return [out]


def build_qwen21(root: Path) -> list[Path]:
    model_dir, out = root / "qwen-image21-tiny", root / "loras" / "qwen-image21-tiny"
    out.mkdir(parents=True, exist_ok=True)
    load = lambda: QwenImage21Transformer2DModel.from_pretrained(model_dir / "transformer")
    write_diffusers(out, "diffusers", QwenImage21Pipeline, load(), all_linears(load()), seed=51, alpha=8)
    ours = their_modules(QWEN21_OURS, linear_shapes(load()))
    write_native(out / "comfyui.safetensors", ours, seed=52, prefix="diffusion_model.", down="lora_A.weight",
                 up="lora_B.weight")
    # kohya: diffusers' reader re-dots the blocks' attention and img_mlp.proj / .out only (gate_layer, txt_in.*,
    # modulation.1 come out misnamed there)
    kohya = [m for m in ours if m[0].startswith("transformer_blocks") and "gate_layer" not in m[0]]
    write_native(out / "kohya.safetensors", kohya, seed=53, prefix="lora_unet_", flat=True, alpha=lambda n, r: 2.0)
    return [out]


def build(root: Path) -> list[Path]:
    return build_flux(root) + build_flux_text_encoders(root) + build_wan(root) + build_qwen(root) + build_flux2(root) + build_z_image(root) \
        + build_qwen21(root)


if __name__ == "__main__":
    import sys

    for p in build(Path(__file__).resolve().parents[1]):
        print(p, sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6, "MB", file=sys.stderr)
