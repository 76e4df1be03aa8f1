"""Input validation: fills a request's unset fields from the family defaults and rejects bad values by name."""
from __future__ import annotations

import random
from dataclasses import dataclass

from gen.types import GenError, GenerationRequest

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class FamilyDefaults:
    """A model family's defaults and limits."""

    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    true_cfg_scale: float = 1.0
    num_frames: int | None = None  # video families only
    fps: int | None = None
    size_multiple: int = 16
    max_side: int = 4096
    max_steps: int = 1000


def validate_request(req: GenerationRequest, d: FamilyDefaults, video: bool = False) -> GenerationRequest:
    """Return `req` with defaults filled in, or raise GenError naming the bad field."""
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise GenError("prompt must be a non-empty string", param="prompt")
    if req.negative_prompt is not None and not isinstance(req.negative_prompt, str):
        raise GenError("negative_prompt must be a string", param="negative_prompt")
    for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
        if text is None:
            continue
        if "\x00" in text:
            raise GenError(f"{name} contains a NUL character (position {text.index(chr(0))})", param=name)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise GenError(f"{name} is not valid Unicode text (a lone surrogate at position {e.start})",
                           param=name) from None
    seed = req.seed if req.seed is not None else random.randint(0, 2**31 - 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise GenError(f"seed must be an integer in [0, 2**63), got {req.seed!r}", param="seed")
    steps = _int(req.num_inference_steps, d.num_inference_steps, "num_inference_steps", 1, d.max_steps)
    height = _int(req.height, d.height, "height", d.size_multiple, d.max_side)
    width = _int(req.width, d.width, "width", d.size_multiple, d.max_side)
    for name, value in (("height", height), ("width", width)):
        if value % d.size_multiple:
            raise GenError(f"{name} must be a multiple of {d.size_multiple}, got {value}", param=name)
    guidance = _float(req.guidance_scale, d.guidance_scale, "guidance_scale")
    true_cfg = _float(req.true_cfg_scale, d.true_cfg_scale, "true_cfg_scale")
    n = _int(req.num_outputs, 1, "n", 1, 10)
    frames = fps = None
    if video:
        frames = _int(req.num_frames, d.num_frames, "num_frames", 1, 1025)
        if (frames - 1) % 4:
            raise GenError(f"num_frames must be 4k+1 (e.g. 5, 9, ..., 81), got {frames}", param="num_frames")
        fps = _int(req.fps, d.fps, "fps", 1, 120)
    else:
        if req.num_frames is not None:
            raise GenError("num_frames is only valid for video models", param="num_frames")
    return req.replace(seed=seed, num_inference_steps=steps, height=height, width=width, guidance_scale=guidance,
                       true_cfg_scale=true_cfg, num_outputs=n, num_frames=frames, fps=fps)


def _int(value, default, name: str, lo: int, hi: int) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenError(f"{name} must be an integer, got {value!r}", param=name)
    if not lo <= value <= hi:
        raise GenError(f"{name} must be between {lo} and {hi}, got {value}", param=name)
    return value


def _float(value, default, name: str) -> float:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise GenError(f"{name} must be a number, got {value!r}", param=name)
    if not 0 <= value <= 100:
        raise GenError(f"{name} must be between 0 and 100, got {value}", param=name)
    return float(value)
