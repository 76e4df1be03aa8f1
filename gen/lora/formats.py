"""LoRA file layouts: one declared key map per format and model family, recognised from the keys.

Not the application (gen/transforms/lora.py) nor the file reading and caching (gen/lora/files.py). A LoRA file is a
flat dict `<prefix><module><suffix> -> tensor`. The suffix says what a tensor is (the same in every format):

| suffix                                    | kind    | meaning                                                   |
|-------------------------------------------|---------|-----------------------------------------------------------|
| `.lora_A.weight`, `.lora_down.weight`, `.down.weight` | down | A (rank, in)                                   |
| `.lora_B.weight`, `.lora_up.weight`, `.up.weight`     | up   | B (out, rank); delta W = scale * B @ A          |
| `.alpha`                                  | alpha   | the module's scale is alpha / rank (absent: 1, or the PEFT config's) |
| `.diff`, `.diff_b`, `.diff_m`             | delta   | a full delta of the module's weight, bias, modulation     |
| `.lora_B.bias`                            | delta   | PEFT's lora_bias: a delta of the bias                     |

PEFT's adapter-name infix (`.lora_A.default.weight`) is dropped. The prefix and the module names depend on the
format and the family: each `Format` pairs the prefixes it writes with a `Naming`, a table from its module names
(`{i}` a block index) to ours (= diffusers' = our checkpoints' parameter names). kohya / sd-scripts names are the
same tables flattened with underscores. A fused module of theirs (BFL's qkv, linear1) maps to several of ours: its
up rows and deltas are split in declared ratios (its down is shared), and BFL's final modulation comes as
(shift, scale), swapped into our (scale, shift).

| family      | diffusers / PEFT          | original names (ComfyUI, lightx2v, Lightning, BFL)      | kohya / musubi          | other       |
|-------------|---------------------------|---------------------------------------------------------|-------------------------|-------------|
| FLUX.1      | `transformer.` + ours     | BFL names, `diffusion_model.` / `base_model.model.`     | `lora_unet_` + BFL flat, `lora_transformer_` + ours flat | XLabs `processor.qkv_lora1` |
| Wan2.1/2.2  | `transformer.` + ours     | Wan names, `diffusion_model.` (incl. `diff`/`diff_b`/`diff_m`) | `lora_unet_` + Wan flat |       |
| Qwen-Image  | ours, with or without `transformer.` | ours under `diffusion_model.`                | `lora_unet_` + ours flat |            |
| FLUX.2      | `transformer.` + ours     | BFL names (and ours) under `diffusion_model.` or none     | `lora_unet_` + BFL flat |             |
| Z-Image     | `transformer.` + ours     | ours and the original `attention.qkv` / `attention.out`, `diffusion_model.` | `lora_unet_` + those flat | |
| Qwen-Image 2.1 | ours, with or without `transformer.` | ours under `diffusion_model.`             | `lora_unet_` + ours flat |            |

`parse(tensors, family, ...)` finds the format whose prefixes and names explain every key; a file explained by no
format of the family is refused naming the first keys none explains, and one that another family's formats explain
is refused naming that family. DoRA and LyCORIS (LoHa, LoKr) adapters are refused by name.

Text-encoder keys beside (or instead of) the transformer's are read with TEXT_FORMATS into `LoraWeights.encoders`
(slot -> our module -> pair), low-rank pairs only:

| family | text encoder (slot)             | diffusers / PEFT  | kohya / sd-scripts      | ComfyUI                              |
|--------|---------------------------------|-------------------|-------------------------|--------------------------------------|
| FLUX.1 | CLIP-L (`text_encoder`)         | `text_encoder.`   | `lora_te1_`, `lora_te_` | `text_encoders.clip_l.transformer.`  |
| FLUX.1 | T5-XXL (`text_encoder_2`)       | `text_encoder_2.` | `lora_te2_`             | `text_encoders.t5xxl.transformer.`   |

with transformers' module names (CLIP with or without `text_model.`). Text-encoder keys that match no declared
module, and any in a file for a family whose text encoder takes no LoRAs (Wan's UMT5, the LLM-runtime encoders of
Qwen-Image, gen-shapes, FLUX.2, Z-Image, Qwen-Image 2.1: NO_TEXT_LORA), are refused naming the first ones:
dropping them would silently run a different LoRA.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from gen.types import GenError


SHOW = 5  # keys named in an error

FLUX, WAN, QWEN = "FluxTransformer2DModel", "WanTransformer3DModel", "QwenImageTransformer2DModel"
FLUX2, ZIMAGE, QWEN21 = "Flux2Transformer2DModel", "ZImageTransformer2DModel", "QwenImage21Transformer2DModel"
FAMILY_NAMES = {FLUX: "FLUX.1", WAN: "Wan2.1 / Wan2.2", QWEN: "Qwen-Image", FLUX2: "FLUX.2", ZIMAGE: "Z-Image",
                QWEN21: "Qwen-Image 2.1"}

# ---------------------------------------------------------------- suffixes (the same in every format)

_ADAPTER_NAME = re.compile(r"\.lora_([AB])\.[A-Za-z0-9_\-]+\.(weight|bias)$")  # PEFT: .lora_A.<adapter>.weight
SUFFIXES = (  # (ending, kind, parameter a delta changes); longest endings first where one ends another
    (".lora_A.weight", "down", None), (".lora_B.weight", "up", None), (".lora_B.bias", "delta", "bias"),
    (".lora_down.weight", "down", None), (".lora_up.weight", "up", None),
    (".down.weight", "down", None), (".up.weight", "up", None),
    (".alpha", "alpha", None), (".diff", "delta", "weight"), (".diff_b", "delta", "bias"),
    (".diff_m", "delta", "modulation"),
)
UNSUPPORTED = {  # key fragment -> what it is
    "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr",
    "lora_mid": "LyCORIS LoCon (conv)", "oft_": "OFT",
}
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.", "text_encoders.",
                         "lora_te1.", "te1.", "text_model.")


def split_key(key: str) -> tuple[str, str, str | None] | None:
    """(module, kind, changed parameter) of a key, or None when its suffix is none of SUFFIXES."""
    key = _ADAPTER_NAME.sub(r".lora_\1.\2", key)
    for ending, kind, param in SUFFIXES:
        if key.endswith(ending):
            return key[: -len(ending)], kind, param
    return None


# ---------------------------------------------------------------- namings: their module names -> ours


@dataclass(frozen=True)
class Target:
    """Where one of their modules goes: our module(s); several = their fused module split by rows in `ratios`;
    `swap`: their rows come as (shift, scale), ours as (scale, shift)."""

    ours: tuple[str, ...]
    ratios: tuple[int, ...] = ()
    swap: bool = False


@dataclass
class Naming:
    """One naming scheme of one family's modules: their template (`{i}` = block index) -> Target. `params`: their
    names of single parameters (a full `diff` of a norm scale, a modulation table) -> ours."""

    name: str
    modules: dict[str, Target]
    params: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self._dotted = [(_regex(t, "."), target) for t, target in self.modules.items()]
        self._flat = [(_regex(t, "_"), target) for t, target in self.modules.items()]
        self._params = [(_regex(t, "."), ours) for t, ours in self.params.items()]
        self._params_flat = [(_regex(t, "_"), ours) for t, ours in self.params.items()]

    def module(self, name: str, flat: bool) -> Target | None:
        """Our target for their module `name` (flattened with underscores when `flat`), or None."""
        for regex, target in self._flat if flat else self._dotted:
            m = regex.match(name)
            if m:
                return Target(tuple(o.format(i=m.group("i")) if "{i}" in o else o for o in target.ours), target.ratios,
                              target.swap)
        return None

    def param(self, name: str, flat: bool) -> str | None:
        for regex, ours in self._params_flat if flat else self._params:
            m = regex.match(name)
            if m:
                return ours.format(i=m.group("i")) if "{i}" in ours else ours
        return None


def _regex(template: str, sep: str) -> re.Pattern:
    text = re.escape(template.replace(".", sep)).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile("^" + text + "$")


def _identity(templates: list[str], params: list[str] = ()) -> dict:
    return {t: Target((t,)) for t in templates}, {p: p for p in params}


def T(*ours: str, ratios: tuple[int, ...] = (), swap: bool = False) -> Target:
    return Target(ours, ratios, swap)


# FLUX.1: ours (diffusers) and BFL's original names
_FLUX_OURS, _ = _identity([
    "x_embedder", "context_embedder", "proj_out", "norm_out.linear",
    *(f"time_text_embed.{e}.linear_{n}" for e in ("timestep_embedder", "guidance_embedder", "text_embedder")
      for n in (1, 2)),
    *(f"transformer_blocks.{{i}}.{m}" for m in (
        "norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
        "ff_context.net.0.proj", "ff_context.net.2")),
    *(f"single_transformer_blocks.{{i}}.{m}" for m in (
        "norm.linear", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")),
])
_FLUX_NORMS = {f"{b}.{{i}}.{n}.weight" for b, ns in (
    ("transformer_blocks", ("attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k")),
    ("single_transformer_blocks", ("attn.norm_q", "attn.norm_k"))) for n in ns}
_d, _t, _s, _u = "double_blocks.{i}.", "transformer_blocks.{i}.", "single_blocks.{i}.", "single_transformer_blocks.{i}."
_BFL = {
    "img_in": T("x_embedder"), "txt_in": T("context_embedder"),
    "time_in.in_layer": T("time_text_embed.timestep_embedder.linear_1"),
    "time_in.out_layer": T("time_text_embed.timestep_embedder.linear_2"),
    "vector_in.in_layer": T("time_text_embed.text_embedder.linear_1"),
    "vector_in.out_layer": T("time_text_embed.text_embedder.linear_2"),
    "guidance_in.in_layer": T("time_text_embed.guidance_embedder.linear_1"),
    "guidance_in.out_layer": T("time_text_embed.guidance_embedder.linear_2"),
    _d + "img_mod.lin": T(_t + "norm1.linear"), _d + "txt_mod.lin": T(_t + "norm1_context.linear"),
    _d + "img_attn.qkv": T(_t + "attn.to_q", _t + "attn.to_k", _t + "attn.to_v", ratios=(1, 1, 1)),
    _d + "txt_attn.qkv": T(_t + "attn.add_q_proj", _t + "attn.add_k_proj", _t + "attn.add_v_proj", ratios=(1, 1, 1)),
    _d + "img_attn.proj": T(_t + "attn.to_out.0"), _d + "txt_attn.proj": T(_t + "attn.to_add_out"),
    _d + "img_mlp.0": T(_t + "ff.net.0.proj"), _d + "img_mlp.2": T(_t + "ff.net.2"),
    _d + "txt_mlp.0": T(_t + "ff_context.net.0.proj"), _d + "txt_mlp.2": T(_t + "ff_context.net.2"),
    _s + "modulation.lin": T(_u + "norm.linear"),
    _s + "linear1": T(_u + "attn.to_q", _u + "attn.to_k", _u + "attn.to_v", _u + "proj_mlp", ratios=(1, 1, 1, 4)),
    _s + "linear2": T(_u + "proj_out"),
    "final_layer.linear": T("proj_out"),
    "final_layer.adaLN_modulation.1": T("norm_out.linear", swap=True),
}
_BFL_PARAMS = {
    _d + "img_attn.norm.query_norm.scale": _t + "attn.norm_q.weight",
    _d + "img_attn.norm.key_norm.scale": _t + "attn.norm_k.weight",
    _d + "txt_attn.norm.query_norm.scale": _t + "attn.norm_added_q.weight",
    _d + "txt_attn.norm.key_norm.scale": _t + "attn.norm_added_k.weight",
    _s + "norm.query_norm.scale": _u + "attn.norm_q.weight", _s + "norm.key_norm.scale": _u + "attn.norm_k.weight",
}
_XLABS = {  # XLabs' attention-processor LoRAs: q/k/v of each stream and the attention output projections
    _d + "processor.qkv_lora1": T(_t + "attn.to_q", _t + "attn.to_k", _t + "attn.to_v", ratios=(1, 1, 1)),
    _d + "processor.qkv_lora2": T(_t + "attn.add_q_proj", _t + "attn.add_k_proj", _t + "attn.add_v_proj",
                                  ratios=(1, 1, 1)),
    _d + "processor.proj_lora1": T(_t + "attn.to_out.0"), _d + "processor.proj_lora2": T(_t + "attn.to_add_out"),
    _s + "processor.qkv_lora": T(_u + "attn.to_q", _u + "attn.to_k", _u + "attn.to_v", ratios=(1, 1, 1)),
}

# Wan2.1 / 2.2: ours (diffusers) and Wan's original names (Wan-AI, lightx2v, ComfyUI, musubi-tuner)
_WAN_OURS, _ = _identity([
    "condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
    "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1",
    "condition_embedder.text_embedder.linear_2", "condition_embedder.image_embedder.ff.net.0.proj",
    "condition_embedder.image_embedder.ff.net.2", "proj_out",
    *(f"blocks.{{i}}.{m}" for m in (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
        "attn2.to_out.0", "attn2.add_k_proj", "attn2.add_v_proj", "ffn.net.0.proj", "ffn.net.2")),
])
_b = "blocks.{i}."
_WAN = {
    "patch_embedding": T("patch_embedding"),
    "text_embedding.0": T("condition_embedder.text_embedder.linear_1"),
    "text_embedding.2": T("condition_embedder.text_embedder.linear_2"),
    "time_embedding.0": T("condition_embedder.time_embedder.linear_1"),
    "time_embedding.2": T("condition_embedder.time_embedder.linear_2"),
    "time_projection.1": T("condition_embedder.time_proj"),
    "img_emb.proj.0": T("condition_embedder.image_embedder.norm1"),
    "img_emb.proj.1": T("condition_embedder.image_embedder.ff.net.0.proj"),
    "img_emb.proj.3": T("condition_embedder.image_embedder.ff.net.2"),
    "img_emb.proj.4": T("condition_embedder.image_embedder.norm2"),
    **{f"{_b}{theirs}.{p}": T(f"{_b}{ours}.{q}")
       for theirs, ours in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for p, q in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("k_img", "add_k_proj"),
                    ("v_img", "add_v_proj"), ("norm_q", "norm_q"), ("norm_k", "norm_k"),
                    ("norm_k_img", "norm_added_k"))},
    _b + "norm3": T(_b + "norm2"),  # Wan's cross-attention norm is its norm3 (ours: norm2)
    _b + "ffn.0": T(_b + "ffn.net.0.proj"), _b + "ffn.2": T(_b + "ffn.net.2"),
    "head.head": T("proj_out"),
}
_WAN_PARAMS = {_b + "modulation": _b + "scale_shift_table", "head.modulation": "scale_shift_table",
               "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed"}

# Qwen-Image: released with diffusers names, so ours are also the original ones
_QWEN_OURS, _QWEN_PARAMS = _identity([
    "img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    *(f"transformer_blocks.{{i}}.{m}" for m in (
        "img_mod.1", "txt_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
        "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
        "txt_mlp.net.0.proj", "txt_mlp.net.2")),
], ["txt_norm.weight", *(f"transformer_blocks.{{i}}.attn.{n}.weight"
                         for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))])

# FLUX.2 (and Klein): ours (diffusers) and BFL's original names (ComfyUI, ai-toolkit, kohya)
_FLUX2_OURS, _FLUX2_NORMS = _identity([
    "x_embedder", "context_embedder", "proj_out", "norm_out.linear", "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.linear", "single_stream_modulation.linear",
    *(f"time_guidance_embed.{e}.linear_{n}" for e in ("timestep_embedder", "guidance_embedder") for n in (1, 2)),
    *(f"transformer_blocks.{{i}}.{m}" for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
        "ff_context.linear_out")),
    *(f"single_transformer_blocks.{{i}}.attn.{m}" for m in ("to_qkv_mlp_proj", "to_out")),
], [*_FLUX_NORMS])
_BFL2 = {
    "img_in": T("x_embedder"), "txt_in": T("context_embedder"),
    "time_in.in_layer": T("time_guidance_embed.timestep_embedder.linear_1"),
    "time_in.out_layer": T("time_guidance_embed.timestep_embedder.linear_2"),
    "guidance_in.in_layer": T("time_guidance_embed.guidance_embedder.linear_1"),
    "guidance_in.out_layer": T("time_guidance_embed.guidance_embedder.linear_2"),
    "double_stream_modulation_img.lin": T("double_stream_modulation_img.linear"),
    "double_stream_modulation_txt.lin": T("double_stream_modulation_txt.linear"),
    "single_stream_modulation.lin": T("single_stream_modulation.linear"),
    _d + "img_attn.qkv": T(_t + "attn.to_q", _t + "attn.to_k", _t + "attn.to_v", ratios=(1, 1, 1)),
    _d + "txt_attn.qkv": T(_t + "attn.add_q_proj", _t + "attn.add_k_proj", _t + "attn.add_v_proj", ratios=(1, 1, 1)),
    _d + "img_attn.proj": T(_t + "attn.to_out.0"), _d + "txt_attn.proj": T(_t + "attn.to_add_out"),
    _d + "img_mlp.0": T(_t + "ff.linear_in"), _d + "img_mlp.2": T(_t + "ff.linear_out"),
    _d + "txt_mlp.0": T(_t + "ff_context.linear_in"), _d + "txt_mlp.2": T(_t + "ff_context.linear_out"),
    _s + "linear1": T(_u + "attn.to_qkv_mlp_proj"), _s + "linear2": T(_u + "attn.to_out"),
    "final_layer.linear": T("proj_out"),
    "final_layer.adaLN_modulation.1": T("norm_out.linear", swap=True),
}

# Z-Image: released with diffusers names; its original code fuses q/k/v (`attention.qkv`) and names the output
# projection `attention.out`
_ZIMAGE_OURS, _ZIMAGE_NORMS = _identity([
    "all_x_embedder.2-1", "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1", "t_embedder.mlp.0",
    "t_embedder.mlp.2", "cap_embedder.1",
    *(f"{b}.{{i}}.{m}" for b in ("layers", "noise_refiner", "context_refiner") for m in (
        "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
        "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")),
], ["cap_embedder.0.weight", *(f"{b}.{{i}}.{n}.weight" for b in ("layers", "noise_refiner", "context_refiner")
                               for n in ("attention.norm_q", "attention.norm_k", "attention_norm1", "attention_norm2",
                                         "ffn_norm1", "ffn_norm2"))])
_ZIMAGE_ORIGINAL = {**_ZIMAGE_OURS, **{
    f"{b}.{{i}}.attention.{m}": target for b in ("layers", "noise_refiner", "context_refiner") for m, target in (
        ("qkv", T(f"{b}.{{i}}.attention.to_q", f"{b}.{{i}}.attention.to_k", f"{b}.{{i}}.attention.to_v",
                  ratios=(1, 1, 1))),
        ("out", T(f"{b}.{{i}}.attention.to_out.0")))}}

# Qwen-Image 2.1: released with diffusers names
_QWEN21_OURS, _QWEN21_PARAMS = _identity([
    "img_in", "txt_in.in_layer", "txt_in.out_layer", "modulation.1", "proj_out", "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    *(f"transformer_blocks.{{i}}.{m}" for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out")),
], ["txt_in.text_norm.weight", *(f"transformer_blocks.{{i}}.attn.{n}.weight" for n in ("norm_q", "norm_k"))])

FLUX_OURS = Naming("diffusers", _FLUX_OURS, {p: p for p in _FLUX_NORMS})
FLUX_BFL = Naming("BFL", _BFL, _BFL_PARAMS)
FLUX_XLABS = Naming("XLabs", _XLABS)
WAN_OURS = Naming("diffusers", _WAN_OURS)
WAN_ORIGINAL = Naming("Wan", _WAN, _WAN_PARAMS)
QWEN_OURS = Naming("diffusers", _QWEN_OURS, _QWEN_PARAMS)
FLUX2_OURS = Naming("diffusers", _FLUX2_OURS, _FLUX2_NORMS)
FLUX2_BFL = Naming("BFL", {**_BFL2, **_FLUX2_OURS}, {**_BFL_PARAMS, **_FLUX2_NORMS})  # ai-toolkit mixes both
ZIMAGE_OURS = Naming("diffusers", _ZIMAGE_OURS, _ZIMAGE_NORMS)
ZIMAGE_ORIGINAL = Naming("Z-Image", _ZIMAGE_ORIGINAL, _ZIMAGE_NORMS)
QWEN21_OURS = Naming("diffusers", _QWEN21_OURS, _QWEN21_PARAMS)


@dataclass(frozen=True)
class Format:
    """A LoRA layout of one family: the key prefixes it writes (one per file) and its module naming."""

    name: str
    prefixes: tuple[str, ...]
    naming: Naming
    flat: bool = False  # module names flattened with underscores (kohya / sd-scripts)
    slot: str = "transformer"  # the component it adapts (a text encoder's slot for TEXT_FORMATS)


PEFT_PREFIXES = ("transformer.", "base_model.model.", "")
COMFY_PREFIXES = ("diffusion_model.", "model.diffusion_model.")
FORMATS: dict[str, tuple[Format, ...]] = {
    FLUX: (
        Format("diffusers / PEFT", PEFT_PREFIXES, FLUX_OURS),
        Format("kohya (diffusers names)", ("lora_transformer_",), FLUX_OURS, flat=True),
        Format("kohya / sd-scripts", ("lora_unet_",), FLUX_BFL, flat=True),
        Format("BFL / ComfyUI", COMFY_PREFIXES + ("base_model.model.", ""), FLUX_BFL),
        Format("XLabs", ("diffusion_model.", ""), FLUX_XLABS),
    ),
    WAN: (
        Format("diffusers / PEFT", PEFT_PREFIXES, WAN_OURS),
        Format("Wan official / lightx2v / ComfyUI", COMFY_PREFIXES + ("",), WAN_ORIGINAL),
        Format("musubi-tuner / kohya", ("lora_unet_",), WAN_ORIGINAL, flat=True),
    ),
    QWEN: (
        Format("diffusers / PEFT / Qwen-Image-Lightning", PEFT_PREFIXES, QWEN_OURS),
        Format("ComfyUI", COMFY_PREFIXES, QWEN_OURS),
        Format("kohya / sd-scripts", ("lora_unet_",), QWEN_OURS, flat=True),
    ),
    FLUX2: (
        Format("diffusers / PEFT", PEFT_PREFIXES, FLUX2_OURS),
        Format("BFL / ComfyUI / ai-toolkit", COMFY_PREFIXES + ("",), FLUX2_BFL),
        Format("kohya / sd-scripts", ("lora_unet_",), FLUX2_BFL, flat=True),
    ),
    ZIMAGE: (
        Format("diffusers / PEFT", PEFT_PREFIXES, ZIMAGE_OURS),
        Format("ComfyUI / Z-Image", COMFY_PREFIXES + ("",), ZIMAGE_ORIGINAL),
        Format("kohya / sd-scripts", ("lora_unet_",), ZIMAGE_ORIGINAL, flat=True),
    ),
    QWEN21: (
        Format("diffusers / PEFT", PEFT_PREFIXES, QWEN21_OURS),
        Format("ComfyUI", COMFY_PREFIXES, QWEN21_OURS),
        Format("kohya / sd-scripts", ("lora_unet_",), QWEN21_OURS, flat=True),
    ),
}


# ---------------------------------------------------------------- text encoders

# transformers' CLIPTextModel (flattened in transformers 5: no `text_model.` level; older files and kohya's keep it)
# and T5EncoderModel (kohya, ComfyUI and PEFT all use its own names). Ours = the loaded model's module paths.
_CLIP_LAYERS = [f"encoder.layers.{{i}}.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                      "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]
CLIP_TEXT = Naming("CLIP", {**{t: T(t) for t in _CLIP_LAYERS}, **{f"text_model.{t}": T(t) for t in _CLIP_LAYERS}})
T5_TEXT = Naming("T5", {f"encoder.block.{{i}}.{m}": T(f"encoder.block.{{i}}.{m}") for m in (
    "layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v", "layer.0.SelfAttention.o",
    "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1", "layer.1.DenseReluDense.wi",
    "layer.1.DenseReluDense.wo")})


@dataclass(frozen=True)
class TextEncoder:
    """A text encoder LoRAs may adapt: its component slot, model class and repeated block list (one bank capacity
    per layer of the list, gen/transforms/lora.py)."""

    slot: str
    model_class: str
    blocks: str


# The text encoders each family's LoRAs may carry, with the key forms of each: FLUX.1's CLIP-L (diffusers' own
# FluxPipeline.load_lora_weights reads it: `text_encoder.` as save_lora_weights writes it, kohya's `lora_te1_` /
# `lora_te_`, ComfyUI's `text_encoders.clip_l.transformer.`) and its T5-XXL (kohya sd-scripts' `lora_te2_` with
# --network_train_t5, ComfyUI's `text_encoders.t5xxl.transformer.`, `text_encoder_2.` as diffusers names a second
# text encoder; diffusers' FLUX loader drops T5 keys, so those are checked against PEFT on transformers' T5).
TEXT_ENCODERS: dict[str, tuple[TextEncoder, ...]] = {
    FLUX: (TextEncoder("text_encoder", "CLIPTextModel", "encoder.layers"),
           TextEncoder("text_encoder_2", "T5EncoderModel", "encoder.block")),
}
TEXT_FORMATS: dict[str, tuple[Format, ...]] = {
    FLUX: (
        Format("diffusers / PEFT (CLIP)", ("text_encoder.",), CLIP_TEXT, slot="text_encoder"),
        Format("kohya / sd-scripts (CLIP)", ("lora_te1_", "lora_te_"), CLIP_TEXT, flat=True, slot="text_encoder"),
        Format("ComfyUI (CLIP)", ("text_encoders.clip_l.transformer.",), CLIP_TEXT, slot="text_encoder"),
        Format("diffusers / PEFT (T5)", ("text_encoder_2.",), T5_TEXT, slot="text_encoder_2"),
        Format("kohya / sd-scripts (T5)", ("lora_te2_",), T5_TEXT, flat=True, slot="text_encoder_2"),
        Format("ComfyUI (T5)", ("text_encoders.t5xxl.transformer.",), T5_TEXT, slot="text_encoder_2"),
    ),
}
NO_TEXT_LORA = {  # why a family's LoRAs cannot carry text-encoder keys
    WAN: "its UMT5 text encoder takes no LoRAs (diffusers' Wan pipelines load none either)",
    QWEN: "its text encoder (Qwen2.5-VL; gen-shapes: SmolLM2) runs on gen's LLM runtime, which takes no LoRAs",
    FLUX2: "its text encoder (Mistral 3 / Qwen3) runs on gen's LLM runtime, which takes no LoRAs",
    ZIMAGE: "its text encoder (Qwen3) runs on gen's LLM runtime, which takes no LoRAs",
    QWEN21: "its text encoder (Qwen3-VL) runs on gen's LLM runtime, which takes no LoRAs",
}


# ---------------------------------------------------------------- parsing


@dataclass
class Pair:
    """One low-rank update of one of our modules: delta W = up @ down, alpha / rank already folded into `down`."""

    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out, rank)


@dataclass
class LoraWeights:
    """A LoRA file read for one family: low-rank pairs by our module path, full deltas by our parameter path."""

    source: str  # the file
    format: str
    family: str  # the DiT checkpoint class
    pairs: dict[str, Pair]
    deltas: dict[str, torch.Tensor]
    encoders: dict[str, dict[str, Pair]] = field(default_factory=dict)  # text-encoder slot -> its module -> pair

    def all_pairs(self) -> list[Pair]:
        return [*self.pairs.values(), *(p for pairs in self.encoders.values() for p in pairs.values())]

    @property
    def nbytes(self) -> int:
        tensors = [t for p in self.all_pairs() for t in (p.down, p.up)] + list(self.deltas.values())
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    @property
    def rank(self) -> int:
        return max((p.down.shape[0] for p in self.all_pairs()), default=0)

    def to(self, device: torch.device, dtype: torch.dtype) -> "LoraWeights":
        cast = {}  # a down shared by split targets stays shared

        def c(t):
            return cast.setdefault(id(t), t.to(device, dtype))

        return LoraWeights(self.source, self.format, self.family, {k: Pair(c(p.down), c(p.up)) for k, p in self.pairs.items()},
                           {k: c(v) for k, v in self.deltas.items()},
                           {slot: {k: Pair(c(p.down), c(p.up)) for k, p in pairs.items()}
                            for slot, pairs in self.encoders.items()})


@dataclass
class _Entry:
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # their parameter name -> delta
    keys: list[str] = field(default_factory=list)


def _explain(keys: list[str], fmt: Format) -> tuple[str | None, list[str]]:
    """(the prefix this format reads the file with, keys it does not explain) — the best prefix of the format's."""
    best = (None, keys)
    for prefix in fmt.prefixes:
        missed = []
        for key in keys:
            parts = split_key(key) if key.startswith(prefix) else None
            if parts is None:
                missed.append(key)
                continue
            module, kind, param = parts
            module = module[len(prefix):]
            if fmt.naming.module(module, fmt.flat) is None and not (
                    kind == "delta" and fmt.naming.param(f"{module}{'_' if fmt.flat else '.'}{param}", fmt.flat)):
                missed.append(key)
        if len(missed) < len(best[1]):
            best = (prefix, missed)
        if not missed:
            break
    return best


