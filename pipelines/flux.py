"""FLUX.1 text-to-image (dev and schnell): CLIP pooled + T5 text encoding, packed 2x2 latents, flow matching."""
from __future__ import annotations

import copy
from dataclasses import replace

import torch

from gen.distributed.plans import ShardPlan
from gen.models.flux import FluxConfig, FluxTransformer
from gen.transforms.step_cache import CacheLayout
from gen.types import GenerationRequest, GenerationResult
from pipelines.base import Pipeline, Timings
from pipelines.family import DiT, Family
from stages.decode import decode_image
from stages.denoise import denoise, true_cfg
from stages.latents import draw_noise, image_token_ids, pack_2x2, unpack_2x2
from stages.text_encode import encode_clip_pooled, encode_t5
from stages.timesteps import linear_sigmas, scheduler_shift, set_timesteps
from stages.validate import FamilyDefaults

T5_MAX_LENGTH = 512


def _single_stream(streams: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The double blocks' (img, txt) as the single blocks take them: one [txt, img] sequence."""
    img, txt = streams
    return (torch.cat([txt, img], dim=1),)


FLUX_DIT = DiT(
    checkpoint_class="FluxTransformer2DModel", model=FluxTransformer, config=FluxConfig,
    blocks=("transformer_blocks", "single_transformer_blocks"),
    # packed latents and their position ids are the per-token inputs; RoPE is computed from the ids
    shard_plan=ShardPlan(split_inputs={"hidden_states": 1, "img_ids": -2}, text_prefix="encoder_hidden_states"),
    cache_layout=CacheLayout(streams=(2, 1), join=_single_stream),
    batch_args=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"),
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
            guidance = None
            if self.transformer.config.guidance_embeds:
                guidance = torch.full((n,), req.guidance_scale, device=self.device, dtype=torch.float32)
        with t("timesteps"):
            scheduler = copy.deepcopy(self.components["scheduler"])
            steps = req.num_inference_steps
            timesteps = set_timesteps(scheduler, steps, self.device, sigmas=linear_sigmas(steps),
                                      mu=scheduler_shift(scheduler, latents.shape[1]))

        def model_fn(x: torch.Tensor, ts: torch.Tensor, i: int) -> torch.Tensor:
            kw = dict(hidden_states=x, timestep=ts.expand(x.shape[0]).to(x.dtype) / 1000, img_ids=img_ids,
                      txt_ids=txt_ids, guidance=guidance)
            if not use_cfg:
                return self.transformer(encoder_hidden_states=seq, pooled_projections=pooled, **kw)
            pred, neg = self.branches(self.transformer, dict(kw, encoder_hidden_states=seq, pooled_projections=pooled),
                                      dict(kw, encoder_hidden_states=neg_seq, pooled_projections=neg_pooled))
            return true_cfg(pred, neg, req.true_cfg_scale)

        with t("denoise"):
            latents = denoise(model_fn, scheduler, latents, timesteps, progress, cancel)
        with t("decode"):
            images = decode_image(self.vae, unpack_2x2(latents, h, w))
        return GenerationResult(seed=req.seed, images=images, timings=dict(t), request=req)


FAMILY = Family(name="flux", pipelines={"FluxPipeline": FluxPipeline}, dits=(FLUX_DIT,))
