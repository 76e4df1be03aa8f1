"""Qwen-Image text-to-image, image edit and multi-image edit (Edit-Plus): Qwen2.5-VL prompt embedding, packed 2x2
latents, norm-preserving true CFG, the Qwen-Image VAE.

Not the transformer (gen/models/qwen_image.py) nor the Qwen2.5-VL encoder itself (any object with `encode`).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time

import numpy as np
import torch
from PIL import Image

from gen.distributed.plans import ShardPlan, each, first
from gen.models.prompt_reader import COUNT
from gen.models.qwen_image import QwenImageConfig, QwenImageTransformer
from gen.transforms.step_cache import CacheLayout
from gen.types import GenError, GenerationRequest, GenerationResult
from pipelines.base import Pipeline, Timings
from pipelines.family import DiT, Family
from stages.decode import decode_image, to_pil
from stages.denoise import denoise
from stages.enhance_prompt import PromptGuide
from stages.latents import draw_noise, latent_stats, pack_2x2, unpack_2x2
from stages.timesteps import linear_sigmas, scheduler_shift, set_timesteps
from stages.validate import FamilyDefaults

QWEN_IMAGE_DIT = DiT(
    checkpoint_class="QwenImageTransformer2DModel", model=QwenImageTransformer, config=QwenImageConfig,
    blocks=("transformer_blocks",),
    # shard the embedded image tokens, the image half of RoPE and the per-token modulation index
    shard_plan=ShardPlan(
        split_outputs={"img_in": 1},
        split_methods={"rope": first(each(0))},
        split_args={"transformer_blocks.*": {"mod_index": 1}},
        gather="proj_out",
        text_prefix="encoder_hidden_states",
    ),
    cache_layout=CacheLayout(streams=(2,)),
    batch_args=("hidden_states", "encoder_hidden_states", "timestep", "additional_t_cond"),
    batch_pad=(("encoder_hidden_states", "encoder_hidden_states_mask"),),
    padded_text_leads_keys=True,  # every block's joint attention: keys [text, image tokens]
    # with zero_cond_t the text modulation reads half the embedding: not prepared
    modulations=lambda m: [] if m.config.zero_cond_t else [n for b in m.transformer_blocks
                                                            for n in (b.img_mod, b.txt_mod)],
    call_timestep=lambda t, batch, dtype: t.expand(batch).to(dtype) / 1000,
)
T2I_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                "<|im_start|>assistant\n")
EDIT_SYSTEM = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
               "background), then explain how the user's text instruction should alter or modify the image. Generate a "
               "new image that meets the user's requirements while maintaining consistency with the original input "
               "where appropriate.<|im_end|>\n<|im_start|>user\n")
EDIT_TEMPLATE = EDIT_SYSTEM + "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
PLUS_TEMPLATE = EDIT_SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"
PLUS_IMAGE_SLOT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
T2I_DROP, EDIT_DROP = 34, 64  # template tokens before the user's text (Qwen2 tokenizer), dropped from the embedding
MAX_TEXT_TOKENS = 1024  # tokenizer limit after the template prefix
T2I_MAX_EMBED = 512  # text-to-image keeps at most this many embedding tokens
VAE_AREA, CONDITION_AREA = 1024 * 1024, 384 * 384  # pixel areas of the reference latents / Edit-Plus VL images
QWEN_DEFAULTS = FamilyDefaults(num_inference_steps=50, guidance_scale=1.0, height=1024, width=1024, true_cfg_scale=4.0)
# small Qwen-Image-architecture models on one LLM hidden layer (gen-shapes: training/shapes/configs.py matches these)
LLM_DEFAULTS = FamilyDefaults(num_inference_steps=20, guidance_scale=1.0, height=128, width=128, true_cfg_scale=4.0)


def vl_inputs(tokenizer, processor, texts: list[str], images, max_length: int | None):
    """Token ids and mask (plus pixel_values / image_grid_thw with images), as the reference pipelines build them."""
    if images:
        if processor is None:
            raise GenError("this checkpoint has no `processor` component, so it cannot encode images",
                           param="model_path")
        return processor(text=texts, images=images, padding=True, return_tensors="pt")
    return tokenizer(texts, max_length=max_length, padding=True, truncation=max_length is not None,
                     return_tensors="pt")


class TransformersQwenVL:
    """Qwen2.5-VL through transformers: `encode(texts, images)` -> last hidden states (B, T, D), mask (B, T).

    The pipelines only call `encode`; the in-process LLM runtime can stand in for this class.
    """

    def __init__(self, model, tokenizer, processor=None):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor

    @torch.no_grad()
    def encode(self, texts: list[str], images: list[Image.Image] | None = None,
               max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = vl_inputs(self.tokenizer, self.processor, texts, images, max_length)
        device = self.model.device
        inputs = {k: inputs[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
                  if k in inputs}
        out = self.model(**inputs, output_hidden_states=True)
        return out.hidden_states[-1], inputs["attention_mask"]


class RuntimeQwenVL:
    """Qwen2.5-VL through gen's in-process LLM runtime (`gen.llm.LLM`), with the same `encode` as TransformersQwenVL."""

    def __init__(self, llm, tokenizer, processor=None):
        self.llm, self.tokenizer, self.processor = llm, tokenizer, processor

    @torch.no_grad()
    def encode(self, texts: list[str], images: list[Image.Image] | None = None,
               max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = vl_inputs(self.tokenizer, self.processor, texts, images, max_length)
        ids = [row[m.bool()].tolist() for row, m in zip(inputs["input_ids"], inputs["attention_mask"])]
        vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if images}
        out = self.llm.encode(ids, **vision)
        return out.hidden, out.mask


