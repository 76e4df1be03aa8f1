"""VAE decode settings applied from outside the model (diffusers' VAE classes): memory format, compile, tiling."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gen.types import GenError


def set_memory_format(vae: nn.Module, channels_last: bool) -> None:
    """Conv weights in channels-last order (channels_last for Conv2d, channels_last_3d for Conv3d) or back in the
    default order; activations follow the weights' order through the convs."""
    for m in vae.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            fmt = (torch.channels_last if isinstance(m, nn.Conv2d) else torch.channels_last_3d) if channels_last \
                else torch.contiguous_format
            m.weight.data = m.weight.data.contiguous(memory_format=fmt)


def is_3d(vae: nn.Module) -> bool:
    """A video VAE (Conv3d layers: Wan's, Qwen-Image's)?"""
    return any(isinstance(m, nn.Conv3d) for m in vae.modules())


def tune_vae(vae: nn.Module, channels_last: bool = False, compile: bool = False,
             tiling: bool = False) -> Callable[[], None]:
    """Apply the chosen settings to `vae` in place; returns a function that undoes them.

    `channels_last`: conv weights (and so activations) in channels-last order, which cuDNN's fastest conv kernels
    read; `compile`: torch.compile the decoder; `tiling`: decode in overlapping tiles (diffusers' `enable_tiling`),
    which bounds peak memory for large images and long videos at some cost in time."""
    undo: list[Callable[[], None]] = []
    if channels_last:
        set_memory_format(vae, True)
        undo.append(lambda: set_memory_format(vae, False))
    if compile:
        vae.decoder.compile()
        undo.append(lambda: setattr(vae.decoder, "_compiled_call_impl", None))
    if tiling:
        if not hasattr(vae, "enable_tiling"):
            raise GenError(f"vae_tiling: {type(vae).__name__} has no tiled decode", param="vae_tiling")
        vae.enable_tiling()
        undo.append(vae.disable_tiling)

    def restore() -> None:
        for fn in reversed(undo):
            fn()

    return restore
