"""Wan2.1 / Wan2.2 text-to-video and image-to-video: UMT5 text, Wan VAE latents, one or two experts, CFG, UniPC/flow.

Not the transformer (gen/models/wan.py) nor the VAE / encoders (loaded from diffusers / transformers).
"""
from __future__ import annotations

import copy
import dataclasses
import html
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from gen.distributed.plans import ShardPlan, conv_tokens, each
from gen.models.wan import WanConfig, WanTransformer
from gen.transforms.step_cache import CacheLayout
from gen.types import GenError, GenerationRequest, GenerationResult
from pipelines.base import Pipeline, Timings
from pipelines.family import DiT, Family
from stages.decode import to_pil
from stages.denoise import denoise, true_cfg
from stages.latents import draw_noise, latent_stats
from stages.text_encode import encode_t5
from stages.timesteps import set_timesteps
from stages.validate import FamilyDefaults

TEXT_MAX_LENGTH = 512  # UMT5 tokens; the I2V transformer assumes exactly this many text tokens
WAN_DIT = DiT(
    checkpoint_class="WanTransformer3DModel", model=WanTransformer, config=WanConfig, blocks=("blocks",),
    # Wan patchifies inside: shard the patch embedding's tokens, the 3D RoPE and a per-token (B, L) timestep
    # (Wan2.2 TI2V); gather before unpatchify. Cross-attention sees the whole text.
    shard_plan=ShardPlan(
        seq_len=lambda model, args: math.prod(
            n // p for n, p in zip(args["hidden_states"].shape[2:], model.config.patch_size)),
        split_inputs={"timestep": 1},
        split_outputs={"patch_embedding": conv_tokens},
        split_methods={"rope": each(1)},
        gather="proj_out",
        local_attention=("blocks.*.attn2",),
    ),
    cache_layout=CacheLayout(streams=(1,)),
    batch_args=("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image"),
)
WAN_DEFAULTS = FamilyDefaults(num_inference_steps=50, guidance_scale=5.0, height=480, width=832, num_frames=81, fps=16)


def checkpoint_defaults(path, defaults: dict) -> dict:
    """model_index.json's "defaults" (a tiny test checkpoint's small size, frames and steps), checked by name."""
    allowed = {"height", "width", "num_frames", "fps", "num_inference_steps", "guidance_scale"}
    if not isinstance(defaults, dict) or any(k not in allowed or isinstance(v, bool) or not isinstance(v, (int, float))
                                             for k, v in defaults.items()):
        raise GenError(f"{path}: model_index.json defaults must map {sorted(allowed)} to numbers, got {defaults!r}",
                       param="model_path")
    return defaults


def prompt_clean(text: str) -> str:
    """Unescape HTML entities (twice) and collapse whitespace, as the reference pipeline does."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


@torch.no_grad()
def encode_umt5(tokenizer, text_encoder, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """UMT5 hidden states (B, 512, D) with the padding positions set to zero."""
    seq, mask = encode_t5(tokenizer, text_encoder, [prompt_clean(p) for p in prompts], TEXT_MAX_LENGTH, device, dtype)
    return torch.where(mask[..., None].bool(), seq, torch.zeros((), dtype=seq.dtype, device=seq.device))


@torch.no_grad()
def encode_clip_image(processor, image_encoder, images: list[Image.Image], device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """CLIP vision tokens from the penultimate layer, (N, Li, Di)."""
    inputs = processor(images=images, return_tensors="pt").to(image_encoder.device)
    hidden = image_encoder(**inputs, output_hidden_states=True).hidden_states[-2]
    return hidden.to(device=device, dtype=dtype)


def preprocess_image(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL -> (1, 3, H, W) float32 in [-1, 1], resized with Lanczos (the reference VAE image processor)."""
    x = np.asarray(image.convert("RGB").resize((width, height), resample=Image.LANCZOS)).astype(np.float32) / 255.0
    return torch.from_numpy(x).permute(2, 0, 1)[None] * 2.0 - 1.0


@torch.no_grad()
def encode_video(vae, video: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(1, 3, F, H, W) pixels in [-1, 1] -> normalised latents (1, z, f, h, w) float32 (posterior mode)."""
    posterior = vae.encode(video.to(device=vae.device, dtype=vae.dtype)).latent_dist
    latents = posterior.mode().to(device=device, dtype=torch.float32)
    mean, std = latent_stats(vae, latents)
    return (latents - mean) * (1.0 / std)  # the reference's arithmetic: times the reciprocal


@torch.no_grad()
def decode_video(vae, latents: torch.Tensor) -> list[Image.Image]:
    """Normalised latents (1, z, f, h, w) -> the clip's frames as PIL images."""
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    mean, std = latent_stats(vae, latents)
    video = vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]  # (1, 3, F, H, W)
    return to_pil(video[0].transpose(0, 1))  # (F, 3, H, W)


def frame_mask(frames: int, f: int, h: int, w: int, last: bool, temporal: int) -> torch.Tensor:
    """I2V mask channels (1, temporal, f, h, w): 1 where a pixel frame is given (first; last too for FLF2V)."""
    mask = torch.zeros(1, 1, frames, h, w)
    mask[:, :, 0] = 1
    if last:
        mask[:, :, -1] = 1
    mask = torch.cat([mask[:, :, :1].repeat_interleave(temporal, dim=2), mask[:, :, 1:]], dim=2)  # (1, 1, 4f, h, w)
    return mask.view(1, f, temporal, h, w).transpose(1, 2)


@dataclass
class Conditioning:
    """What an input image adds to every model call (empty for text-to-video)."""

    channels: torch.Tensor | None = None  # (n, mask + z, f, h, w) concatenated to the latents (Wan2.1 / A14B I2V)
    image_embeds: torch.Tensor | None = None  # (n, Li, Di) CLIP tokens (Wan2.1 I2V)
    first_frame: torch.Tensor | None = None  # (n, z, 1, h, w) clean first-frame latents (Wan2.2 TI2V)

    def model_input(self, latents: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.first_frame is not None:
            latents = (1 - keep) * self.first_frame + keep * latents
        if self.channels is not None:
            latents = torch.cat([latents, self.channels], dim=1)
        return latents


class WanPipeline(Pipeline):
    """Text-to-video. With `boundary_ratio` in model_index.json (Wan2.2 A14B) `transformer` denoises the
    high-noise steps (t >= boundary_ratio * 1000) and `transformer_2` the rest; `expand_timesteps` (Wan2.2 TI2V-5B)
    gives the transformer one timestep per token."""

    family = "wan"
    modality = "video"
    dit = WAN_DIT
    expert_slots = ("transformer", "transformer_2")  # Wan2.2 A14B: high-noise, then low-noise expert
    defaults = WAN_DEFAULTS
    required = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")

    def __init__(self, components, device, dtype):
        super().__init__(components, device, dtype)
        c, extra = components, components.index.extra
        self.transformer, self.transformer_2, self.vae = c["transformer"], c.get("transformer_2"), c["vae"]
        self.boundary_ratio = extra.get("boundary_ratio")
        self.expand_timesteps = bool(extra.get("expand_timesteps", False))
        if self.boundary_ratio is not None and self.transformer_2 is None:
            raise GenError(f"{c.index.path}: boundary_ratio {self.boundary_ratio} is set but transformer_2 is missing",
                           param="model_path")
        self.temporal = self.vae.config.scale_factor_temporal
        self.spatial = self.vae.config.scale_factor_spatial
        _, ph, pw = self.transformer.config.patch_size
        self.patch = (ph, pw)
        self.defaults = dataclasses.replace(WAN_DEFAULTS, size_multiple=self.spatial * max(ph, pw),
                                            **checkpoint_defaults(c.index.path, extra.get("defaults", {})))

    def validate(self, req: GenerationRequest) -> GenerationRequest:
        if req.num_outputs != 1:
            raise GenError(f"video models make one clip per request, got n={req.num_outputs}", param="n")
        return super().validate(req)

    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def preview_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_video(self.vae, pixels[:, :, None], self.device)[:, :, 0]

    def conditioning(self, req: GenerationRequest, grid: tuple[int, int, int]) -> Conditioning:
        return Conditioning()

    def expert(self, t: float, scheduler):
        """The high-noise expert `transformer` for t >= boundary_ratio * num_train_timesteps, else `transformer_2`.
        `t` is a host number: comparing a device tensor would wait for the GPU every step."""
        if self.boundary_ratio is None or t >= self.boundary_ratio * scheduler.config.num_train_timesteps:
            return self.transformer
        return self.transformer_2

    def run(self, req: GenerationRequest, progress=None, cancel=None) -> GenerationResult:
        tm = Timings()
        with tm("validate"):
            req = self.validate(req)
            use_cfg = req.guidance_scale > 1.0
        with tm("encode_text"):
            c = self.components
            seq = encode_umt5(c["tokenizer"], c["text_encoder"], [req.prompt], self.device, self.dtype)
            if use_cfg:
                neg = encode_umt5(c["tokenizer"], c["text_encoder"], [req.negative_prompt or ""], self.device, self.dtype)
        grid = ((req.num_frames - 1) // self.temporal + 1, req.height // self.spatial, req.width // self.spatial)
        with tm("prepare_latents"):
            latents = draw_noise((1, self.latent_channels(), *grid), req.seed, self.device, torch.float32)
        with tm("encode_image"):
            cond = self.conditioning(req, grid)
            keep = torch.ones(1, 1, *grid, device=self.device)  # 0 where the latent frame is given (TI2V)
            if cond.first_frame is not None:
                keep[:, :, 0] = 0
        with tm("timesteps"):
            scheduler = copy.deepcopy(c["scheduler"])
            timesteps = set_timesteps(scheduler, req.num_inference_steps, self.device)
            experts = [self.expert(t, scheduler) for t in timesteps.tolist()]  # one device->host copy, before the loop

        def model_fn(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            model = experts[i]
            inp = cond.model_input(x, keep).to(self.dtype)
            if self.expand_timesteps:  # one timestep per token, 0 on given frames
                ts = (keep[0, 0][:, :: self.patch[0], :: self.patch[1]] * t).flatten()[None]  # (1, L)
            else:
                ts = t.expand(x.shape[0])  # (B,)
            kw = dict(hidden_states=inp, timestep=ts, encoder_hidden_states_image=cond.image_embeds)
            if not use_cfg:
                return model(encoder_hidden_states=seq, **kw)
            pred, neg_pred = self.branches(model, dict(kw, encoder_hidden_states=seq), dict(kw, encoder_hidden_states=neg))
            return true_cfg(pred, neg_pred, req.guidance_scale)

        with tm("denoise"):
            latents = denoise(model_fn, scheduler, latents, timesteps, progress, cancel,
                              self.previewer(lambda x: x[:, :, 0]))  # the first frame
            if cond.first_frame is not None:
                latents = (1 - keep) * cond.first_frame + keep * latents
        with tm("decode"):
            frames = decode_video(self.vae, latents)
        return GenerationResult(seed=req.seed, frames=frames, fps=req.fps, timings=dict(tm), request=req)


class WanImageToVideoPipeline(WanPipeline):
    """Image-to-video: the first frame (and, given two images, the last: FLF2V) conditions the clip.

    Wan2.1 I2V: CLIP image tokens + mask and VAE latents of [image, zeros...] concatenated to the noise.
    Wan2.2 A14B I2V: the same without CLIP. Wan2.2 TI2V-5B (`expand_timesteps`): the first latent frame is replaced.
    """

    takes_images = "required"

    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    def conditioning(self, req: GenerationRequest, grid: tuple[int, int, int]) -> Conditioning:
        if len(req.images) > 2:
            raise GenError(f"{type(self).__name__} takes a first frame and optionally a last frame, "
                           f"got {len(req.images)} images", param="image")
        last = len(req.images) == 2
        if last and self.expand_timesteps:
            raise GenError("this model (expand_timesteps) takes one input image, got 2", param="image")
        first = preprocess_image(req.images[0], req.height, req.width)  # (1, 3, H, W)
        embeds = None
        config = self.transformer.config
        if config.image_dim is not None and last != (config.pos_embed_seq_len is not None):
            wanted = "a first and a last frame" if config.pos_embed_seq_len is not None else "one input image"
            raise GenError(f"this model takes {wanted}, got {len(req.images)} images", param="image")
        if config.image_dim is not None:
            if self.components.get("image_encoder") is None or self.components.get("image_processor") is None:
                raise GenError(f"{self.components.index.path}: the transformer takes CLIP image tokens but "
                               "image_encoder / image_processor are missing", param="model_path")
            embeds = encode_clip_image(self.components["image_processor"], self.components["image_encoder"],
                                       list(req.images[:2]), self.device, self.dtype)  # (1 or 2, Li, Di)
        if self.expand_timesteps:
            return Conditioning(first_frame=encode_video(self.vae, first[:, :, None], self.device), image_embeds=embeds)
        frames = [first[:, :, None], first.new_zeros(1, 3, req.num_frames - 1 - last, req.height, req.width)]
        if last:
            frames.append(preprocess_image(req.images[1], req.height, req.width)[:, :, None])
        latents = encode_video(self.vae, torch.cat(frames, dim=2), self.device)  # (1, z, f, h, w)
        mask = frame_mask(req.num_frames, *grid, last=last, temporal=self.temporal).to(latents)
        return Conditioning(channels=torch.cat([mask, latents], dim=1), image_embeds=embeds)


FAMILY = Family(name="wan", pipelines={"WanPipeline": WanPipeline, "WanImageToVideoPipeline": WanImageToVideoPipeline},
                dits=(WAN_DIT,))
