"""Z-Image text-to-image (Z-Image-Turbo defaults: 9 steps, no CFG): prompts through a Qwen3 chat template into the
second-to-last hidden layer of the Qwen3 encoder (gen's LLM runtime), flow matching on unpacked latents, the FLUX VAE.

Not the transformer (gen/models/z_image.py) nor the Qwen3 model itself (gen/llm).
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from gen.distributed.plans import ShardPlan, each
from gen.models.z_image import KEY, ZImageConfig, ZImageTransformer, padded_length
from gen.transforms.step_cache import CacheLayout
from gen.types import GenError, GenerationRequest, GenerationResult
from pipelines.base import Pipeline, Timings
from pipelines.family import DiT, Family
from stages.decode import decode_image
from stages.denoise import denoise
from stages.latents import draw_noise
from stages.timesteps import scheduler_shift, set_timesteps
from stages.validate import FamilyDefaults


def _main_layers_input(streams: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The first noise-refiner block's output (image run) as the last main layer takes its streams when every block
    between does nothing: (image, caption). The caption leaving the last layer is never read (only image tokens
    reach the output), so it needs no reference: zero."""
    (img,) = streams
    return img, img.new_zeros(())


Z_IMAGE_DIT = DiT(
    checkpoint_class="ZImageTransformer2DModel", model=ZImageTransformer, config=ZImageConfig,
    blocks=("noise_refiner", "context_refiner", "layers"),
    # the padded image run and its RoPE are sharded; the noise refiner attends over image tokens alone, the caption
    # refiner over the (replicated) caption alone; the main layers' caption run leads, padded to a multiple of 32
    shard_plan=ShardPlan(
        split_methods={"embed_image": 1, "image_rope": each(1)},
        gather=f"all_final_layer.{KEY}",
        local_attention=("context_refiner.*",),
        no_prefix=("noise_refiner.*",),
        text_prefix=lambda model, args: padded_length(args["encoder_hidden_states"].shape[1]),
        heads_attr="n_heads",
    ),
    cache_layout=CacheLayout(streams=(1, 1, 2), join=_main_layers_input),
    batch_args=("hidden_states", "timestep", "encoder_hidden_states"),
    batch_pad=(("encoder_hidden_states", "encoder_hidden_states_mask"),),
)
MAX_TEXT_TOKENS = 512  # the reference's max_sequence_length (template included)
HIDDEN_LAYER = -2  # the encoder's second-to-last hidden state (hidden_states[-2]: before the last decoder layer)
# Z-Image-Turbo's model card: 9 steps, guidance 0 (no CFG), 1024 x 1024
TURBO_DEFAULTS = FamilyDefaults(num_inference_steps=9, guidance_scale=0.0, height=1024, width=1024)


def z_image_sigmas(steps: int) -> list[float]:
    """1 -> 1/steps in float32, as the reference computes them (torch.linspace)."""
    return torch.linspace(1.0, 1 / steps, steps).tolist()


class ZImagePipeline(Pipeline):
    """Text-to-image. `guidance_scale` > 0 turns CFG on as the reference does: pred + g * (pred - uncond), the
    negative prompt defaulting to ""."""

    family = "z-image"
    defaults = TURBO_DEFAULTS
    dit = Z_IMAGE_DIT
    required = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")

    def __init__(self, components, device, dtype):
        super().__init__(components, device, dtype)
        from gen.llm import LLM

        c = components
        self.transformer, self.vae, self.tokenizer = c["transformer"], c["vae"], c["tokenizer"]
        self.encoder = c["text_encoder"]
        if not isinstance(self.encoder, LLM):
            raise GenError(f"{c.index.path}: text_encoder must load into gen's LLM runtime, got "
                           f"{type(self.encoder).__name__}", param="model_path")
        hidden = int((self.encoder.config.get("text_config") or self.encoder.config)["hidden_size"])
        if hidden != self.transformer.config.cap_feat_dim:
            raise GenError(f"{c.index.path}: text encoder hidden size {hidden} is not the "
                           f"transformer's cap_feat_dim {self.transformer.config.cap_feat_dim}", param="model_path")
        if self.transformer.config.in_channels != self.vae.config.latent_channels:
            raise GenError(f"{c.index.path}: transformer in_channels {self.transformer.config.in_channels} is not the "
                           f"VAE's latent_channels {self.vae.config.latent_channels}", param="model_path")
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.defaults = dataclasses.replace(self.defaults, size_multiple=self.vae_scale * 2)

    def validate(self, req: GenerationRequest) -> GenerationRequest:
        req = super().validate(req)
        if req.true_cfg_scale != 1.0:
            raise GenError(f"true_cfg_scale={req.true_cfg_scale}: Z-Image's classifier-free guidance is guidance_scale "
                           "(> 0 turns it on)", param="true_cfg_scale")
        return req

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """One prompt -> its caption features (1, T, D): the chat template (thinking on, as the reference), at most
        512 tokens, the real tokens' second-to-last hidden states."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=True)
        ids = self.tokenizer(text, truncation=True, max_length=MAX_TEXT_TOKENS)["input_ids"]
        hidden = self.encoder.encode([ids], hidden_layer=HIDDEN_LAYER).per_prompt()[0]  # (T, D)
        return hidden[None].to(device=self.device, dtype=self.dtype)

    def preview_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(pixels).latent_dist.mode()
        return (z - (self.vae.config.get("shift_factor", None) or 0.0)) * self.vae.config.scaling_factor

    def run(self, req: GenerationRequest, progress=None, cancel=None) -> GenerationResult:
        tm = Timings()
        with tm("validate"):
            req = self.validate(req)
            n = req.num_outputs
            use_cfg = req.guidance_scale > 0
        with tm("encode_text"):
            pos = self.encode(req.prompt).expand(n, -1, -1)
            neg = self.encode(req.negative_prompt or "").expand(n, -1, -1) if use_cfg else None
        with tm("prepare_latents"):
            h, w = 2 * (req.height // (self.vae_scale * 2)), 2 * (req.width // (self.vae_scale * 2))
            latents = draw_noise((n, self.transformer.config.in_channels, h, w), req.seed, self.device,
                                 torch.float32)
        with tm("timesteps"):
            scheduler = copy.deepcopy(self.components["scheduler"])
            steps = req.num_inference_steps
            timesteps = set_timesteps(scheduler, steps, self.device, sigmas=z_image_sigmas(steps),
                                      mu=scheduler_shift(scheduler, (h // 2) * (w // 2)))

        def model_fn(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            kw = dict(hidden_states=x.to(self.dtype), timestep=t.expand(n))
            if not use_cfg:
                pred = self.transformer(encoder_hidden_states=pos, **kw).float()
            else:
                cond, uncond = (o.float() for o in self.branches(self.transformer, dict(kw, encoder_hidden_states=pos),
                                                                 dict(kw, encoder_hidden_states=neg)))
                pred = cond + req.guidance_scale * (cond - uncond)
            return -pred  # the model predicts clean minus noise; the scheduler steps along noise minus clean

        with tm("denoise"):
            latents = denoise(model_fn, scheduler, latents, timesteps, progress, cancel, self.previewer(lambda x: x))
        with tm("decode"):
            images = decode_image(self.vae, latents)
        return GenerationResult(seed=req.seed, images=images, timings=dict(tm), request=req)


FAMILY = Family(name="z-image", pipelines={"ZImagePipeline": ZImagePipeline}, dits=(Z_IMAGE_DIT,))
