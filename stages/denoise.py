"""The denoising loop: model call per step (CFG lives in the pipeline's model function), scheduler step, progress.
`cancel` is asked before every step and once after the last (so a deadline passed during denoising stops the work
before the decode)."""
from __future__ import annotations

from typing import Callable

import torch

from gen.types import CancelFn, Cancelled, ProgressFn

# (latents, t, step_index) -> prediction with the latents' shape
ModelFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@torch.no_grad()
def denoise(model_fn: ModelFn, scheduler, latents: torch.Tensor, timesteps: torch.Tensor,
            progress: ProgressFn | None = None, cancel: CancelFn | None = None,
            preview: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """`preview(step, total, latents)` after each step (a pipeline's `previewer`, None when none is wanted)."""
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled before step {i + 1} of {total}")
        pred = model_fn(latents, t, i)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        if progress is not None:  # before the preview: a preview shown is never ahead of the progress reported
            progress(i + 1, total)
        if preview is not None:
            preview(i + 1, total, latents)
    if cancel is not None and cancel():
        raise Cancelled(f"cancelled after step {total} of {total}, before decoding")
    return latents


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)
