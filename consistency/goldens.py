"""Golden outputs on disk: <root>/<safe case id>/ranks-<n>/ with PNG frames and a metadata.json saying how they were made."""
from __future__ import annotations

import datetime
import json
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from consistency.cases import Case
from gen.types import GenError

SOURCES = ("reference-diffusers", "gen")
METADATA = "metadata.json"


@dataclass
class Golden:
    path: Path
    frames: list[np.ndarray]  # (H, W, 3) uint8 each; one for images
    metadata: dict


def golden_dir(root: Path, case: Case) -> Path:
    return Path(root) / case.safe_id / f"ranks-{case.ranks}"


def exists(root: Path, case: Case) -> bool:
    return (golden_dir(root, case) / METADATA).is_file()


def frame_names(modality: str, count: int) -> list[str]:
    return ["image.png"] if modality == "image" else [f"frame-{i:04d}.png" for i in range(count)]


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    import gen

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "gen": gen.__version__, "python": platform.python_version()}


def write_golden(root: Path, case: Case, frames: list[Image.Image], *, source: str, device: str, dtype: str,
                 pipeline: str, fps: int | None, force: bool) -> Path:
    """Write one case's golden (atomically: a temp folder renamed into place); refuses to overwrite without force."""
    assert source in SOURCES, source
    assert frames, "no frames to write"
    out = golden_dir(root, case)
    if out.exists() and not force:
        raise GenError(f"golden {out} already exists; pass --force to overwrite it")
    if case.modality == "image" and len(frames) != 1:
        raise GenError(f"case {case.id!r} is an image case but the pipeline returned {len(frames)} images")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = frame_names(case.modality, len(frames))
    for name, frame in zip(names, frames):
        frame.convert("RGB").save(tmp / name, format="PNG", optimize=True)
    w, h = frames[0].size
    metadata = {
        "case_id": case.id, "modality": case.modality, "ranks": case.ranks, "source": source,
        "seed": case.seed, "device": device, "dtype": dtype, "pipeline": pipeline, "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "request": {"prompt": case.prompt, "negative_prompt": case.negative_prompt, "height": h, "width": w,
                    "num_inference_steps": case.num_inference_steps, "guidance_scale": case.guidance_scale,
                    "true_cfg_scale": case.true_cfg_scale, "num_frames": len(frames) if case.modality == "video"
                    else None, "fps": fps, "images": [p.name for p in case.images],
                    "ulysses_degree": case.ulysses_degree, "ring_degree": case.ring_degree,
                    "cfg_parallel": case.cfg_parallel},
        "files": names,
    }
    (tmp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def read_metadata(root: Path, case: Case) -> dict:
    """A golden's metadata; it must match the case (modality, ranks, seed)."""
    path = golden_dir(root, case)
    meta_path = path / METADATA
    try:
        metadata = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise GenError(f"golden metadata {meta_path} line {e.lineno}: malformed JSON: {e.msg}") from None
    for key in ("modality", "ranks", "seed", "files"):
        if key not in metadata:
            raise GenError(f"golden metadata {meta_path} lacks the key {key!r}")
    for key in ("modality", "ranks", "seed"):
        if metadata[key] != getattr(case, key):
            raise GenError(f"golden {path} was made with {key}={metadata[key]!r} but case {case.id!r} has "
                           f"{key}={getattr(case, key)!r}; regenerate it with `gen consistency update --force`")
    if not isinstance(metadata["files"], list) or not metadata["files"]:
        raise GenError(f"golden metadata {meta_path}: 'files' must be a non-empty list of PNG names")
    return metadata


def read_golden(root: Path, case: Case) -> Golden:
    """Load a golden's metadata and frames; every listed file must be there."""
    path = golden_dir(root, case)
    metadata = read_metadata(root, case)
    frames = []
    for name in metadata["files"]:
        try:
            with Image.open(path / name) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise GenError(f"golden frame {path / name} cannot be read: {e}") from None
    return Golden(path, frames, metadata)