def detect(keys: list[str], family: str) -> tuple[Format, str] | None:
    """(format, prefix) of `family` that explains every key, or None."""
    for fmt in FORMATS.get(family, ()):
        prefix, missed = _explain(keys, fmt)
        if not missed:
            return fmt, prefix
    return None


def _names(keys) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - SHOW} more" if len(keys) > SHOW else ""
    return ", ".join(keys[:SHOW]) + more


def _refuse(keys: list[str], family: str, source: str) -> GenError:
    for what_key, what in UNSUPPORTED.items():
        bad = [k for k in keys if what_key in k]
        if bad:
            return GenError(f"LoRA {source}: {what} adapters are not supported (keys {_names(bad)})", param="loras")
    for other in FORMATS:
        if other != family and detect(keys, other) is not None:
            fmt, _ = detect(keys, other)
            return GenError(f"LoRA {source} is a {FAMILY_NAMES[other]} LoRA ({fmt.name} format); this model is "
                            f"{FAMILY_NAMES[family]}", param="loras")
    best = min(((fmt, *_explain(keys, fmt)) for fmt in FORMATS[family]), key=lambda x: len(x[2]))
    fmt, _, missed = best
    return GenError(f"LoRA {source}: its keys match no {FAMILY_NAMES[family]} LoRA format we know (closest: {fmt.name}, "
                    f"which does not explain {len(missed)} of {len(keys)} keys: {_names(sorted(missed))})",
                    param="loras")


