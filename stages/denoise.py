"""The denoising loop: model call per step (CFG lives in the pipeline's model function), scheduler step, progress.
`cancel` is asked before every step and once after the last (so a deadline passed during denoising stops the work
before the decode)."""
from __future__ import annotations

import threading
from typing import Callable

import torch

from gen.types import CancelFn, Cancelled, ProgressFn

# (latents, t, step_index) -> prediction with the latents' shape
ModelFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]

_STEP = threading.local()


def current_step() -> tuple[int, torch.Tensor] | None:
    """(step index, the whole timestep schedule) while this thread's denoise loop runs its model function, else None:
    what a transform that prepares every step's work at once reads (gen/transforms/modulation.py)."""
    return getattr(_STEP, "value", None)


@torch.no_grad()
def denoise(model_fn: ModelFn, scheduler, latents: torch.Tensor, timesteps: torch.Tensor,
            progress: ProgressFn | None = None, cancel: CancelFn | None = None,
            preview: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """`preview(step, total, latents)` after each step (a pipeline's `previewer`, None when none is wanted)."""
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled before step {i + 1} of {total}")
        _STEP.value = (i, timesteps)
        try:
            pred = model_fn(latents, t, i)
        finally:
            _STEP.value = None
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
