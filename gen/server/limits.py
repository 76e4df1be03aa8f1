"""Admission limits of one server: what a request may cost (pixels, frames, images, steps, prompt tokens, their
product, and the memory to decode a video), with defaults sized to the loaded model.

Checked before a request is queued; a request over a limit is a GenError (HTTP 400) naming the field and the limit.
Not the request's validity (Generator.validate) and not HTTP.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import threading
from dataclasses import dataclass

import torch

from gen.types import GenError, GenerationRequest

log = logging.getLogger(__name__)
SANE_TOKENIZER_MAX = 100_000  # model_max_length above this is a tokenizer's "no limit" placeholder
DEFAULT_PROMPT_TOKENS = 1024  # when the model's tokenizers state no usable limit
CHARS_PER_TOKEN = 16  # a prompt longer than this many characters per allowed token is refused before tokenizing


class OverLimit(GenError):
    """A request over one of the server's limits (HTTP 400 with `code`)."""

    def __init__(self, message: str, param: str | None, code: str = "limit_exceeded"):
        super().__init__(message, param=param)
        self.code = code


@dataclass(frozen=True)
class Limits:
    """The most one request may ask for. `max_work` is in default generations: a request costs
    n x pixels x frames x steps divided by the model's default request's pixels x frames x steps."""

    max_pixels: int
    max_steps: int
    max_n: int
    max_prompt_tokens: int
    max_work: float
    max_frames: int | None = None  # video models
    max_decode_bytes: int | None = None  # video models: the memory a decode may need

    def __post_init__(self):
        for name in ("max_pixels", "max_steps", "max_n", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise GenError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}", param=name)
        if self.max_work <= 0:
            raise GenError(f"--max-work must be > 0, got {self.max_work}", param="max_work")
        if self.max_frames is not None and self.max_frames < 1:
            raise GenError(f"--max-frames must be >= 1, got {self.max_frames}", param="max_frames")

    @classmethod
    def for_model(cls, generator, *, max_pixels: int | None = None, max_frames: int | None = None,
                  max_steps: int | None = None, max_n: int | None = None, max_prompt_tokens: int | None = None,
                  max_work: float | None = None, max_decode_gb: float | None = None) -> "Limits":
        """Limits for `generator`'s model; each None takes the default sized to the model (docs/SERVING.md)."""
        d = generator.defaults
        video = generator.modality == "video"
        frames = None
        if video:
            frames = max_frames if max_frames is not None else 2 * (d.num_frames - 1) + 1
        decode = None
        if video:
            decode = int(max_decode_gb * 2**30) if max_decode_gb is not None else default_decode_budget(generator)
        return cls(max_pixels=max_pixels if max_pixels is not None else max(4 * d.height * d.width, 256 * 256),
                   max_steps=max_steps if max_steps is not None else max(2 * d.num_inference_steps, 50),
                   max_n=max_n if max_n is not None else 10,
                   max_prompt_tokens=(max_prompt_tokens if max_prompt_tokens is not None
                                      else model_tokenizer(generator)[1]),
                   max_work=max_work if max_work is not None else 8.0, max_frames=frames, max_decode_bytes=decode)

    def describe(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class Budget:
    """Checks filled-in requests against a server's Limits for one model."""

    def __init__(self, generator, limits: Limits):
        self.generator, self.limits = generator, limits
        self.counter = PromptCounter(generator)
        d = generator.defaults
        self.unit = d.height * d.width * (d.num_frames or 1) * d.num_inference_steps  # one default generation

    def check_prompts(self, req: GenerationRequest) -> None:
        """The prompts' characters and token counts (before validation, so that these errors carry their codes)."""
        if isinstance(req.prompt, str):
            self.check_prompt(req.prompt, "prompt")
        if isinstance(req.negative_prompt, str) and req.negative_prompt:
            self.check_prompt(req.negative_prompt, "negative_prompt")

    def check(self, req: GenerationRequest) -> None:
        """`req` (validated, defaults filled; its prompts checked by `check_prompts`) within every limit, else
        OverLimit naming the field."""
        lim = self.limits
        pixels = req.height * req.width
        if pixels > lim.max_pixels:
            raise OverLimit(f"size {req.width}x{req.height} is {pixels} pixels; this server allows at most "
                            f"{lim.max_pixels} (--max-pixels)", "size")
        if req.num_inference_steps > lim.max_steps:
            raise OverLimit(f"num_inference_steps {req.num_inference_steps} is more than this server's limit of "
                            f"{lim.max_steps} (--max-steps)", "num_inference_steps")
        if req.num_outputs > lim.max_n:
            raise OverLimit(f"n {req.num_outputs} is more than this server's limit of {lim.max_n} (--max-n)", "n")
        frames = req.num_frames or 1
        if lim.max_frames is not None and frames > lim.max_frames:
            raise OverLimit(f"num_frames {frames} is more than this server's limit of {lim.max_frames} "
                            "(--max-frames)", "num_frames")
        work = req.num_outputs * pixels * frames * req.num_inference_steps / self.unit
        if work > lim.max_work:
            raise OverLimit(f"this request costs {work:.3g} default generations (n {req.num_outputs} x "
                            f"{req.width}x{req.height} x {frames} frame(s) x {req.num_inference_steps} steps); this "
                            f"server allows at most {lim.max_work:g} (--max-work)", self._costliest(req))
        if lim.max_decode_bytes is not None:
            need = decode_bytes(self.generator, req)
            if need > lim.max_decode_bytes:
                hint = "" if vae_tiling(self.generator) else "; a server started with --vae-tiling needs far less"
                raise OverLimit(f"decoding {frames} frames of {req.width}x{req.height} needs about "
                                f"{need / 2**30:.2f} GiB; this server allows {lim.max_decode_bytes / 2**30:.2f} GiB "
                                f"(--max-decode-gb){hint}", "size", "too_large_to_decode")

    def check_prompt(self, text: str, param: str) -> None:
        """Characters every encoder takes, and not more tokens than the limit."""
        limit = self.limits.max_prompt_tokens
        if len(text) > CHARS_PER_TOKEN * limit:
            raise OverLimit(f"{param} is {len(text)} characters; this server allows at most {limit} tokens "
                            f"(--max-prompt-tokens)", param, "prompt_too_long")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise OverLimit(f"{param} holds a character that cannot be encoded ({text[e.start]!r} at position "
                            f"{e.start}, an unpaired surrogate)", param, "invalid_characters") from None
        if "\x00" in text:
            raise OverLimit(f"{param} holds a NUL character at position {text.index(chr(0))}", param,
                            "invalid_characters")
        tokens = self.counter.count(text)
        if tokens > limit:
            raise OverLimit(f"{param} is {tokens} tokens; this server allows at most {limit} (--max-prompt-tokens)",
                            param, "prompt_too_long")

    def _costliest(self, req: GenerationRequest) -> str:
        """The field furthest above the model's default, named by a work-budget error."""
        d = self.generator.defaults
        ratios = {"n": req.num_outputs, "size": req.height * req.width / (d.height * d.width),
                  "num_inference_steps": req.num_inference_steps / d.num_inference_steps}
        if req.num_frames:
            ratios["num_frames"] = req.num_frames / d.num_frames
        return max(ratios, key=ratios.get)


class PromptCounter:
    """Counts a prompt's tokens with the model's tokenizer (a private copy, used under a lock: tokenizers switch
    settings between calls and are not shared between threads), else its UTF-8 bytes, an upper bound for the
    byte-level tokenizers of LLM encoders."""

    def __init__(self, generator):
        chosen, _ = model_tokenizer(generator)
        self.tokenizer = copy.deepcopy(chosen) if chosen is not None else None
        self._lock = threading.Lock()

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.encode("utf-8"))
        with self._lock:
            return len(self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])


