"""What a model family declares about itself, once: the pipelines it serves and its transformer architectures.

Each family's file in pipelines/ ends with its `FAMILY`; gen/families.py builds the registries (model_index.json
class -> pipeline, checkpoint class -> our DiT) from those declarations, and the transforms of gen/transforms read a
DiT's blocks, sequence-parallel plan and step-cache layout from its `DiT`. Nothing else names a family's classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from gen.distributed.plans import ShardPlan
from gen.transforms.step_cache import CacheLayout


@dataclass(frozen=True)
class DiT:
    """One of our diffusion-transformer architectures and how the transforms applied from outside reach it."""

    checkpoint_class: str  # the `_class_name` of its config.json / model_index.json entry (diffusers' class)
    model: type[nn.Module]  # our implementation, parameter names = the checkpoint's keys
    config: type  # its config dataclass, fields = config.json keys
    blocks: tuple[str, ...]  # attributes holding the repeated blocks, in call order (compile, FP8, offload, cache)
    shard_plan: ShardPlan  # sequence parallel: what to split and gather (gen/distributed/apply.py)
    cache_layout: CacheLayout  # step cache: how the block lists chain (gen/transforms/step_cache.py)
    # batching concurrent generations (gen/transforms/batch.py): forward arguments concatenated along dim 0
    # (none: this DiT's calls are never batched), and text arguments padded along dim 1 -> their mask argument
    batch_args: tuple[str, ...] = ()
    batch_pad: tuple[tuple[str, str], ...] = ()
    # its one padded text leads the keys of every attention that takes its mask (and is the only masked part): a
    # merged forward runs those attentions row by row over the real keys, unmasked (gen.transforms.batch.RealKeysByRow)
    padded_text_leads_keys: bool = False
    # every step's adaLN modulations prepared at once (gen/transforms/modulation.py): the modules whose one input is
    # the model's time_embedding (none: not applied), and the call's timestep for a schedule value t, batch and dtype
    # (the expression the family's pipelines pass; they call this)
    modulations: Callable[[nn.Module], list[nn.Module]] | None = None
    call_timestep: Callable[[torch.Tensor, int, torch.dtype], torch.Tensor] | None = None
    # entry points besides forward that run weights (offload moves and streams around them): the model's, its blocks'
    entry_methods: tuple[str, ...] = ()
    block_methods: tuple[str, ...] = ()

    def __post_init__(self):
        assert len(self.cache_layout.streams) == len(self.blocks), (self.blocks, self.cache_layout)


@dataclass(frozen=True)
class Family:
    """A model family: the model_index.json pipeline classes it serves and the DiTs its pipelines run."""

    name: str
    pipelines: dict[str, type]  # model_index.json `_class_name` -> our pipeline class
    dits: tuple[DiT, ...]
