"""Builds the tiny Z-Image checkpoint (assets/z-image-tiny) in the diffusers layout, written by diffusers' and
transformers' own save_pretrained with real config keys and tiny dims. Not a test; run it to (re)build:

    python -m assets.build_assets z_image

As in Z-Image-Turbo, model_index.json names the text encoder `Qwen3Model` while its folder holds a
`Qwen3ForCausalLM` checkpoint (keys under `model.`, tied embeddings); the transformer is stored in bf16, as released
(its fixed 256 x 1024 time-embedding layer alone would be 1 MB in fp32).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from assets.builders.flux import tiny_flux_vae

SEED = 0
TEXT_DIM = 32  # Qwen3 hidden size = the transformer's cap_feat_dim
# Qwen3's chat template, reduced to what prompts use (with its enable_thinking switch)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_tokenizer():
    """The tiny Qwen2 byte-level BPE of the Qwen-Image assets with Qwen3's chat template."""
    from assets.builders.qwen_image import build_tokenizer as qwen_tokenizer

    tok = qwen_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_text_encoder(tok):
    """A 3-layer Qwen3ForCausalLM (so the second-to-last hidden state is not the first layer's output)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=TEXT_DIM, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=1024, rope_theta=1000000.0, tie_word_embeddings=True,
                         bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    torch.manual_seed(SEED)
    return Qwen3ForCausalLM(config).eval()


def build_transformer(in_channels: int):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(SEED + 2)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=in_channels, dim=32, n_layers=2, n_refiner_layers=2,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=TEXT_DIM, rope_theta=256.0,
        t_scale=1000.0, axes_dims=[4, 6, 6], axes_lens=[1536, 512, 512]).eval()
    with torch.no_grad():  # no trivial init left (pad tokens start at zero, norms at one)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(torch.bfloat16)


def build(out: Path) -> list[Path]:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    tok = build_tokenizer()
    encoder = build_text_encoder(tok)
    torch.manual_seed(SEED + 1)
    vae = tiny_flux_vae()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=encoder.model, tokenizer=tok,
                          transformer=build_transformer(vae.config.latent_channels))
    folder = out / "z-image-tiny"
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "text_encoder")  # the released layout: the causal LM's checkpoint under a Qwen3Model entry
    encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    return [folder]