def model_tokenizer(generator) -> tuple[object | None, int]:
    """The tokenizer whose limit is the model's prompt limit (the longest of `tokenizer`, `tokenizer_2`), and that
    limit; (None, DEFAULT_PROMPT_TOKENS) without one (an LLM encoder's own tokenizer is not a component)."""
    components = getattr(generator.pipeline, "components", None)
    tokenizers = [t for slot in ("tokenizer", "tokenizer_2")
                  if callable(t := components.get(slot) if components is not None else None)]
    sane = [t for t in tokenizers if isinstance(getattr(t, "model_max_length", None), int)
            and 0 < t.model_max_length <= SANE_TOKENIZER_MAX]
    if sane:
        chosen = max(sane, key=lambda t: t.model_max_length)
        return chosen, chosen.model_max_length
    return (tokenizers[0] if tokenizers else None), DEFAULT_PROMPT_TOKENS


# --- memory to decode a video


def vae_tiling(generator) -> bool:
    components = getattr(generator.pipeline, "components", None)
    vae = components.get("vae") if components is not None else None
    return bool(getattr(vae, "use_tiling", False))


def decode_bytes(generator, req: GenerationRequest) -> int:
    """Estimated peak memory of decoding `req`'s video and holding its frames: the decoded clip (fp32, a float copy,
    uint8 frames) plus the decoder's full-resolution activations over a chunk of 4 frames (a tile when tiling)."""
    components = getattr(generator.pipeline, "components", None)
    vae = components.get("vae") if components is not None else None
    cfg = getattr(vae, "config", None) or {}
    if cfg.get("block_out_channels"):
        channels = cfg["block_out_channels"][0]
    else:
        channels = (cfg.get("decoder_base_dim") or cfg.get("base_dim") or 128) * (cfg.get("dim_mult") or [1])[0]
    dtype = getattr(generator.pipeline, "dtype", torch.float32)
    h, w = req.height, req.width
    if vae_tiling(generator):
        h, w = min(h, 512), min(w, 512)
    frames = req.num_frames or 1
    clip = frames * req.height * req.width * 3 * (4 + 4 + 1)
    activations = 4 * h * w * channels * torch.finfo(dtype).bits // 8 * 8
    return clip + activations


def default_decode_budget(generator) -> int:
    """90% of the memory free on the model's device now (after loading): what one decode may take."""
    device = getattr(generator.pipeline, "device", torch.device("cpu"))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        free = _mem_available()
    return int(0.9 * free)


def _mem_available() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError as e:
        log.warning("cannot read /proc/meminfo (%s); using the physical memory size as the decode budget", e)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