def text_encoder_adapter(text_encoder, tokenizer, processor=None):
    """The encoder object the stages call, whichever implementation loaded the Qwen2.5-VL weights."""
    from gen.llm import LLM

    if isinstance(text_encoder, LLM):
        return RuntimeQwenVL(text_encoder, tokenizer, processor)
    return TransformersQwenVL(text_encoder, tokenizer, processor)


def prompt_embeds(encoder, texts: list[str], drop: int, images=None, max_length: int | None = None,
                  device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text's real tokens minus the first `drop` (the template prefix), right-padded with zeros:
    embeddings (B, T, D) and mask (B, T) int64."""
    hidden, mask = encoder.encode(texts, images=images, max_length=max_length)
    rows = [h[m.bool()][drop:] for h, m in zip(hidden, mask)]
    t = max(r.shape[0] for r in rows)
    if t == 0:
        raise GenError("the prompt is empty after the chat template", param="prompt")
    embeds = torch.stack([torch.cat([r, r.new_zeros(t - r.shape[0], r.shape[1])]) for r in rows])
    lengths = torch.tensor([r.shape[0] for r in rows], device=hidden.device)
    mask = (torch.arange(t, device=hidden.device)[None] < lengths[:, None]).long()  # (B, T)
    return embeds.to(device=device, dtype=dtype), mask.to(device)


def norm_preserving_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """True CFG, then rescaled per token so its norm equals the conditional prediction's."""
    combined = uncond + scale * (cond - uncond)
    return combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


def fit_area(area: int, ratio: float) -> tuple[int, int]:
    """(width, height), multiples of 32, of about `area` pixels with width / height = ratio."""
    width = math.sqrt(area * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


def image_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL -> (1, 3, 1, H, W) float32 in [-1, 1], resized with Lanczos (as the reference image processor does)."""
    image = image.resize((width, height), resample=Image.LANCZOS)
    x = np.asarray(image).astype(np.float32) / 255.0
    return (2.0 * torch.from_numpy(x).permute(2, 0, 1) - 1.0)[None, :, None]


class QwenImagePipeline(Pipeline):
    """Text-to-image."""

    family = "qwen-image"
    defaults = QWEN_DEFAULTS
    dit = QWEN_IMAGE_DIT
    required = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")

    def __init__(self, components, device, dtype):
        super().__init__(components, device, dtype)
        c = components
        self.transformer, self.vae = c["transformer"], c["vae"]
        self.encoder = text_encoder_adapter(c["text_encoder"], c["tokenizer"], c.get("processor"))
        self.vae_scale = 2 ** len(self.vae.config.temperal_downsample)
        self.defaults = dataclasses.replace(self.defaults, size_multiple=self.vae_scale * 2)
        if self.transformer.config.guidance_embeds:
            raise GenError(f"{c.index.path}: guidance-distilled Qwen-Image transformers are not supported",
                           param="model_path")

    # ---- the parts the edit pipelines change

    def encode(self, prompts: list[str], req: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = prompt_embeds(self.encoder, [T2I_TEMPLATE.format(p) for p in prompts], T2I_DROP,
                                     max_length=MAX_TEXT_TOKENS + T2I_DROP, device=self.device, dtype=self.dtype)
        return embeds[:, :T2I_MAX_EMBED], mask[:, :T2I_MAX_EMBED]

    def reference_latents(self, req: GenerationRequest, n: int, dtype) -> tuple[torch.Tensor | None, list]:
        """Packed latents of the input images (n, L_ref, C*4) and their (1, h, w) token grids; none here."""
        return None, []

    # ---- shared

    def run(self, req: GenerationRequest, progress=None, cancel=None) -> GenerationResult:
        tm = Timings()
        with tm("validate"):
            req = self.validate(req)
            n = req.num_outputs
            use_cfg = req.true_cfg_scale > 1 and req.negative_prompt is not None
        with tm("encode_text"):
            pos = self.encode([req.prompt], req)
            neg = self.encode([req.negative_prompt], req) if use_cfg else None
            pos, neg = (None if p is None else repeat_prompt(*p, n) for p in (pos, neg))
        with tm("prepare_latents"):
            dtype = pos[0].dtype
            h, w = 2 * (req.height // (self.vae_scale * 2)), 2 * (req.width // (self.vae_scale * 2))
            channels = self.transformer.config.in_channels // 4
            noise = draw_noise((n, 1, channels, h, w), req.seed, self.device, dtype)
            latents = pack_2x2(noise[:, 0])  # (n, h/2 * w/2, C*4)
            ref, ref_shapes = self.reference_latents(req, n, dtype)
            img_shapes = [[(1, h // 2, w // 2), *ref_shapes]] * n
        with tm("timesteps"):
            scheduler = copy.deepcopy(self.components["scheduler"])
            steps = req.num_inference_steps
            timesteps = set_timesteps(scheduler, steps, self.device, sigmas=linear_sigmas(steps),
                                      mu=scheduler_shift(scheduler, latents.shape[1]))

        def call(x, t, text) -> dict:
            embeds, mask = text
            x_in = x if ref is None else torch.cat([x, ref], dim=1)
            return dict(hidden_states=x_in, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                        timestep=QWEN_IMAGE_DIT.call_timestep(t, x.shape[0], x.dtype), img_shapes=img_shapes)

        def model_fn(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            texts = (pos, neg) if use_cfg else (pos,)
            preds = [out[:, : x.shape[1]] for out in self.branches(self.transformer, *(call(x, t, c) for c in texts))]
            return norm_preserving_cfg(*preds, req.true_cfg_scale) if use_cfg else preds[0]

        with tm("denoise"):
            latents = denoise(model_fn, scheduler, latents, timesteps, progress, cancel,
                              self.previewer(lambda x: unpack_2x2(x, h, w)))
        with tm("decode"):
            images = self.decode(unpack_2x2(latents, h, w)[:, :, None])
        return GenerationResult(seed=req.seed, images=images, timings=dict(tm), request=req)

    def preview_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(pixels[:, :, None]).latent_dist.mode()  # (N, z, 1, h, w)
        mean, std = latent_stats(self.vae, z)
        return ((z - mean) / std)[:, :, 0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Normalised latents (n, z, 1, h, w) -> PIL images."""
        latents = latents.to(self.vae.dtype)
        mean, std = latent_stats(self.vae, latents)
        latents = latents / (1.0 / std) + mean  # the reference's exact arithmetic
        return to_pil(self.vae.decode(latents, return_dict=False)[0][:, :, 0])

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, n: int, dtype) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(1, 3, 1, H, W) in [-1, 1] -> packed normalised latents (n, H/16 * W/16, z*4) and their token grid."""
        z = self.vae.encode(pixels.to(self.vae.device, dtype)).latent_dist.mode()  # (1, z, 1, H/8, W/8)
        mean, std = latent_stats(self.vae, z)
        z = ((z - mean) / std)[:, :, 0]
        h, w = z.shape[-2:]
        return pack_2x2(z.repeat(n, 1, 1, 1)), (1, h // 2, w // 2)


def repeat_prompt(embeds: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n copies of one prompt's embedding; the mask becomes None when no token is padding."""
    embeds, mask = embeds.repeat(n, 1, 1), mask.repeat(n, 1)
    return embeds, None if bool(mask.all()) else mask


class QwenImageEditPipeline(QwenImagePipeline):
    """Edit one image: it goes through Qwen2.5-VL's vision path into the prompt and through the VAE as reference
    latents; the output size defaults to about 1024 x 1024 pixels with the input's aspect ratio."""

    takes_images = "required"
    required = QwenImagePipeline.required + ("processor",)
    max_images = 1

    def check_images(self, req: GenerationRequest) -> None:
        super().check_images(req)
        if len(req.images) > self.max_images:
            raise GenError(f"{type(self).__name__} takes at most {self.max_images} input image(s), "
                           f"got {len(req.images)}", param="image")

    def size_defaults(self, req: GenerationRequest) -> FamilyDefaults:
        width, height = fit_area(VAE_AREA, req.images[-1].width / req.images[-1].height)
        return dataclasses.replace(self.defaults, height=height, width=width)

    def vae_sizes(self, req: GenerationRequest) -> list[tuple[int, int]]:
        """(width, height) each input image is resized to for the VAE."""
        image = req.images[0]
        return [fit_area(VAE_AREA, image.width / image.height)]

    def encode(self, prompts: list[str], req: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor]:
        (width, height), = self.vae_sizes(req)
        image = req.images[0].convert("RGB").resize((width, height), resample=Image.LANCZOS)
        return prompt_embeds(self.encoder, [EDIT_TEMPLATE.format(p) for p in prompts], EDIT_DROP, images=[image],
                             device=self.device, dtype=self.dtype)

    def reference_latents(self, req: GenerationRequest, n: int, dtype):
        packed, shapes = [], []
        for image, (width, height) in zip(req.images, self.vae_sizes(req)):
            latents, shape = self.encode_image(image_tensor(image.convert("RGB"), height, width), n, dtype)
            packed.append(latents.to(self.device))
            shapes.append(shape)
        return torch.cat(packed, dim=1), shapes


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    """Edit with one or more input images ("Picture 1: ..., Picture 2: ..."); each is shown to Qwen2.5-VL at about
    384 x 384 pixels and enters the transformer as its own ~1024 x 1024 reference latents."""

    max_images = 4

    def vae_sizes(self, req: GenerationRequest) -> list[tuple[int, int]]:
        return [fit_area(VAE_AREA, im.width / im.height) for im in req.images]

    def encode(self, prompts: list[str], req: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor]:
        slots = "".join(PLUS_IMAGE_SLOT.format(i + 1) for i in range(len(req.images)))
        images = []
        for im in req.images:
            width, height = fit_area(CONDITION_AREA, im.width / im.height)
            images.append(im.convert("RGB").resize((width, height), resample=Image.LANCZOS))
        return prompt_embeds(self.encoder, [PLUS_TEMPLATE.format(slots + p) for p in prompts], EDIT_DROP,
                             images=images, device=self.device, dtype=self.dtype)


class QwenImageLLMPipeline(QwenImagePipeline):
    """Text-to-image with a Qwen-Image-architecture DiT conditioned on one hidden layer of a small LLM (the
    ["gen", "GGUFTextEncoder"] component, e.g. SmolLM2 for gen-shapes) and a 2D AutoencoderKL. The empty prompt is
    the trained unconditional input, so true CFG is on unless true_cfg_scale <= 1."""

    family = "qwen-image-llm"
    defaults = LLM_DEFAULTS
    required = ("text_encoder", "transformer", "vae", "scheduler")

    def __init__(self, components, device, dtype):
        Pipeline.__init__(self, components, device, dtype)  # not the parent's: no tokenizer, and a 2D VAE
        c = components
        self.transformer, self.vae, self.encoder = c["transformer"], c["vae"], c["text_encoder"]
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.defaults = dataclasses.replace(self.defaults, size_multiple=self.vae_scale * 2)
        t = self.transformer.config
        if t.guidance_embeds:
            raise GenError(f"{c.index.path}: guidance-distilled Qwen-Image transformers are not supported",
                           param="model_path")
        if t.joint_attention_dim != self.encoder.hidden_size:
            raise GenError(f"{c.index.path}: transformer joint_attention_dim {t.joint_attention_dim} is not the text "
                           f"encoder's hidden size {self.encoder.hidden_size}", param="model_path")
        if t.in_channels != 4 * self.vae.config.latent_channels:
            raise GenError(f"{c.index.path}: transformer in_channels {t.in_channels} is not 4 x the VAE's "
                           f"latent_channels {self.vae.config.latent_channels}", param="model_path")

    def run(self, req: GenerationRequest, progress=None, cancel=None) -> GenerationResult:
        if req.negative_prompt is None:
            req = req.replace(negative_prompt="")  # the unconditional input the model was trained with
        req = self.validate(req)  # a bad prompt is named before the reader encodes it
        start = time.perf_counter()
        reading = self.read_prompt(req.prompt)
        took = time.perf_counter() - start
        if reading is None:
            return super().run(req, progress, cancel)
        result = super().run(req.replace(prompt=reading), progress, cancel)
        result.revised_prompt = reading
        result.request = result.request.replace(prompt=req.prompt)
        result.timings = {"read_prompt": took, **result.timings}
        return result

    def read_prompt(self, prompt: str) -> str | None:
        """The model's own sentence for the scene its prompt reader reads in `prompt` (gen/models/prompt_reader.py),
        or None: no reader, a prompt the model reads as it is (its prompt guide's `reads`), the empty prompt, or a
        prompt read as naming more than one object (the DiT reads those as they are)."""
        reader = getattr(self.encoder, "reader", None)
        if reader is None or not isinstance(prompt, str) or not prompt.strip():
            return None
        if self.prompt_guide is not None and self.prompt_guide.read_as_is(prompt):
            return None
        hidden, mask = self.encoder.encode([prompt])
        values = {k: v for k, (v, _) in reader.read(hidden, mask)[0].items()}
        if values.pop(COUNT) != "1":
            return None
        return reader.sentence(values)

    @functools.cached_property
    def prompt_guide(self):
        return PromptGuide.load(self.components.index.path)

    def encode(self, prompts: list[str], req: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask = self.encoder.encode(prompts)  # (B, T, D), (B, T)
        return hidden.to(device=self.device, dtype=self.dtype), mask.to(self.device).long()

    def preview_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(pixels).latent_dist.mode()
        return (z - (self.vae.config.get("shift_factor", None) or 0.0)) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Normalised latents (n, z, 1, h, w) -> PIL images through the 2D VAE (z / scaling_factor + shift_factor)."""
        return decode_image(self.vae, latents[:, :, 0])


FAMILY = Family(
    name="qwen-image",
    pipelines={"QwenImagePipeline": QwenImagePipeline, "QwenImageEditPipeline": QwenImageEditPipeline,
               "QwenImageEditPlusPipeline": QwenImageEditPlusPipeline, "QwenImageLLMPipeline": QwenImageLLMPipeline},
    dits=(QWEN_IMAGE_DIT,),
)
