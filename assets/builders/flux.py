"""Tiny FLUX.1-dev, FLUX.1-schnell and FLUX.1 Kontext checkpoints, written by diffusers' own save_pretrained of
FluxPipeline / FluxKontextPipeline (Kontext: the dev components under the Kontext pipeline class)."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline,
                       FluxTransformer2DModel)

from assets.builders.common import tiny_clip_text_model, tiny_clip_tokenizer, tiny_t5_encoder, tiny_t5_tokenizer


def tiny_flux_vae() -> AutoencoderKL:
    """FLUX's VAE layout (16 latent channels in the real one), 8x downsampling, tiny widths."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=128,
                         scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def build_flux(out: Path, guidance_embeds: bool, pipeline_cls=FluxPipeline) -> Path:
    torch.manual_seed(0)
    tok, tok2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip, t5 = tiny_clip_text_model(len(tok)), tiny_t5_encoder(len(tok2))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipe = pipeline_cls(scheduler=scheduler, vae=tiny_flux_vae(), text_encoder=clip, tokenizer=tok,
                        text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build(root: Path) -> list[Path]:
    return [build_flux(root / "flux-tiny", guidance_embeds=True),
            build_flux(root / "flux-schnell-tiny", guidance_embeds=False),
            build_flux(root / "flux-kontext-tiny", guidance_embeds=True, pipeline_cls=FluxKontextPipeline)]
