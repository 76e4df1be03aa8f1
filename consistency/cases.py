"""The cases file: what to generate for each consistency case. Not how outputs are compared (metrics.py)."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from consistency.documents import Document, load_document
from gen.types import GenError

MODALITIES = ("image", "video")


@dataclass(frozen=True)
class Case:
    """One consistency case. Relative paths in the file are resolved against the cases file's folder."""

    id: str
    model: Path
    modality: str
    prompt: str
    seed: int
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    num_frames: int | None = None
    fps: int | None = None
    images: tuple[Path, ...] = ()  # edit / image-to-video inputs
    ranks: int = 1
    ulysses_degree: int | None = None
    ring_degree: int | None = None
    cfg_parallel: bool = False
    loras: tuple[tuple[Path, float], ...] = ()  # (LoRA file, scale): ours per request, the reference's set_adapters

    @property
    def safe_id(self) -> str:
        return safe_name(self.id)

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `Generator.generate` (input images as paths)."""
        kw = dict(prompt=self.prompt, negative_prompt=self.negative_prompt, seed=self.seed,
                  num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                  true_cfg_scale=self.true_cfg_scale, height=self.height, width=self.width,
                  num_frames=self.num_frames, fps=self.fps)
        if self.images:
            kw["images"] = list(self.images)
        if self.loras:
            kw["loras"] = [(str(p), scale) for p, scale in self.loras]
        return kw


@dataclass(frozen=True)
class CasesFile:
    path: Path
    cases: tuple[Case, ...]
    clip_model: Path | None  # CLIP vision checkpoint for the `clip` metric; None: not configured

    def select(self, ids: list[str] | None) -> list[Case]:
        """The cases named by `ids` (all when empty), in the order given; unknown ids are named."""
        if not ids:
            return list(self.cases)
        by_id = {c.id: c for c in self.cases}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise GenError(f"unknown case id(s) {unknown} in {self.path}; known: {sorted(by_id)}")
        return [by_id[i] for i in dict.fromkeys(ids)]


def safe_name(case_id: str) -> str:
    """A file name made from a case id: [A-Za-z0-9._-] only; a short hash is added when characters were replaced."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("._") or "case"
    if name != case_id or len(name) > 80:
        name = f"{name[:80]}-{hashlib.sha1(case_id.encode()).hexdigest()[:8]}"
    return name


# field -> (accepted types, required)
_FIELDS = {
    "id": (str, True), "model": (str, True), "modality": (str, True), "prompt": (str, True), "seed": (int, True),
    "negative_prompt": (str, False), "height": (int, False), "width": (int, False),
    "num_inference_steps": (int, False), "guidance_scale": ((int, float), False),
    "true_cfg_scale": ((int, float), False), "num_frames": (int, False), "fps": (int, False),
    "images": (list, False), "ranks": (int, False), "ulysses_degree": (int, False), "ring_degree": (int, False),
    "cfg_parallel": (bool, False), "loras": (list, False),
}
_TYPE_NAMES = {str: "a string", int: "an integer", (int, float): "a number", list: "a list", bool: "true or false"}


def load_cases(path: str | Path) -> CasesFile:
    """Parse and validate a cases file: `{"clip_model": optional path, "cases": [{...}, ...]}`."""
    doc = load_document(path, "cases")
    if not isinstance(doc.data, dict):
        raise doc.error((), "the cases file must be a mapping with a 'cases' list")
    unknown = sorted(set(doc.data) - {"cases", "clip_model"})
    if unknown:
        raise doc.error((unknown[0],), f"unknown top-level key; expected 'cases' and optionally 'clip_model'")
    raw = doc.data.get("cases")
    if not isinstance(raw, list) or not raw:
        raise doc.error(("cases",), "must be a non-empty list of cases")
    cases, seen = [], {}
    for i, entry in enumerate(raw):
        case = _parse_case(doc, i, entry)
        if case.id in seen:
            raise doc.error(("cases", i, "id"), f"duplicate case id {case.id!r} (first at case {seen[case.id]})")
        seen[case.id] = i
        cases.append(case)
    clip = doc.data.get("clip_model")
    if clip is not None and not isinstance(clip, str):
        raise doc.error(("clip_model",), f"must be a path string, got {clip!r}")
    return CasesFile(doc.path, tuple(cases), _resolve(doc.path, clip) if clip else None)


