"""FLUX.2 text-to-image and (multi-)reference image editing: [dev] (`Flux2Pipeline`: Mistral 3 text encoder, embedded
guidance) and [klein] (`Flux2KleinPipeline`: Qwen3 text encoder, true CFG unless step-distilled).

Prompts go through the encoder's chat template, are padded to 512 tokens and encoded by gen's LLM runtime into three
of its hidden layers, concatenated per token ([dev]: 10, 20, 30; [klein]: 9, 18, 27), all 512 positions kept. The
FLUX.2 VAE's 32-channel latents are patchified 2x2 into 128 channels and normalized by the VAE's batch-norm
statistics; one token per latent position. Reference images are VAE-encoded the same way and their tokens follow the
noise tokens, image i on time coordinate 10 + 10 i. The sigma schedule is shifted by the reference's empirical mu
(image size and step count). Not the transformer (gen/models/flux2.py) nor the text models (gen/llm); not the
reference's optional prompt upsampling (caption_upsample_temperature: the encoder generating a longer prompt).
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import torch
from PIL import Image

from gen.distributed.plans import ShardPlan
from gen.models.flux2 import Flux2Config, Flux2Transformer
from gen.transforms.step_cache import CacheLayout
from gen.types import GenError, GenerationRequest, GenerationResult
from pipelines.base import Pipeline, Timings
from pipelines.family import DiT, Family
from stages.decode import to_pil
from stages.denoise import denoise, true_cfg
from stages.latents import draw_noise
from stages.timesteps import linear_sigmas, set_timesteps
from stages.validate import FamilyDefaults


def _single_stream(streams: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The double blocks' (img, txt) as the single blocks take them: one [txt, img] sequence."""
    img, txt = streams
    return (torch.cat([txt, img], dim=1),)


FLUX2_DIT = DiT(
    checkpoint_class="Flux2Transformer2DModel", model=Flux2Transformer, config=Flux2Config,
    blocks=("transformer_blocks", "single_transformer_blocks"),
    # the noise and reference-image tokens and their position ids are the per-token inputs; RoPE comes from the ids
    shard_plan=ShardPlan(split_inputs={"hidden_states": 1, "img_ids": -2}, text_prefix="encoder_hidden_states",
                         text_inputs={"encoder_hidden_states": 1, "txt_ids": -2}),
    cache_layout=CacheLayout(streams=(2, 1), join=_single_stream),
    batch_args=("hidden_states", "encoder_hidden_states", "timestep", "guidance"),
)

MAX_TEXT_TOKENS = 512  # every prompt is padded (and cut) to this many tokens, as the reference's max_sequence_length
REF_TIME_SCALE = 10  # reference image i sits on time coordinate 10 + 10 * i
MAX_IMAGE_AREA = 1024 * 1024  # larger input images are scaled down to this area first
MIN_IMAGE_SIDE, MAX_ASPECT = 64, 8  # the reference refuses smaller or more elongated input images
# the reference's system prompt for FLUX.2 [dev] (from BFL's flux2 repository, as diffusers ships it)
DEV_SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                      "object relationships, object\nattribution and actions without speculation.")


def empirical_mu(image_seq_len: int, steps: int) -> float:
    """The sigma shift of BFL's FLUX.2 sampler: linear in the token count, interpolated between the fits for 10 and
    200 steps (past 4300 tokens the 200-step fit alone)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    m200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(m200)
    m10 = a1 * image_seq_len + b1
    slope = (m200 - m10) / 190.0
    return float(slope * steps + (m200 - 200.0 * slope))


def patchify(z: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, C, H, W) -> (B, 4C, H/2, W/2), channel c's 2x2 patch at 4c + (2 row + col)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """(B, 4C, h, w) -> VAE latents (B, C, 2h, 2w)."""
    b, c4, h, w = x.shape
    return x.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


def token_ids(t: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h*w, 4) positions (t, row, col, 0) of an h x w token grid, row-major."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1)).to(device)


def text_ids(length: int, device: torch.device) -> torch.Tensor:
    """(length, 4) positions (0, 0, 0, k) of the text tokens."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


def input_size(image: Image.Image, multiple: int) -> tuple[int, int]:
    """(width, height) an input image is cut to: scaled to 1024^2 pixels when larger (the scaled size rounded down),
    then each side cut down to a multiple of `multiple`."""
    width, height = image.size
    if width * height > MAX_IMAGE_AREA:
        scale = math.sqrt(MAX_IMAGE_AREA / (width * height))
        width, height = int(width * scale), int(height * scale)
    return width // multiple * multiple, height // multiple * multiple


