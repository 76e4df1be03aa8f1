"""Per-model shard plans, as data: where a transformer's per-token tensors are split and gathered.

Not the mechanism that applies them (gen/distributed/apply.py). A split value is a sequence dim (int) or a small
function `(value, shard) -> value` for structured values, where `shard(tensor, dim)` cuts this rank's piece out.
Only tensors whose size at that dim equals the call's sequence length are split (a (B, 1) timestep is left alone).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

Split = Union[int, Callable]


@dataclass(frozen=True)
class ShardPlan:
    split_inputs: dict[str, Split] = field(default_factory=dict)  # forward argument -> how to shard it
    split_outputs: dict[str, Split] = field(default_factory=dict)  # submodule -> how to shard its output
    split_methods: dict[str, Split] = field(default_factory=dict)  # model method -> how to shard its result
    split_args: dict[str, dict[int, Split]] = field(default_factory=dict)  # submodule glob -> positional arg -> split
    gather: str = ""  # submodule whose output (B, L_shard, ...) is gathered along dim 1; "" = the model's output
    local_attention: tuple[str, ...] = ()  # submodule globs whose attention stays on the rank (cross-attention)
    text_prefix: str | None = None  # forward argument whose dim 1 counts the replicated text leading joint attention
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


PLANS: dict[str, ShardPlan] = {
    # FLUX: packed latents and their position ids are the per-token inputs; RoPE is computed from the ids.
    "FluxTransformer": ShardPlan(
        split_inputs={"hidden_states": 1, "img_ids": -2},
        text_prefix="encoder_hidden_states",
    ),
    # Wan patchifies inside: shard the patch embedding's tokens, the 3D RoPE and a per-token (B, L) timestep
    # (Wan2.2 TI2V); gather before unpatchify. Cross-attention sees the whole text.
    "WanTransformer": ShardPlan(
        seq_len=lambda model, args: math.prod(
            n // p for n, p in zip(args["hidden_states"].shape[2:], model.config.patch_size)),
        split_inputs={"timestep": 1},
        split_outputs={"patch_embedding": conv_tokens},
        split_methods={"rope": each(1)},
        gather="proj_out",
        local_attention=("blocks.*.attn2",),
    ),
    # Qwen-Image: shard the embedded image tokens, the image half of RoPE and the per-token modulation index.
    "QwenImageTransformer": ShardPlan(
        split_outputs={"img_in": 1},
        split_methods={"rope": first(each(0))},
        split_args={"transformer_blocks.*": {5: 1}},
        gather="proj_out",
        text_prefix="encoder_hidden_states",
    ),
}


def plan_for(model: torch.nn.Module) -> ShardPlan:
    name = type(model).__name__
    if name not in PLANS:
        raise ValueError(f"no sequence-parallel plan for {name}; known: {sorted(PLANS)}")
    return PLANS[name]
