"""Shard plans, as data: where a transformer's per-token tensors are split and gathered. Each family declares its
DiT's plan in its pipeline file (`DiT.shard_plan`); gen/distributed/apply.py applies it. A split value is a sequence dim (int) or a small
function `(value, shard) -> value` for structured values, where `shard(tensor, dim)` cuts this rank's piece out.
Only tensors whose size at that dim equals the call's sequence length are split (a (B, 1) timestep is left alone).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import torch

Split = Union[int, Callable]


@dataclass(frozen=True)
class ShardPlan:
    split_inputs: dict[str, Split] = field(default_factory=dict)  # forward argument -> how to shard it
    split_outputs: dict[str, Split] = field(default_factory=dict)  # submodule -> how to shard its output
    split_methods: dict[str, Split] = field(default_factory=dict)  # model method -> how to shard its result
    split_args: dict[str, dict[str, Split]] = field(default_factory=dict)  # submodule pattern (* = one name) -> argument -> split
    gather: str = ""  # submodule whose output (B, L_shard, ...) is gathered along dim 1; "" = the model's output
    local_attention: tuple[str, ...] = ()  # submodule patterns whose attention stays on the rank (cross-attn)
    no_prefix: tuple[str, ...] = ()  # submodule patterns whose attention is over the sharded tokens alone (no text)
    # the replicated text leading joint attention: the forward argument whose dim 1 counts it, or
    # (model, forward arguments) -> its length when the model pads it (Z-Image)
    text_prefix: str | Callable | None = None
    # the text prefix's per-token inputs, split with it when it shards evenly and nothing masks it: the text is then
    # part of the sharded sequence (each rank's shard is [text piece, image piece]) instead of replicated on every rank
    text_inputs: dict[str, Split] = field(default_factory=dict)
    seq_len: Callable | None = None  # (model, forward arguments) -> sequence length, when inputs do not show it
    heads_attr: str = "num_attention_heads"  # config field with the head count (checked against ulysses_degree)


def each(dim: int) -> Callable:
    """Split every tensor of a tuple along `dim`."""
    return lambda value, shard: tuple(shard(t, dim) for t in value)


def first(split: Callable) -> Callable:
    """Apply `split` to the first element of a tuple, keep the rest."""
    return lambda value, shard: (split(value[0], shard), *value[1:])


def conv_tokens(y: torch.Tensor, shard) -> torch.Tensor:
    """A patch-embedding conv output (B, D, f, h, w) whose caller flattens dims 2.. into tokens: shard the
    flattened tokens and hand back (B, D, 1, 1, L_shard), which flattens to this rank's tokens."""
    return shard(y.flatten(2), 2)[:, :, None, None, :]
