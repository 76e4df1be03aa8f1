"""Text encoding stages for the encoder kinds the families share: CLIP pooled output and T5-style sequences."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _tokenize(tokenizer, prompts: list[str], max_length: int):
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > max_length:
        log.warning("prompt truncated to %d tokens", max_length)
    return ids


@torch.no_grad()
def encode_clip_pooled(tokenizer, text_encoder, prompts: list[str], device: torch.device, dtype: torch.dtype,
                       max_length: int | None = None) -> torch.Tensor:
    """CLIP text model's pooled output, (B, D)."""
    max_length = max_length or tokenizer.model_max_length
    ids = _tokenize(tokenizer, prompts, max_length).input_ids
    out = text_encoder(ids.to(text_encoder.device), output_hidden_states=False)
    return out.pooler_output.to(device=device, dtype=dtype)


@torch.no_grad()
def encode_t5(tokenizer, text_encoder, prompts: list[str], max_length: int, device: torch.device,
              dtype: torch.dtype, masked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """T5/UMT5 encoder last hidden states (B, max_length, D) and the token mask (B, max_length).

    `masked=False` lets padding tokens attend as FLUX's reference pipeline does (its T5 runs without a mask).
    """
    tokens = _tokenize(tokenizer, prompts, max_length)
    mask = tokens.attention_mask
    enc_mask = mask.to(text_encoder.device) if masked else None
    hidden = text_encoder(tokens.input_ids.to(text_encoder.device), attention_mask=enc_mask)[0]
    return hidden.to(device=device, dtype=dtype), mask.to(device)
