"""Builds the tiny Qwen-Image 2.1 checkpoint (text-to-image and image-conditioned editing in one pipeline) in the
diffusers layout, written by diffusers'/transformers' own save_pretrained with real config keys and tiny dims. Not a
test; run it to (re)build:

    python -m assets.build_assets qwen_image21
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from assets.builders.qwen_image import build_tokenizer

SEED = 0
TEXT_DIM = 32  # Qwen3-VL hidden size = the transformer's context_in_dim
Z_DIM = 8  # VAE latent channels = the transformer's in_channels (2.1 takes latents unpatched)
NAME = "qwen-image21-tiny"


def build_text_encoder(tok):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vocab_size = (len(tok) + 63) // 64 * 64
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True},
                         bos_token_id=None, eos_token_id=eos, pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>")),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_DIM,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 1]),
        tie_word_embeddings=True, **ids)
    torch.manual_seed(SEED)
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # the init's tiny vision weights would make the images' contribution vanish
        for name, p in model.model.visual.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def build_image_processor():
    """Qwen3-VL's real patch / merge sizes and pixel limits: images of the pipeline's ~1024 x 1024 area pass unresized,
    so the vision slots line up with the VAE latents (one slot per 2x2 latent tokens)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                    size={"longest_edge": 16777216, "shortest_edge": 65536},
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def build_vae():
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(SEED + 1)
    g = torch.Generator().manual_seed(SEED + 1)
    return AutoencoderKLQwenImage21(
        base_dim=8, decoder_base_dim=8, z_dim=Z_DIM, dim_mult=[1, 1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True, True], dropout=0.0, in_channels=4, out_channels=4,
        latents_mean=(0.2 * torch.randn(Z_DIM, generator=g)).tolist(),
        latents_std=(1.5 + 0.5 * torch.rand(Z_DIM, generator=g)).tolist()).eval()


def build_transformer(causal_condition: bool = True):
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(SEED + 2)
    model = QwenImage21Transformer2DModel(
        patch_size=1, in_channels=Z_DIM, out_channels=Z_DIM, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, context_in_dim=TEXT_DIM, mlp_ratio=3, axes_dims_rope=(4, 6, 6),
        causal_condition=causal_condition).eval()
    with torch.no_grad():  # large enough that the prompt and the condition visibly steer the tiny model
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")


def save_processor(tok, folder: Path) -> None:
    """The `processor` folder: tokenizer (with its chat template) and image processor, each by its own save_pretrained
    (transformers' Qwen3VLProcessor cannot save itself without the video processor, which needs torchvision)."""
    tok.save_pretrained(folder)
    build_image_processor().save_pretrained(folder)


def build(out: Path) -> list[Path]:
    from diffusers import QwenImage21Pipeline

    from component_loaders.qwen import load_qwen3_vl_processor

    tok = build_tokenizer()
    folder = out / NAME
    if folder.exists():
        shutil.rmtree(folder)
    save_processor(tok, folder / "processor")
    processor = load_qwen3_vl_processor(folder / "processor", "Qwen3VLProcessor")
    pipe = QwenImage21Pipeline(scheduler=build_scheduler(), vae=build_vae(), text_encoder=build_text_encoder(tok),
                               processor=processor, transformer=build_transformer())
    pipe.register_modules(processor=None)  # saved above: its save_pretrained needs the video processor
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen3VLProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [folder]
