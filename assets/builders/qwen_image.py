"""Builds the tiny Qwen-Image checkpoints (text-to-image, edit, edit-plus) in the diffusers layout, written by
diffusers'/transformers' own save_pretrained with real config keys and tiny dims. Not a test; run it to (re)build:

    python -m assets.build_assets qwen_image
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import torch

from assets.builders.common import bytes_to_unicode
from pipelines.qwen_image import EDIT_SYSTEM, T2I_TEMPLATE

SEED = 0
TEXT_DIM = 32  # Qwen2.5-VL hidden size = the transformer's joint_attention_dim
Z_DIM = 4  # VAE latent channels; the transformer sees 2x2 patches of them

# Text the tiny BPE learns its merges from: the pipelines' templates plus a few words prompts use.
CORPUS = " ".join([T2I_TEMPLATE, EDIT_SYSTEM, "Picture 1: Picture 2: a an the red green blue cat dog sitting on grass "
                   "in with photo of turn make it"])
NUM_MERGES = 400
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------- tokenizer: a fixed byte-level BPE

def _words(text: str) -> list[str]:
    """Pre-tokenize as Qwen2's tokenizer does (its split regex), then map bytes to BPE characters."""
    import regex

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
    b2u = bytes_to_unicode()
    text = regex.sub("|".join(regex.escape(t) for t in SPECIAL_TOKENS), "\n", text)
    return ["".join(b2u[b] for b in piece.encode()) for piece in regex.findall(pattern, text)]


def tiny_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges learned from CORPUS by plain BPE: most frequent pair first, ties broken by the pair itself,
    so the result is the same on every run and machine."""
    words = Counter(tuple(w) for w in _words(CORPUS))
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = []
    for _ in range(NUM_MERGES):
        pairs = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        merged = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return vocab, merges


def build_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = tiny_bpe()
    for t in SPECIAL_TOKENS:
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=list(merges))
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    assert all(tok.convert_tokens_to_ids(t) == vocab[t] for t in SPECIAL_TOKENS)
    return tok


# ---------------------------------------------------------------- components

def build_text_encoder(tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab_size = (len(tok) + 63) // 64 * 64
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
                         bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>")),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_DIM,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        vocab_size=vocab_size, **ids)
    torch.manual_seed(SEED)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def save_processor(tok, folder: Path) -> None:
    """The `processor` folder of an edit checkpoint: tokenizer + Qwen2-VL image processor, each saved by
    transformers' own save_pretrained (Qwen2VLProcessor itself cannot be built without torchvision)."""
    from transformers import Qwen2VLImageProcessorPil

    # real patch / merge sizes; a small max_pixels keeps the vision tower's input at most 112 x 112 pixels
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    tok.save_pretrained(folder)
    images.save_pretrained(folder)


def build_vae():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(SEED + 1)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0,
        latents_mean=[-0.2, 0.1, 0.05, -0.1], latents_std=[1.5, 2.0, 1.8, 2.2]).eval()


def build_transformer(zero_cond_t: bool = False):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(SEED + 2)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=Z_DIM * 4, out_channels=Z_DIM, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
        zero_cond_t=zero_cond_t).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make the output layers clearly non-trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")


def build(out: Path) -> list[Path]:
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline

    tok = build_tokenizer()
    common = dict(scheduler=build_scheduler(), vae=build_vae(), text_encoder=build_text_encoder(tok), tokenizer=tok)
    pipes = {
        "qwen-image-tiny": QwenImagePipeline(transformer=build_transformer(), **common),
        "qwen-image-edit-tiny": QwenImageEditPipeline(transformer=build_transformer(), processor=None, **common),
        "qwen-image-edit-plus-tiny": QwenImageEditPlusPipeline(transformer=build_transformer(zero_cond_t=True),
                                                               processor=None, **common),
    }
    written = []
    for name, pipe in pipes.items():
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        pipe.save_pretrained(folder, safe_serialization=True)
        if "edit" in name:
            save_processor(tok, folder / "processor")
            index = json.loads((folder / "model_index.json").read_text())
            index["processor"] = ["transformers", "Qwen2VLProcessor"]
            (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(folder)
    return written