def _parse_case(doc: Document, i: int, entry) -> Case:
    keys = ("cases", i)
    if not isinstance(entry, dict):
        raise doc.error(keys, f"each case must be a mapping, got {type(entry).__name__}")
    for name in entry:
        if name not in _FIELDS:
            raise doc.error(keys + (name,), f"unknown case field; known fields: {sorted(_FIELDS)}")
    for name, (types, required) in _FIELDS.items():
        value = entry.get(name)
        if value is None:
            if required:
                raise doc.error(keys, f"case is missing the required field {name!r}")
            continue
        if not isinstance(value, types) or (types is not bool and isinstance(value, bool)):
            raise doc.error(keys + (name,), f"must be {_TYPE_NAMES[types]}, got {value!r}")
    f = dict(entry)
    if not f["id"].strip():
        raise doc.error(keys + ("id",), "must be a non-empty string")
    if f["modality"] not in MODALITIES:
        raise doc.error(keys + ("modality",), f"must be one of {list(MODALITIES)}, got {f['modality']!r}")
    for name in ("ranks", "ulysses_degree", "ring_degree", "height", "width", "num_inference_steps",
                 "num_frames", "fps"):
        if f.get(name) is not None and f[name] < 1:
            raise doc.error(keys + (name,), f"must be at least 1, got {f[name]}")
    if f["modality"] == "image" and (f.get("num_frames") is not None or f.get("fps") is not None):
        raise doc.error(keys + ("num_frames" if "num_frames" in f else "fps",), "only valid for video cases")
    images = []
    for j, image in enumerate(f.get("images") or []):
        if not isinstance(image, str):
            raise doc.error(keys + ("images", j), f"must be a path string, got {image!r}")
        p = _resolve(doc.path, image)
        if not p.is_file():
            raise doc.error(keys + ("images", j), f"input image {str(p)!r} does not exist")
        images.append(p)
    loras = []
    for j, lora in enumerate(f.get("loras") or []):
        if not isinstance(lora, dict) or not isinstance(lora.get("path"), str) or set(lora) - {"path", "scale"} \
                or isinstance(lora.get("scale", 1.0), bool) or not isinstance(lora.get("scale", 1.0), (int, float)):
            raise doc.error(keys + ("loras", j), f"must be {{\"path\": file, \"scale\": number}}, got {lora!r}")
        p = _resolve(doc.path, lora["path"])
        if not p.exists():
            raise doc.error(keys + ("loras", j, "path"), f"LoRA {str(p)!r} does not exist")
        loras.append((p, float(lora.get("scale", 1.0))))
    f["loras"] = tuple(loras)
    model = _resolve(doc.path, f["model"])
    if not (model / "model_index.json").is_file():
        raise doc.error(keys + ("model",), f"{str(model)!r} is not a diffusers-layout model folder "
                                           "(no model_index.json)")
    degrees = [f.get("ulysses_degree"), f.get("ring_degree"), 2 if f.get("cfg_parallel") else None]
    if any(d is not None for d in degrees):
        product = 1
        for d in degrees:
            product *= d or 1
        ranks = f.get("ranks", product)
        if ranks != product:
            raise doc.error(keys + ("ranks",), f"ranks {ranks} must equal ulysses_degree x ring_degree x "
                                               f"(2 if cfg_parallel) = {product}")
        f["ranks"] = ranks
    f["model"], f["images"] = model, tuple(images)
    return Case(**f)


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base.parent / p).resolve()
