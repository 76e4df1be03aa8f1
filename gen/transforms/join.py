"""Joined projections: the Linear layers of a block that read the same input become one matmul.

Each block class of our DiTs names its groups in a class attribute `joinable` (paths relative to the block, e.g.
("attn.to_q", "attn.to_k", "attn.to_v")); the block computes them with `gen.models.layers.project`, which runs one
matmul when the group was joined here and one per layer otherwise. Joining concatenates the group's weights into
one tensor and turns each layer's weight and bias into a view of it, so parameter names, state_dict keys and the
memory held do not change. A wider matmul fills the GPU better (fewer partial waves of tiles, one launch instead of
three or four); the arithmetic per output element is the same, so the result equals the unjoined model up to the
summation order the matmul kernel picks.

Join last, after loading and moving the model: a later `.to()` gives the layers and the joined tensor separate
copies (still correct, memory doubled) and a later `load_state_dict` would update the layers only. Layers that are
no longer plain nn.Linear (FP8, gen/transforms/fp8.py) are left alone. `unjoin_projections` gives each layer its own
weight again (same values).
"""
from __future__ import annotations

import torch
from torch import nn


def join_linears(layers: list[nn.Linear]) -> None:
    """Give `layers` (same input size, all with or all without bias) one shared weight; see the module doc."""
    if len({l.in_features for l in layers}) != 1:
        raise ValueError(f"cannot join Linear layers of different input sizes {[l.in_features for l in layers]}")
    if len({l.bias is None for l in layers}) != 1:
        raise ValueError("cannot join Linear layers where only some have a bias")
    with torch.no_grad():
        weight = torch.cat([l.weight for l in layers])
        bias = None if layers[0].bias is None else torch.cat([l.bias for l in layers])
    start = 0
    for layer in layers:
        end = start + layer.out_features
        layer.weight = nn.Parameter(weight[start:end], requires_grad=layer.weight.requires_grad)
        if bias is not None:
            layer.bias = nn.Parameter(bias[start:end], requires_grad=layer.bias.requires_grad)
        start = end
    first = layers[0]
    first.register_buffer("joined_weight", weight, persistent=False)
    first.register_buffer("joined_bias", bias, persistent=False)
    first.joined_sizes = [l.out_features for l in layers]


def join_projections(model: nn.Module) -> int:
    """Join every group the model's blocks declare (`joinable`) whose layers are plain nn.Linear; returns the count."""
    n = 0
    for module in model.modules():
        for group in getattr(type(module), "joinable", ()):
            layers = [module.get_submodule(path) for path in group]
            if all(type(layer) is nn.Linear for layer in layers) and not hasattr(layers[0], "joined_sizes"):
                join_linears(layers)
                n += 1
    return n


def unjoin_projections(model: nn.Module) -> int:
    """Undo join_projections: each joined layer gets its own weight and bias (copies of its slice, same values)."""
    n = 0
    for module in model.modules():
        for group in getattr(type(module), "joinable", ()):
            layers = [module.get_submodule(path) for path in group]
            if not hasattr(layers[0], "joined_sizes"):
                continue
            with torch.no_grad():
                for layer in layers:
                    layer.weight = nn.Parameter(layer.weight.clone(), requires_grad=layer.weight.requires_grad)
                    if layer.bias is not None:
                        layer.bias = nn.Parameter(layer.bias.clone(), requires_grad=layer.bias.requires_grad)
            first = layers[0]
            del first.joined_weight, first.joined_bias, first.joined_sizes
            n += 1
    return n
