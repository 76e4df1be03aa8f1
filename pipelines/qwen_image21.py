"""Qwen-Image 2.1: text-to-image and image-conditioned generation (editing) in one pipeline. The prompt, and any
condition images, are read by Qwen3-VL (the last decoder layer's states before its final norm, the system turn
dropped); condition images also enter the transformer as VAE latents in the vision slots the encoder reserved for
them; unpatched 16x latents, plain true CFG (off by default), the Qwen-Image 2.1 VAE (RGBA in and out).

Not the transformer (gen/models/qwen_image21.py) nor Qwen3-VL itself (gen/llm, through `RuntimeQwen3VL`).
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from PIL import Image

from gen.distributed.plans import ShardPlan, each
from gen.llm import LLM
from gen.models.qwen_image21 import Prefix, QwenImage21Config, QwenImage21Transformer
from gen.transforms.step_cache import CacheLayout
from gen.types import GenError, GenerationRequest, GenerationResult
from pipelines.base import Pipeline, Timings
from pipelines.family import DiT, Family
from pipelines.qwen_image import fit_area, image_tensor
from stages.decode import to_pil
from stages.denoise import denoise, true_cfg
from stages.latents import draw_noise, latent_stats
from stages.timesteps import linear_sigmas, scheduler_shift, set_timesteps
from stages.validate import FamilyDefaults

QWEN_IMAGE21_DIT = DiT(
    checkpoint_class="QwenImage21Transformer2DModel", model=QwenImage21Transformer, config=QwenImage21Config,
    blocks=("transformer_blocks",),
    # shard the target image's embedded tokens and their RoPE; the prefix's keys and values (encode_prefix, run
    # outside the call on every rank) are held whole by each rank and read by the attention as keys without queries
    shard_plan=ShardPlan(
        split_outputs={"img_in": 1},
        split_methods={"target_rope": each(0)},
        gather="proj_out",
    ),
    cache_layout=CacheLayout(streams=(1,)),
    # no batched forward arguments: the calls are never merged (each CFG branch brings its own prefix)
    entry_methods=("encode_prefix",),  # the prompt / condition pass before the steps (offload moves around it)
    block_methods=("forward_prefix",),
)
SYSTEM = "Comprehend and analyze the provided prompt."
TEMPLATE = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{{slots}}{{prompt}}<|im_end|>\n"
            "<|im_start|>assistant\n")
IMAGE_SLOT = "<image{}><|vision_start|><|image_pad|><|vision_end|>"
VAE_SCALE = 16  # pixels per latent token side (the reference fixes it)
DEFAULTS = FamilyDefaults(num_inference_steps=40, guidance_scale=1.0, height=1024, width=1024, true_cfg_scale=1.0,
                          size_multiple=2 * VAE_SCALE)


def prompt_text(prompt: str, n_images: int) -> str:
    """The reference's raw template (not the chat template): system turn, user turn with one slot per condition image,
    the assistant turn opened. An empty prompt becomes " " (Qwen has no bos token to read)."""
    slots = " ".join(IMAGE_SLOT.format(i + 1) for i in range(n_images))
    return TEMPLATE.format(slots=slots, prompt=prompt or " ")


def system_tokens(processor) -> int:
    """Tokens of the system turn, dropped from the states: counted from the processor's chat template, as the
    reference counts them."""
    turn = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}]
    return len(processor.apply_chat_template(turn, tokenize=True, return_dict=False)[0])


def vision_copy(image: Image.Image) -> Image.Image:
    """The encoder's view of an RGBA condition image: alpha composited over white."""
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white


class RuntimeQwen3VL:
    """Qwen3-VL through gen's in-process LLM runtime: the last decoder layer's states before the final norm."""

    def __init__(self, llm, processor):
        self.llm, self.processor = llm, processor
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    @torch.no_grad()
    def encode(self, texts: list[str], images: list[Image.Image] | None = None):
        """texts (with one <|image_pad|> per image, in order) -> hidden (B, T, D) right-padded, mask (B, T) bool,
        image_slots (B, T) bool (the positions standing for image patches)."""
        inputs = self.processor(text=texts, images=images or None, padding=True, padding_side="left",
                                return_tensors="pt")
        ids = [row[m.bool()].tolist() for row, m in zip(inputs["input_ids"], inputs["attention_mask"])]
        vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")} if images else {}
        out = self.llm.encode(ids, hidden_layer=-1, final_norm=False, **vision)
        slots = torch.zeros(out.mask.shape, dtype=torch.bool)
        for row, seq in zip(slots, ids):
            row[: len(seq)] = torch.tensor(seq) == self.image_token_id
        return out.hidden, out.mask, slots.to(out.mask.device)


