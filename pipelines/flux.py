"""FLUX.1 text-to-image (dev and schnell) and image editing (Kontext): CLIP pooled + T5 text encoding, packed 2x2
latents, flow matching; Kontext appends the input image's packed latents to the noise tokens."""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from gen.distributed.plans import ShardPlan
from gen.models.flux import FluxConfig, FluxTransformer
from gen.transforms.step_cache import CacheLayout
from gen.types import GenError, GenerationRequest, GenerationResult
from pipelines.base import Pipeline, Timings
from pipelines.family import DiT, Family
from stages.decode import decode_image
from stages.denoise import denoise, true_cfg
from stages.latents import draw_noise, image_token_ids, pack_2x2, unpack_2x2
from stages.text_encode import encode_clip_pooled, encode_t5
from stages.timesteps import linear_sigmas, scheduler_shift, set_timesteps
from stages.validate import FamilyDefaults

T5_MAX_LENGTH = 512
# (width, height) the reference resizes a Kontext input image to: the one whose aspect ratio is closest to the input's
KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                       (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                       (1456, 720), (1504, 688), (1568, 672))


def _single_stream(streams: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The double blocks' (img, txt) as the single blocks take them: one [txt, img] sequence."""
    img, txt = streams
    return (torch.cat([txt, img], dim=1),)


FLUX_DIT = DiT(
    checkpoint_class="FluxTransformer2DModel", model=FluxTransformer, config=FluxConfig,
    blocks=("transformer_blocks", "single_transformer_blocks"),
    # packed latents and their position ids are the per-token inputs; RoPE is computed from the ids
    shard_plan=ShardPlan(split_inputs={"hidden_states": 1, "img_ids": -2}, text_prefix="encoder_hidden_states",
                         text_inputs={"encoder_hidden_states": 1, "txt_ids": -2}),
    cache_layout=CacheLayout(streams=(2, 1), join=_single_stream),
    batch_args=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"),
    modulations=lambda m: [n for b in m.transformer_blocks for n in (b.norm1, b.norm1_context)]
    + [b.norm for b in m.single_transformer_blocks],
    call_timestep=lambda t, batch, dtype: t.expand(batch).to(dtype) / 1000,
)


class FluxPipeline(Pipeline):
    family = "flux"
    dit = FLUX_DIT
    defaults = FamilyDefaults(num_inference_steps=28, guidance_scale=3.5, height=1024, width=1024)
    required = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "vae", "scheduler")

    def __init__(self, components, device, dtype):
        super().__init__(components, device, dtype)
        c = components
        self.transformer = c["transformer"]
        self.vae = c["vae"]
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if not self.transformer.config.guidance_embeds:  # schnell: distilled for few steps, no guidance
            self.defaults = replace(self.defaults, num_inference_steps=4, guidance_scale=0.0)
        size = self.vae.config.get("sample_size")  # the VAE's native resolution (1024 for FLUX.1)
        if isinstance(size, int) and size % 16 == 0:
            self.defaults = replace(self.defaults, height=size, width=size)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.components
        pooled = encode_clip_pooled(c["tokenizer"], c["text_encoder"], prompts, self.device, self.dtype)
        seq, _ = encode_t5(c["tokenizer_2"], c["text_encoder_2"], prompts, T5_MAX_LENGTH, self.device, self.dtype,
                          masked=False)
        return seq, pooled

    def preview_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(pixels).latent_dist.mode()
        return (z - (self.vae.config.get("shift_factor", None) or 0.0)) * self.vae.config.scaling_factor

    def run(self, req: GenerationRequest, progress=None, cancel=None) -> GenerationResult:
        t = Timings()
        with t("validate"):
            req = self.validate(req)
            n = req.num_outputs
        with t("encode_text"):
            seq, pooled = self.encode([req.prompt] * n)
            use_cfg = req.true_cfg_scale > 1 and req.negative_prompt is not None
            if use_cfg:
                neg_seq, neg_pooled = self.encode([req.negative_prompt] * n)
        with t("prepare_latents"):
            h = 2 * (req.height // (self.vae_scale * 2))  # latent height
            w = 2 * (req.width // (self.vae_scale * 2))
            channels = self.transformer.config.in_channels // 4
            latents = pack_2x2(draw_noise((n, channels, h, w), req.seed, self.device, seq.dtype))
            img_ids = image_token_ids(h // 2, w // 2, self.device, seq.dtype)
            txt_ids = torch.zeros(seq.shape[1], 3, device=self.device, dtype=seq.dtype)
            ref, ref_ids = self.reference_latents(req, n, seq.dtype)
            if ref is not None:
                img_ids = torch.cat([img_ids, ref_ids])
            guidance = None
            if self.transformer.config.guidance_embeds:
                guidance = torch.full((n,), req.guidance_scale, device=self.device, dtype=torch.float32)
        with t("timesteps"):
            scheduler = copy.deepcopy(self.components["scheduler"])
            steps = req.num_inference_steps
            timesteps = set_timesteps(scheduler, steps, self.device, sigmas=linear_sigmas(steps),
                                      mu=scheduler_shift(scheduler, latents.shape[1]))

        def model_fn(x: torch.Tensor, ts: torch.Tensor, i: int) -> torch.Tensor:
            x_in = x if ref is None else torch.cat([x, ref], dim=1)  # the noise tokens first, then the reference's
            kw = dict(hidden_states=x_in, timestep=FLUX_DIT.call_timestep(ts, x.shape[0], x.dtype), img_ids=img_ids,
                      txt_ids=txt_ids, guidance=guidance)
            if not use_cfg:
                return self.transformer(encoder_hidden_states=seq, pooled_projections=pooled, **kw)[:, : x.shape[1]]
            pred, neg = self.branches(self.transformer, dict(kw, encoder_hidden_states=seq, pooled_projections=pooled),
                                      dict(kw, encoder_hidden_states=neg_seq, pooled_projections=neg_pooled))
            return true_cfg(pred[:, : x.shape[1]], neg[:, : x.shape[1]], req.true_cfg_scale)

        with t("denoise"):
            latents = denoise(model_fn, scheduler, latents, timesteps, progress, cancel,
                              self.previewer(lambda x: unpack_2x2(x, h, w)))
        with t("decode"):
            images = decode_image(self.vae, unpack_2x2(latents, h, w))
        return GenerationResult(seed=req.seed, images=images, timings=dict(t), request=req)

    def reference_latents(self, req: GenerationRequest, n: int,
                          dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Packed latents of the input image (n, L_ref, C*4) and their position ids (L_ref, 3); none here."""
        return None, None


def kontext_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """(width, height) a Kontext input image is resized to: of KONTEXT_RESOLUTIONS, the aspect ratio closest to the
    image's (its sides first cut down to multiples of `multiple`), as the reference picks it."""
    width, height = width - width % multiple, height - height % multiple
    if width == 0 or height == 0:
        raise GenError(f"the input image ({width} x {height} after cutting to multiples of {multiple}) is smaller than "
                       f"{multiple} x {multiple} pixels", param="image")
    _, width, height = min((abs(width / height - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    return width // multiple * multiple, height // multiple * multiple


class FluxKontextPipeline(FluxPipeline):
    """Image editing (FLUX.1 Kontext): the input image, resized to the preferred resolution of nearest aspect ratio,
    is VAE-encoded and its packed latents follow the noise tokens (position ids on frame 1). The output is
    height x width (default: as FluxPipeline); the reference rescales any requested size to a 1024 x 1024 pixel area
    (its max_area), which equals ours when max_area = height * width."""

    takes_images = "required"

    def check_images(self, req: GenerationRequest) -> None:
        super().check_images(req)
        if len(req.images) > 1:
            raise GenError(f"{type(self).__name__} takes one input image, got {len(req.images)}", param="image")
        kontext_size(req.images[0].width, req.images[0].height, self.vae_scale * 2)  # big enough to resize

    @torch.no_grad()
    def reference_latents(self, req: GenerationRequest, n: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        image = req.images[0].convert("RGB")
        width, height = kontext_size(image.width, image.height, self.vae_scale * 2)
        pixels = np.asarray(image.resize((width, height), resample=Image.LANCZOS)).astype(np.float32)[None] / 255.0
        # (1, 3, H, W) in [-1, 1], channels last in memory as the reference's (the CPU convolutions then round alike)
        pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2)) * 2.0 - 1.0
        z = self.vae.encode(pixels.to(self.vae.device, dtype)).latent_dist.mode()  # (1, C, H/8, W/8)
        z = (z - (self.vae.config.get("shift_factor", None) or 0.0)) * self.vae.config.scaling_factor
        h, w = z.shape[-2:]
        ids = image_token_ids(h // 2, w // 2, self.device, dtype)
        ids[:, 0] = 1  # the reference image sits on frame 1 of FLUX's 3-axis RoPE
        return pack_2x2(z.to(self.device)).repeat(n, 1, 1), ids


FAMILY = Family(name="flux", pipelines={"FluxPipeline": FluxPipeline, "FluxKontextPipeline": FluxKontextPipeline},
                dits=(FLUX_DIT,))
