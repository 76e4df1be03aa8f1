"""Request and result types shared by the CLI, the Python API, the server and the consistency checker."""
from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from gen.png import encode_png


class GenError(ValueError):
    """A user-facing error about bad input: the message names the bad value (CLI exit code 2, HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Cancelled(RuntimeError):
    """Raised between denoising steps when the caller asked to stop (client gone, timeout, shutdown)."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a request: a .safetensors file (or a folder holding one; it must exist on every rank), its scale,
    and the transformer it targets (`None`: every transformer of the model; Wan2.2: "transformer" is the high-noise
    expert, "transformer_2" the low-noise one). Checked and applied by gen/lora and gen/transforms/lora.py."""

    path: str
    scale: float = 1.0
    target: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. `None` fields take the model family's defaults."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None  # video only
    fps: int | None = None  # video only
    images: tuple[Image.Image, ...] = ()  # edit / image-to-video inputs
    num_outputs: int = 1  # images per prompt (OpenAI `n`)
    enhance_prompt: bool = False
    loras: tuple[LoraSpec, ...] | None = None  # None: the set the model was loaded with; (): none

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)


# step (1-based), total steps. Called after every denoising step.
ProgressFn = Callable[[int, int], None]
# Returns True when the generation should stop; checked between steps.
CancelFn = Callable[[], bool]


@dataclass
class GenerationResult:
    """What a pipeline returns: images (image models) or frames (video models), plus how it was made."""

    seed: int
    images: list[Image.Image] = field(default_factory=list)
    frames: list[Image.Image] | None = None  # video: T frames of one clip
    fps: int | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage name -> seconds
    revised_prompt: str | None = None
    request: GenerationRequest | None = None

    @property
    def modality(self) -> str:
        return "video" if self.frames is not None else "image"

    def frames_array(self) -> np.ndarray:
        """Video frames as a uint8 array (T, H, W, 3)."""
        assert self.frames is not None, "not a video result"
        return np.stack([np.asarray(f.convert("RGB")) for f in self.frames])

    def save(self, path: str | os.PathLike, index: int = 0) -> Path:
        """Write the result atomically (temp file + rename): PNG/JPEG/WEBP for images, MP4 for video."""
        path = Path(path)
        suffix = path.suffix.lower()
        if self.frames is not None:
            if suffix != ".mp4":
                raise GenError(f"video output must be written to a .mp4 file, got {str(path)!r}", param="output")
            return _atomic_write(path, lambda tmp: write_mp4(tmp, self.frames, self.fps or 16))
        if suffix not in {".png", ".jpg", ".jpeg", ".webp"}:
            raise GenError(f"image output must end in .png, .jpg or .webp, got {str(path)!r}", param="output")
        fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}[suffix]
        data = image_bytes(self.images[index], fmt)
        return _atomic_write(path, lambda tmp: _write_bytes(tmp, data))


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before any work) when `path` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise GenError(f"output path {str(path)!r} is a directory", param="output")
    if not parent.is_dir():
        raise GenError(f"output directory {str(parent)!r} does not exist", param="output")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise GenError(f"output path {str(path)!r} is not writable", param="output")
    return path


def image_bytes(image: Image.Image, fmt: str, quality: int | None = None) -> bytes:
    """An output image encoded as PNG, JPEG or WEBP (RGB). PNG goes through gen/png.py: PIL's filters and deflate
    settings at zlib level 4 (lossless either way; ~3x faster than PIL's default 6 for about the same size), spread
    over threads (PIL encodes on one core: 0.15-0.21 s of a 1024^2 FLUX.1 / Qwen-Image generation on an H200 host).
    `quality` (JPEG/WEBP, 0-100) defaults to 95."""
    fmt = fmt.upper()
    rgb = image.convert("RGB")
    if fmt == "PNG":
        return encode_png(np.asarray(rgb))
    if fmt not in ("JPEG", "WEBP"):
        raise ValueError(f"image format must be PNG, JPEG or WEBP, got {fmt!r}")
    buf = io.BytesIO()
    rgb.save(buf, format=fmt, quality=95 if quality is None else quality)
    return buf.getvalue()


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the output gets the mode any new file gets
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    """The process umask (read without changing it where /proc tells it; else set and put back at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_mp4(path: str, frames: list[Image.Image], fps: int, check: Callable[[], None] | None = None) -> None:
    """Encode frames as H.264 MP4 through imageio-ffmpeg; `check()` before each frame (it raises to stop)."""
    import imageio.v2 as imageio

    writer = imageio.get_writer(str(path), format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                                macro_block_size=1, ffmpeg_log_level="error")
    try:
        for frame in frames:
            if check is not None:
                check()
            writer.append_data(np.asarray(frame.convert("RGB")))
    finally:
        writer.close()
