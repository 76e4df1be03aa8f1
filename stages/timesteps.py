"""Timestep schedules: the flow-matching sigma schedule with FLUX's resolution-dependent shift."""
from __future__ import annotations

import inspect

import numpy as np
import torch

from gen.types import GenError


def resolution_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """`mu` grows linearly with the number of image tokens (FLUX / Qwen-Image dynamic shifting)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def scheduler_shift(scheduler, image_seq_len: int) -> float:
    c = scheduler.config
    return resolution_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                            c.get("base_shift", 0.5), c.get("max_shift", 1.15))


def set_timesteps(scheduler, steps: int, device: torch.device, sigmas=None, mu: float | None = None) -> torch.Tensor:
    """Configure `scheduler` for `steps` steps and return its timesteps."""
    if steps <= 0:
        raise GenError(f"num_inference_steps must be positive, got {steps}", param="num_inference_steps")
    params = inspect.signature(scheduler.set_timesteps).parameters
    kwargs = {}
    if sigmas is not None and "sigmas" in params and not scheduler.config.get("use_flow_sigmas", False):
        kwargs["sigmas"] = sigmas
    else:
        kwargs["num_inference_steps"] = steps
    if mu is not None:
        kwargs["mu"] = mu
    scheduler.set_timesteps(device=device, **kwargs)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler.timesteps


def linear_sigmas(steps: int) -> np.ndarray:
    """1 -> 1/steps, the default sigma list FLUX and Qwen-Image pass to the scheduler."""
    return np.linspace(1.0, 1 / steps, steps)
