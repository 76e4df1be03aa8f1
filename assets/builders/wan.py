"""Tiny Wan2.1 T2V, Wan2.1 I2V and Wan2.2 A14B (two-expert) checkpoints, written by diffusers' own save_pretrained."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline,
                       WanTransformer3DModel)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from assets.builders.common import tiny_t5_tokenizer

TEXT_DIM = 32  # UMT5 width = the transformer's text_dim
IMAGE_DIM = 32  # CLIP vision width = the transformer's image_dim
HEADS, HEAD_DIM = 2, 12  # transformer width 24


def tiny_umt5(vocab_size: int) -> UMT5EncoderModel:
    cfg = UMT5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=2 * TEXT_DIM, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(cfg).eval()


def tiny_wan_vae() -> AutoencoderKLWan:
    """The Wan2.1 VAE layout (16 latent channels, 4x temporal / 8x spatial), tiny widths."""
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def tiny_transformer(seed: int, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=16,
                  out_channels=16, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=48, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    return WanTransformer3DModel(**{**config, **overrides}).eval()


def unipc(flow_shift: float) -> UniPCMultistepScheduler:
    """The scheduler Wan checkpoints ship: UniPC over flow-matching sigmas shifted by `flow_shift`."""
    return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                   flow_shift=flow_shift, solver_order=2, solver_type="bh2", predict_x0=True,
                                   lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace")


# what the tiny checkpoints run when a request names no size, frames or steps: seconds on a CPU, not Wan's
# 832 x 480 x 81 frames x 50 steps (model_index.json "defaults", read by pipelines/wan.py)
TINY_DEFAULTS = {"height": 32, "width": 48, "num_frames": 9, "num_inference_steps": 4}


def save(pipe, out: Path) -> Path:
    """save_pretrained, plus the tiny defaults in model_index.json."""
    pipe.save_pretrained(out, safe_serialization=True)
    index = out / "model_index.json"
    index.write_text(json.dumps(dict(json.loads(index.read_text()), defaults=TINY_DEFAULTS), indent=2, sort_keys=True)
                     + "\n")
    return out


def text_parts() -> dict:
    torch.manual_seed(0)
    tok = tiny_t5_tokenizer(max_length=512)
    return dict(tokenizer=tok, text_encoder=tiny_umt5(len(tok)), vae=tiny_wan_vae())


def build_t2v(out: Path) -> Path:
    pipe = WanPipeline(**text_parts(), scheduler=unipc(3.0), transformer=tiny_transformer(1))
    return save(pipe, out)


def build_i2v(out: Path) -> Path:
    parts = text_parts()
    torch.manual_seed(2)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=IMAGE_DIM, intermediate_size=2 * IMAGE_DIM, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=8,
                                            projection_dim=IMAGE_DIM)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformer = tiny_transformer(3, in_channels=16 + 4 + 16, image_dim=IMAGE_DIM, added_kv_proj_dim=HEADS * HEAD_DIM)
    pipe = WanImageToVideoPipeline(**parts, scheduler=unipc(3.0), image_encoder=clip, image_processor=processor,
                                   transformer=transformer)
    return save(pipe, out)


def build_a14b(out: Path) -> Path:
    """Wan2.2 T2V A14B: a high-noise expert (`transformer`) and a low-noise one (`transformer_2`)."""
    pipe = WanPipeline(**text_parts(), scheduler=unipc(12.0), transformer=tiny_transformer(4),
                       transformer_2=tiny_transformer(5), boundary_ratio=0.875)
    return save(pipe, out)


def build(root: Path) -> list[Path]:
    return [build_t2v(root / "wan-t2v-tiny"), build_i2v(root / "wan-i2v-tiny"), build_a14b(root / "wan22-a14b-tiny")]