def prepare_image(image: Image.Image, multiple: int) -> torch.Tensor:
    """An input image as the reference feeds it to the VAE: scaled down to 1024^2 pixels if larger (Lanczos), centre
    crop to multiples of `multiple`, RGB in [-1, 1]: (1, 3, H, W) float32."""
    width, height = image.size
    if width * height > MAX_IMAGE_AREA:
        scale = math.sqrt(MAX_IMAGE_AREA / (width * height))
        image = image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)
    w, h = input_size(image, multiple)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    image = image.crop((left, top, left + w, top + h)).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0).permute(2, 0, 1)[None]  # (1, 3, H, W)
    return pixels * 2.0 - 1.0


class Flux2Pipeline(Pipeline):
    """FLUX.2 [dev]: text-to-image, or editing with any number of reference images (`req.images`). guidance_scale is
    the embedded guidance of the guidance-distilled model (one transformer call per step); there is no negative
    prompt. The output defaults to the first input image's size (cut to multiples of 16), else 1024 x 1024."""

    family = "flux2"
    dit = FLUX2_DIT
    defaults = FamilyDefaults(num_inference_steps=50, guidance_scale=4.0, height=1024, width=1024)
    takes_images = "optional"
    required = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
    encoder_layers: tuple[int, ...] = (10, 20, 30)  # hidden states read from the text encoder, in this order
    embedded_guidance = True  # the transformer takes guidance_scale as an input (a guidance-distilled model)

    def __init__(self, components, device, dtype):
        super().__init__(components, device, dtype)
        from gen.llm import LLM

        c = components
        self.transformer, self.vae, self.tokenizer = c["transformer"], c["vae"], c["tokenizer"]
        self.encoder = c["text_encoder"]
        where = c.index.path
        if not isinstance(self.encoder, LLM):
            raise GenError(f"{where}: text_encoder must load into gen's LLM runtime, got {type(self.encoder).__name__}",
                           param="model_path")
        layers, hidden = self.encoder.model_layers(), int((self.encoder.config.get("text_config")
                                                           or self.encoder.config)["hidden_size"])
        if max(self.encoder_layers) > layers:
            raise GenError(f"{where}: the text encoder has {layers} layers; {type(self).__name__} reads hidden states "
                           f"of layers {self.encoder_layers}", param="model_path")
        joint = self.transformer.config.joint_attention_dim
        if hidden * len(self.encoder_layers) != joint:
            raise GenError(f"{where}: {len(self.encoder_layers)} text-encoder layers of {hidden} features are "
                           f"{hidden * len(self.encoder_layers)}, not the transformer's joint_attention_dim {joint}",
                           param="model_path")
        if self.transformer.config.guidance_embeds != self.embedded_guidance:
            raise GenError(f"{where}: transformer guidance_embeds={self.transformer.config.guidance_embeds}, but "
                           f"{type(self).__name__} {'passes' if self.embedded_guidance else 'never passes'} the "
                           "guidance to the transformer", param="model_path")
        if self.transformer.config.in_channels != 4 * self.vae.config.latent_channels:
            raise GenError(f"{where}: transformer in_channels {self.transformer.config.in_channels} is not 4 x the "
                           f"VAE's latent_channels {self.vae.config.latent_channels}", param="model_path")
        pad = self.tokenizer.pad_token_id
        if pad is None or pad != self.encoder.engine.pad_id:
            raise GenError(f"{where}: the tokenizer's pad token id {pad} is not the text encoder runtime's "
                           f"{self.encoder.engine.pad_id} (prompts are padded to {MAX_TEXT_TOKENS} tokens)",
                           param="model_path")
        if getattr(self.tokenizer, "padding_side", "right") != "right":
            raise GenError(f"{where}: the tokenizer pads on the {self.tokenizer.padding_side}; FLUX.2 prompts are "
                           "encoded right-padded only", param="model_path")
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = 128 * self.vae_scale  # the reference's default_sample_size x the VAE scale
        self.defaults = dataclasses.replace(self.defaults, height=side, width=side, size_multiple=2 * self.vae_scale)

    # ---- requests

    def check_images(self, req: GenerationRequest) -> None:
        super().check_images(req)
        for i, image in enumerate(req.images):
            w, h = image.size
            if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
                raise GenError(f"input image {i} is {w} x {h}: both sides must be at least {MIN_IMAGE_SIDE} pixels",
                               param="image")
            if max(w / h, h / w) > MAX_ASPECT:
                raise GenError(f"input image {i} is {w} x {h}: the aspect ratio must be at most {MAX_ASPECT}:1",
                               param="image")

    def size_defaults(self, req: GenerationRequest) -> FamilyDefaults:
        if not req.images:
            return self.defaults
        width, height = input_size(req.images[0], 2 * self.vae_scale)
        return dataclasses.replace(self.defaults, height=height, width=width)

    def validate(self, req: GenerationRequest) -> GenerationRequest:
        req = super().validate(req)
        if req.true_cfg_scale != 1.0:
            raise GenError(f"true_cfg_scale={req.true_cfg_scale}: {type(self).__name__} has no true CFG "
                           f"({self.guidance_kind})", param="true_cfg_scale")
        if req.negative_prompt is not None and not self.uses_cfg(req):
            raise GenError(f"negative_prompt given, but {type(self).__name__} does not use one here "
                           f"({self.guidance_kind})", param="negative_prompt")
        return req

    guidance_kind = "guidance_scale is the embedded guidance of a guidance-distilled model"

    def uses_cfg(self, req: GenerationRequest) -> bool:
        """Whether this request runs an unconditional branch too."""
        return False

    # ---- stages

    def prompt_ids(self, prompt: str) -> list[int]:
        """The reference's chat template (system message, then the prompt without `[IMG]`), tokenized as
        PixtralProcessor does (special tokens added unless the templated text starts with the bos token), cut to
        512 tokens."""
        messages = [{"role": "system", "content": [{"type": "text", "text": DEV_SYSTEM_MESSAGE}]},
                    {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        bos = self.tokenizer.bos_token
        return self.tokenizer(text, truncation=True, max_length=MAX_TEXT_TOKENS,
                              add_special_tokens=not (bos is not None and text.startswith(bos)))["input_ids"]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (B, 512, layers x hidden): each padded to 512 tokens, the states of `encoder_layers` at every
        position (pads included) concatenated per token."""
        ids = [self.prompt_ids(p) for p in prompts]
        hidden = self.encoder.encode(ids, hidden_layer=list(self.encoder_layers), pad_to=MAX_TEXT_TOKENS).hidden
        return hidden.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode_images(self, images, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference images -> their tokens (n, L_ref, 4C) (all images, in order) and positions (L_ref, 4)."""
        bn = self.vae.bn
        tokens, ids = [], []
        for i, image in enumerate(images):
            pixels = prepare_image(image, 2 * self.vae_scale).to(self.vae.device, self.vae.dtype)
            z = patchify(self.vae.encode(pixels).latent_dist.mode())  # (1, 4C, h, w)
            mean = bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
            std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(z.device, z.dtype)
            z = (z - mean) / std
            tokens.append(z.flatten(2).transpose(1, 2)[0])  # (h*w, 4C)
            ids.append(token_ids(REF_TIME_SCALE * (i + 1), z.shape[2], z.shape[3], self.device))
        return torch.cat(tokens)[None].repeat(n, 1, 1).to(self.device), torch.cat(ids)

    def preview_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        bn = self.vae.bn
        z = patchify(self.vae.encode(pixels).latent_dist.mode())  # (N, 4C, h, w)
        mean = bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(z.device, z.dtype)
        return (z - mean) / std

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, h: int, w: int) -> list[Image.Image]:
        """Noise-token latents (B, h*w, 4C) -> images: un-normalized by the batch-norm statistics, unpatchified,
        decoded."""
        bn = self.vae.bn
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)  # (B, 4C, h, w)
        mean = bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(x.device, x.dtype)
        z = unpatchify(x * std + mean).to(self.vae.device)
        return to_pil(self.vae.decode(z, return_dict=False)[0])

    def run(self, req: GenerationRequest, progress=None, cancel=None) -> GenerationResult:
        tm = Timings()
        with tm("validate"):
            req = self.validate(req)
            n = req.num_outputs
            use_cfg = self.uses_cfg(req)
        with tm("encode_text"):
            pos = self.encode([req.prompt]).expand(n, -1, -1)
            neg = self.encode([req.negative_prompt or ""]).expand(n, -1, -1) if use_cfg else None
            txt_ids = text_ids(pos.shape[1], self.device)
        ref = ref_ids = None
        if req.images:
            with tm("encode_images"):
                ref, ref_ids = self.encode_images(req.images, n)
        with tm("prepare_latents"):
            h, w = req.height // (2 * self.vae_scale), req.width // (2 * self.vae_scale)  # token grid
            noise = draw_noise((n, self.transformer.config.in_channels, h, w), req.seed, self.device, self.dtype)
            latents = noise.flatten(2).transpose(1, 2)  # (n, h*w, 4C)
            img_ids = token_ids(0, h, w, self.device)
            if ref is not None:
                img_ids = torch.cat([img_ids, ref_ids])
            guidance = None
            if self.embedded_guidance:
                guidance = torch.full((n,), req.guidance_scale, device=self.device, dtype=torch.float32)
        with tm("timesteps"):
            scheduler = copy.deepcopy(self.components["scheduler"])
            steps = req.num_inference_steps
            timesteps = set_timesteps(scheduler, steps, self.device, sigmas=linear_sigmas(steps),
                                      mu=empirical_mu(h * w, steps))

        def model_fn(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            x_in = x if ref is None else torch.cat([x, ref], dim=1)  # the noise tokens first, then the references'
            kw = dict(hidden_states=x_in.to(self.dtype), timestep=t.expand(n).to(x.dtype) / 1000, img_ids=img_ids,
                      txt_ids=txt_ids, guidance=guidance)
            if not use_cfg:
                return self.transformer(encoder_hidden_states=pos, **kw)[:, : x.shape[1]]
            cond, uncond = self.branches(self.transformer, dict(kw, encoder_hidden_states=pos),
                                         dict(kw, encoder_hidden_states=neg))
            return true_cfg(cond[:, : x.shape[1]], uncond[:, : x.shape[1]], req.guidance_scale)

        with tm("denoise"):
            latents = denoise(model_fn, scheduler, latents, timesteps, progress, cancel,
                              self.previewer(lambda x: x.transpose(1, 2).reshape(x.shape[0], -1, h, w)))
        with tm("decode"):
            images = self.decode(latents, h, w)
        return GenerationResult(seed=req.seed, images=images, timings=dict(tm), request=req)


class Flux2KleinPipeline(Flux2Pipeline):
    """FLUX.2 [klein]: as [dev] with a Qwen3 encoder (its chat template, thinking off; layers 9, 18, 27) and no
    embedded guidance. The base models run true CFG for guidance_scale > 1 (the negative prompt defaults to "", the
    reference's only one); a step-distilled checkpoint (model_index.json `is_distilled`) runs without CFG, with the
    model card's 4 steps by default."""

    family = "flux2-klein"
    encoder_layers = (9, 18, 27)
    embedded_guidance = False

    def __init__(self, components, device, dtype):
        super().__init__(components, device, dtype)
        distilled = components.index.extra.get("is_distilled", False)
        if not isinstance(distilled, bool):
            raise GenError(f"{components.index.path}/model_index.json: is_distilled must be true or false, got "
                           f"{distilled!r}", param="model_path")
        self.is_distilled = distilled
        if distilled:  # FLUX.2 [klein] 4B / 9B model cards: 4 steps, guidance 1.0
            self.defaults = dataclasses.replace(self.defaults, num_inference_steps=4, guidance_scale=1.0)

    @property
    def guidance_kind(self) -> str:
        if self.is_distilled:
            return "a step-distilled checkpoint runs without CFG"
        return "guidance_scale > 1 turns CFG on, with the negative prompt"

    def validate(self, req: GenerationRequest) -> GenerationRequest:
        req = super().validate(req)
        if self.is_distilled and req.guidance_scale > 1:
            raise GenError(f"guidance_scale={req.guidance_scale}: this FLUX.2 [klein] checkpoint is step-distilled "
                           "(model_index.json is_distilled) and runs without CFG; use guidance_scale <= 1",
                           param="guidance_scale")
        return req

    def uses_cfg(self, req: GenerationRequest) -> bool:
        return req.guidance_scale > 1 and not self.is_distilled

    def prompt_ids(self, prompt: str) -> list[int]:
        """The Qwen3 chat template with the generation prompt, thinking off; cut to 512 tokens."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)
        return self.tokenizer(text, truncation=True, max_length=MAX_TEXT_TOKENS)["input_ids"]


FAMILY = Family(name="flux2", pipelines={"Flux2Pipeline": Flux2Pipeline, "Flux2KleinPipeline": Flux2KleinPipeline},
                dits=(FLUX2_DIT,))
