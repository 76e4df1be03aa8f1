"""Speed-ups applied to a loaded pipeline from outside the model files, each small and opt-out."""
from __future__ import annotations

import logging

import torch
from torch import nn

from gen.models.attention import select_attention_backend

log = logging.getLogger(__name__)

# module attributes that hold a model's repeated blocks, per architecture
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Regional torch.compile: compile each repeated block once (same code, so one graph reused); returns the count."""
    n = 0
    for attr in BLOCK_LISTS:
        for block in getattr(model, attr, None) or []:
            block.compile(**compile_kwargs)
            n += 1
    return n


def optimize(pipeline, compile: bool = False, attention: str = "auto") -> dict:
    """Choose the attention backend for the pipeline's device and dtype; optionally compile the blocks of its DiTs."""
    applied = {"attention": select_attention_backend(pipeline.device, pipeline.dtype, attention)}
    if compile:
        blocks = 0
        for slot in ("transformer", "transformer_2"):
            model = pipeline.components.get(slot)
            if isinstance(model, nn.Module):
                blocks += compile_blocks(model)
        applied["compiled_blocks"] = blocks
    log.info("optimizations: %s", applied)
    return applied


__all__ = ["compile_blocks", "optimize", "torch"]
