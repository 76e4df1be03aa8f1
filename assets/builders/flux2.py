"""Builds the tiny FLUX.2 checkpoints in the diffusers layout, written by diffusers' and transformers' own
save_pretrained with real config keys and tiny dims. Not a test; run it to (re)build:

    python -m assets.build_assets flux2

assets/flux2-tiny ([dev], Flux2Pipeline): a 32-layer Mistral3ForConditionalGeneration (tiny Pixtral tower included,
as released; the pipeline reads text layers 10, 20, 30) and, as FLUX.2-dev ships it, a PixtralProcessor `tokenizer`
folder (model_index.json names PixtralProcessor; its tokenizer is a byte-level BPE with Mistral's special tokens and
a Mistral-3.1-shaped chat template of ours; its image processor config is written but never used).
assets/flux2-klein-tiny ([klein] base, Flux2KleinPipeline, is_distilled false): a 28-layer Qwen3ForCausalLM (layers 9,
18, 27 are read) with the tiny Qwen tokenizer and Qwen3 chat template of the Z-Image asset.
Both: the FLUX.2 VAE layout (AutoencoderKLFlux2, tiny widths, 4 latent channels -> 16 patchified) with non-trivial
batch-norm statistics, and a 2 + 2 block Flux2Transformer2DModel (with guidance embedding for [dev]).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

SEED = 0
TEXT_DIM = 16  # hidden size of both tiny text encoders; the transformer reads 3 layers of it
LATENT_CHANNELS = 4
MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                   "[IMG_BREAK]", "[IMG_END]", "<pad>"]
# Mistral-Small-3.1's template reduced to what FLUX.2 sends (system and user turns, text and image blocks)
MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system + '[/SYSTEM_PROMPT]' }}"
    "{%- for m in turns %}{%- if m['role'] == 'user' %}{{- '[INST]' }}"
    "{%- if m['content'] is string %}{{- m['content'] }}{%- else %}{%- for block in m['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}{%- elif block['type'] in ['image', 'image_url'] %}"
    "{{- '[IMG]' }}{%- endif %}{%- endfor %}{%- endif %}{{- '[/INST]' }}"
    "{%- elif m['role'] == 'assistant' %}{{- m['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
PROCESSOR_CONFIG = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]",
                    "patch_size": 14, "processor_class": "PixtralProcessor", "spatial_merge_size": 2}


def mistral_tokenizer():
    """Byte-level BPE (the tiny Qwen-Image vocabulary and merges, Qwen's split regex) after Mistral's special tokens;
    a plain call adds the bos token, as Mistral's tokenizer does."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from assets.builders.qwen_image import tiny_bpe

    bpe_vocab, merges = tiny_bpe()
    vocab = {t: i for i, t in enumerate(MISTRAL_SPECIAL)}
    vocab.update({piece: len(MISTRAL_SPECIAL) + i for piece, i in bpe_vocab.items()})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(MISTRAL_SPECIAL)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", chat_template=MISTRAL_TEMPLATE)
    assert [tok.convert_tokens_to_ids(t) for t in MISTRAL_SPECIAL] == list(range(len(MISTRAL_SPECIAL)))
    return tok


def mistral_encoder(tok):
    """Mistral3ForConditionalGeneration: a 32-layer text decoder (head_dim != hidden / heads as in the real one) and
    a one-layer Pixtral tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=TEXT_DIM,
                         intermediate_size=32, num_hidden_layers=32, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=12, max_position_embeddings=1024, rms_norm_eps=1e-5, sliding_window=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0},
                         tie_word_embeddings=False, **ids),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=56, patch_size=14),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2, tie_word_embeddings=False, **ids)
    torch.manual_seed(SEED)
    return Mistral3ForConditionalGeneration(config).eval()


def qwen3_encoder(tok):
    """Qwen3ForCausalLM, 28 layers, tied embeddings (as Qwen3-4B)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=TEXT_DIM, intermediate_size=32,
                         num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=1024, rope_theta=1000000.0, tie_word_embeddings=True,
                         bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    torch.manual_seed(SEED)
    return Qwen3ForCausalLM(config).eval()


def tiny_vae():
    """AutoencoderKLFlux2's layout (32 latent channels in the real one), 8x downsampling, tiny widths; batch-norm
    running statistics set away from (0, 1) so the latent normalization shows."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(SEED + 1)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                             layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=128)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae.eval()


def tiny_transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(SEED + 2)
    model = Flux2Transformer2DModel(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * TEXT_DIM,
                                    timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
                                    rope_theta=2000, guidance_embeds=guidance_embeds).eval()
    with torch.no_grad():  # no trivial init left (RMSNorm weights start at one)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096, time_shift_type="exponential")


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    return folder


def build_dev(root: Path) -> Path:
    from diffusers import Flux2Pipeline
    from transformers import PixtralImageProcessorPil

    tok = mistral_tokenizer()
    pipe = Flux2Pipeline(scheduler=scheduler(), vae=tiny_vae(), text_encoder=mistral_encoder(tok), tokenizer=tok,
                         transformer=tiny_transformer(guidance_embeds=True))
    folder = _fresh(root / "flux2-tiny")
    pipe.save_pretrained(folder, safe_serialization=True)
    # the released layout: a PixtralProcessor folder (tokenizer + image processor + processor config)
    PixtralImageProcessorPil(patch_size={"height": 14, "width": 14}).save_pretrained(folder / "tokenizer")
    (folder / "tokenizer" / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2) + "\n")
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def build_klein(root: Path) -> Path:
    from diffusers import Flux2KleinPipeline

    from assets.builders.z_image import build_tokenizer

    tok = build_tokenizer()
    pipe = Flux2KleinPipeline(scheduler=scheduler(), vae=tiny_vae(), text_encoder=qwen3_encoder(tok), tokenizer=tok,
                              transformer=tiny_transformer(guidance_embeds=False), is_distilled=False)
    folder = _fresh(root / "flux2-klein-tiny")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build(root: Path) -> list[Path]:
    return [build_dev(root), build_klein(root)]