class QwenImage21Pipeline(Pipeline):
    """Text-to-image; with input images, generation conditioned on them (editing). The output size defaults to
    1024 x 1024, or about that area with the last input image's aspect ratio."""

    family = "qwen-image-2.1"
    defaults = DEFAULTS
    dit = QWEN_IMAGE21_DIT
    takes_images = "optional"
    required = ("processor", "text_encoder", "transformer", "vae", "scheduler")

    def __init__(self, components, device, dtype):
        super().__init__(components, device, dtype)
        c = components
        self.transformer, self.vae, self.processor = c["transformer"], c["vae"], c["processor"]
        if not isinstance(c["text_encoder"], LLM):
            raise GenError(f"{c.index.path}: the text encoder must be loaded on gen's LLM runtime (gen.llm.LLM), got "
                           f"{type(c['text_encoder']).__name__}", param="model_path")
        self.encoder = RuntimeQwen3VL(c["text_encoder"], self.processor)
        self.drop = system_tokens(self.processor)
        t, v = self.transformer.config, self.vae.config
        if v.get("scale_factor_spatial", VAE_SCALE) != VAE_SCALE or v.z_dim != t.in_channels:
            raise GenError(f"{c.index.path}: the VAE (z_dim {v.z_dim}, {v.get('scale_factor_spatial')}x) does not make "
                           f"the transformer's latents ({t.in_channels} channels, {VAE_SCALE}x)", param="model_path")
        # the reference's `output_resolution`: the default output side, and the side of the square whose area the
        # condition images are resized to (with their own aspect ratios)
        self.output_resolution = 1024
        self.sigmas = c.index.extra.get("sample_sigmas")  # the checkpoint's own sampling grid, when it ships one
        if self.sigmas is not None:
            self.defaults = dataclasses.replace(self.defaults, num_inference_steps=len(self.sigmas))

    # ---- requests

    def size_defaults(self, req: GenerationRequest) -> FamilyDefaults:
        width = height = self.output_resolution
        if req.images:
            width, height = fit_area(self.output_resolution**2, req.images[-1].width / req.images[-1].height)
        return dataclasses.replace(self.defaults, height=height, width=width)

    def validate(self, req: GenerationRequest) -> GenerationRequest:
        req = super().validate(req)
        if self.sigmas is not None and req.num_inference_steps != len(self.sigmas):
            raise GenError(f"this checkpoint samples its own grid of {len(self.sigmas)} sigmas (model_index.json "
                           f"sample_sigmas): num_inference_steps must be {len(self.sigmas)}, got "
                           f"{req.num_inference_steps}", param="num_inference_steps")
        return req

    # ---- stages

    def condition_images(self, req: GenerationRequest) -> list[Image.Image]:
        """Each input image as RGBA, resized to about output_resolution ** 2 pixels with its own aspect ratio
        (multiples of 32)."""
        out = []
        for image in req.images:
            width, height = fit_area(self.output_resolution**2, image.width / image.height)
            out.append(image.convert("RGBA").resize((width, height), resample=Image.LANCZOS))
        return out

    def encode(self, prompt: str, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt (with the condition images) -> states (1, T, D) less the system turn, image slots (1, T)."""
        hidden, mask, slots = self.encoder.encode([prompt_text(prompt, len(images))],
                                                  [vision_copy(im) for im in images])
        hidden, slots = hidden[0][mask[0].bool()][self.drop:], slots[0][mask[0].bool()][self.drop:]
        if hidden.shape[0] == 0:
            raise GenError("the prompt is empty after the chat template", param="prompt")
        return hidden[None].to(self.device, self.dtype), slots[None].to(self.device)

    @torch.no_grad()
    def encode_condition(self, images: list[Image.Image]) -> tuple[torch.Tensor | None, list[tuple[int, int, int]]]:
        """RGBA condition images -> their normalised latent tokens (1, sum h*w, z) and (1, h, w) grids."""
        tokens, shapes = [], []
        for image in images:
            pixels = image_tensor(image, image.height, image.width).to(self.vae.device, self.vae.dtype)  # (1, 4, 1, H, W)
            z = self.vae.encode(pixels).latent_dist.mode()  # (1, z, 1, H/16, W/16)
            mean, std = latent_stats(self.vae, z)
            z = ((z - mean) / std)[:, :, 0]
            tokens.append(z.flatten(2).transpose(1, 2).to(self.device, self.dtype))
            shapes.append((1, z.shape[-2], z.shape[-1]))
        return (torch.cat(tokens, dim=1) if tokens else None), shapes

    def run(self, req: GenerationRequest, progress=None, cancel=None) -> GenerationResult:
        tm = Timings()
        with tm("validate"):
            req = self.validate(req)
            n = req.num_outputs
            use_cfg = req.true_cfg_scale > 1 and req.negative_prompt is not None
            images = self.condition_images(req)
        with tm("encode_text"):
            texts = [self.encode(req.prompt, images)] + ([self.encode(req.negative_prompt, images)] if use_cfg else [])
        with tm("prepare_latents"):
            condition, cond_shapes = self.encode_condition(images)
            h, w = req.height // VAE_SCALE, req.width // VAE_SCALE
            noise = draw_noise((n, 1, self.transformer.config.in_channels, h, w), req.seed, self.device, self.dtype)
            latents = noise[:, 0].flatten(2).transpose(1, 2)  # (n, h*w, z)
            img_shapes = [[*cond_shapes, (1, h, w)]] * n
        with tm("timesteps"):
            scheduler = copy.deepcopy(self.components["scheduler"])
            sigmas = np.asarray(self.sigmas) if self.sigmas is not None else linear_sigmas(req.num_inference_steps)
            timesteps = set_timesteps(scheduler, len(sigmas), self.device, sigmas=sigmas,
                                      mu=scheduler_shift(scheduler, latents.shape[1]))

        def prefix(text, t=None) -> Prefix:
            embeds, slots = text
            return self.transformer.encode_prefix(embeds, slots, img_shapes[:1], condition=condition, timestep=t)

        static = self.transformer.config.causal_condition  # the prefix is step-independent: encode it once
        with tm("encode_prefix"), torch.no_grad():
            prefixes = [prefix(text) for text in texts] if static else None

        def model_fn(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            t = t.expand(x.shape[0]).to(x.dtype) / 1000
            branches = prefixes if static else [prefix(text, t) for text in texts]
            preds = self.branches(self.transformer, *(dict(hidden_states=x, encoder_hidden_states=p, timestep=t,
                                                           img_shapes=img_shapes) for p in branches))
            return true_cfg(preds[0], preds[1], req.true_cfg_scale) if use_cfg else preds[0]

        with tm("denoise"):
            latents = denoise(model_fn, scheduler, latents, timesteps, progress, cancel,
                              self.previewer(lambda x: x.transpose(1, 2).reshape(n, -1, h, w)))
        with tm("decode"):
            images = self.decode(latents.transpose(1, 2).reshape(n, -1, 1, h, w))
        return GenerationResult(seed=req.seed, images=images, timings=dict(tm), request=req)

    def preview_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        rgba = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)  # opaque
        z = self.vae.encode(rgba[:, :, None]).latent_dist.mode()  # (N, z, 1, h, w)
        mean, std = latent_stats(self.vae, z)
        return ((z - mean) / std)[:, :, 0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Normalised latents (n, z, 1, h, w) -> RGBA PIL images."""
        latents = latents.to(self.vae.dtype)
        mean, std = latent_stats(self.vae, latents)
        return to_pil(self.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0])


FAMILY = Family(
    name="qwen-image-2.1",
    pipelines={"QwenImage21Pipeline": QwenImage21Pipeline},
    dits=(QWEN_IMAGE21_DIT,),
)