def parse(tensors: dict[str, torch.Tensor], family: str, source: str, peft_alpha=None) -> LoraWeights:
    """Read a LoRA file's tensors as `family`'s pairs and deltas (fp32), or raise a GenError naming the file.

    `peft_alpha`: the PEFT config's alpha where the file has no `.alpha` keys (diffusers' metadata,
    adapter_config.json), `alpha(module, rank) -> alpha | None` for one of our modules: one function (the
    transformer's) or a dict of them by component slot (`transformer`, `text_encoder`, ...)."""
    if family not in FORMATS:
        raise GenError(f"LoRAs are not supported for {family} models yet (supported: "
                       f"{', '.join(FAMILY_NAMES.values())})", param="loras")
    alphas = peft_alpha if isinstance(peft_alpha, dict) else {"transformer": peft_alpha}
    if not tensors:
        raise GenError(f"LoRA {source} has no tensors", param="loras")
    text, keys = _text_keys(list(tensors), family, source)
    pairs, deltas, names = {}, {}, []
    if keys:
        found = detect(keys, family)
        if found is None:
            raise _refuse(keys, family, source)
        fmt, prefix = found
        pairs, deltas = _read(tensors, keys, fmt, prefix, source, alphas.get("transformer"))
        names.append(fmt.name)
    encoders: dict[str, dict[str, Pair]] = {}
    for prefix, (fmt, group) in text.items():
        got, full = _read(tensors, group, fmt, prefix, source, alphas.get(fmt.slot))
        if full:
            raise GenError(f"LoRA {source}: full deltas of {fmt.slot} parameters are not supported (keys "
                           f"{_names(k for k in group if split_key(k)[1] == 'delta')})", param="loras")
        encoders.setdefault(fmt.slot, {}).update(got)
        names.append(fmt.name)
    for t in list(tensors.values()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = next(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
            raise GenError(f"LoRA {source}: tensor {bad} holds NaN or infinite values", param="loras")
    return LoraWeights(source, " + ".join(dict.fromkeys(names)), family, pairs, deltas, encoders)


def _text_keys(keys: list[str], family: str, source: str) -> tuple[dict[str, tuple[Format, list[str]]], list[str]]:
    """The text-encoder keys by prefix of TEXT_FORMATS (with its format), and the other keys (the transformer's).
    Text-encoder keys of a family that takes none, or of no declared form, are refused by name: leaving them out
    would run another LoRA than the one trained."""
    prefixes = sorted(((prefix, fmt) for fmt in TEXT_FORMATS.get(family, ()) for prefix in fmt.prefixes),
                      key=lambda x: -len(x[0]))
    text: dict[str, tuple[Format, list[str]]] = {}
    rest, unknown = [], []
    for key in keys:
        hit = next(((p, f) for p, f in prefixes if key.startswith(p)), None)
        if hit is not None:
            text.setdefault(hit[0], (hit[1], []))[1].append(key)
        elif key.startswith(TEXT_ENCODER_PREFIXES):
            unknown.append(key)
        else:
            rest.append(key)
    if (text or unknown) and family not in TEXT_FORMATS:
        bad = [k for _, g in text.values() for k in g] + unknown
        raise GenError(f"LoRA {source} has {len(bad)} text-encoder keys ({_names(bad)}): text-encoder LoRAs are not "
                       f"supported for {FAMILY_NAMES[family]}: {NO_TEXT_LORA[family]}; use a file with the "
                       "transformer's keys only", param="loras")
    for prefix, (fmt, group) in text.items():
        _, missed = _explain(group, Format(fmt.name, (prefix,), fmt.naming, fmt.flat, fmt.slot))
        unknown += missed
    if unknown:
        known = ", ".join(sorted({p for p, _ in prefixes}))
        raise GenError(f"LoRA {source}: {len(unknown)} text-encoder keys match no {FAMILY_NAMES[family]} text-encoder "
                       f"module we know ({_names(sorted(unknown))}; we read {known} + CLIP / T5 module names)",
                       param="loras")
    return text, rest


def _read(tensors: dict, keys: list[str], fmt: Format, prefix: str, source: str, peft_alpha):
    """(pairs by our module, deltas by our parameter) of `keys`, all explained by `fmt` read with `prefix`."""
    entries: dict[str, _Entry] = {}
    for key in keys:
        module, kind, param = split_key(key)
        module = module[len(prefix):]
        e = entries.setdefault(module, _Entry())
        e.keys.append(key)
        value = tensors[key]
        if kind == "alpha":
            e.alpha = float(value.float().reshape(-1)[0])
        elif kind == "down":
            e.down = value.float()
        elif kind == "up":
            e.up = value.float()
        else:
            e.deltas[param] = value.float()
    pairs, deltas = {}, {}
    sep = "_" if fmt.flat else "."
    for module, e in entries.items():
        target = fmt.naming.module(module, fmt.flat)
        if (e.down is None) != (e.up is None):
            raise GenError(f"LoRA {source}: {module} has a {'down' if e.up is None else 'up'} matrix but no "
                           f"{'up' if e.up is None else 'down'} one (keys {_names(e.keys)})", param="loras")
        if e.alpha is not None and e.down is None:
            raise GenError(f"LoRA {source}: {module} has an alpha but no matrices (keys {_names(e.keys)})",
                           param="loras")
        if e.down is not None:
            if e.down.ndim != 2 or e.up.ndim != 2 or e.up.shape[1] != e.down.shape[0]:
                raise GenError(f"LoRA {source}: {module} has down {tuple(e.down.shape)} and up {tuple(e.up.shape)}, "
                               "not (rank, in) and (out, rank) (conv LoRAs are not supported)", param="loras")
            rank = e.down.shape[0]
            alpha = e.alpha if e.alpha is not None else None
            if alpha is None and peft_alpha is not None and target is not None:
                alpha = peft_alpha(target.ours[0], rank)
            down = e.down * (alpha / rank) if alpha is not None else e.down
            for ours, up in zip(target.ours, _rows(e.up, target, module, source)):
                pairs[ours] = Pair(down, up)
        for param, delta in e.deltas.items():
            if target is not None and param in ("weight", "bias"):
                names = [f"{o}.{param}" for o in target.ours]
                values = _rows(delta, target, module, source)
            else:
                name = fmt.naming.param(f"{module}{sep}{param}", fmt.flat)
                if name is None:
                    raise GenError(f"LoRA {source}: no parameter of ours for {module}{sep}{param} "
                                   f"(keys {_names(e.keys)})", param="loras")
                names, values = [name], [delta]
            for name, value in zip(names, values):
                deltas[name] = value
    return pairs, deltas


def _rows(t: torch.Tensor, target: Target, module: str, source: str) -> list[torch.Tensor]:
    """Their up matrix / delta split into our targets' rows (and (shift, scale) halves swapped)."""
    if target.swap:
        if t.shape[0] % 2:
            raise GenError(f"LoRA {source}: {module} has {t.shape[0]} rows, expected (shift, scale) halves",
                           param="loras")
        shift, scale = t.chunk(2, dim=0)
        t = torch.cat([scale, shift])
    if len(target.ours) == 1:
        return [t]
    total = sum(target.ratios)
    if t.shape[0] % total:
        raise GenError(f"LoRA {source}: {module} has {t.shape[0]} rows, not divisible into {target.ours} in the "
                       f"ratios {target.ratios}", param="loras")
    unit = t.shape[0] // total
    return list(t.split([r * unit for r in target.ratios], dim=0))


def peft_alphas(config: dict) -> "callable":
    """The alpha of each module under a PEFT LoraConfig dict (`lora_alpha`, `r`, `alpha_pattern`, `use_rslora`):
    PEFT scales by alpha / r, or alpha / sqrt(r) with rsLoRA (returned as the alpha that gives that over r)."""
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    def alpha_of(module: str, rank: int) -> float | None:
        a = alpha
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                a = value
                break
        if a is None:
            return None
        return a * math.sqrt(rank) if rslora else float(a)

    return alpha_of
