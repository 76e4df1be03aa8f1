"""LoRA files on disk: reading one (a .safetensors file, or a folder holding one), an LRU cache of loaded LoRAs
bounded in MB, a library of the LoRAs in one folder (what a server offers, by file stem), and the checks of a
requested set (count, scales, targets) that raise GenErrors naming the bad entry (`loras[0].scale`).

Not the key maps (gen/lora/formats.py) nor the application to a model (gen/transforms/lora.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from gen.lora.formats import LoraWeights, parse, peft_alphas
from gen.types import GenError, LoraSpec

log = logging.getLogger(__name__)

MAX_SCALE = 10.0  # |scale| above this is refused: no LoRA is meant to be used that hard
DEFAULT_MAX_LORAS = 4
DEFAULT_CACHE_MB = 2048
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_METADATA = "lora_adapter_metadata"  # the safetensors metadata entry diffusers' save_lora_weights writes


# ---------------------------------------------------------------- one file


def lora_file(path: str | os.PathLike, param: str = "loras") -> Path:
    """The .safetensors file `path` names: the file itself, or the one .safetensors file in a folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if len(files) != 1:
            raise GenError(f"LoRA folder {str(p)!r} holds {len(files)} .safetensors files "
                           f"({[f.name for f in files]}); name the file", param=param)
        return files[0]
    if not p.is_file():
        raise GenError(f"LoRA {str(p)!r} does not exist", param=param)
    if p.suffix != ".safetensors":
        raise GenError(f"LoRA {str(p)!r} is not a .safetensors file (pickled .bin/.pt/.ckpt files are not loaded: "
                       "they can run code)", param=param)
    return p


def _check_header(path: Path) -> None:
    """A truncated or corrupt file named before safetensors reads it (its own error does not name the file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise GenError(f"LoRA {path} is not a safetensors file ({size} bytes)", param="loras")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise GenError(f"LoRA {path} is truncated or not a safetensors file (header of {n} bytes in a file of "
                           f"{size})", param="loras")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise GenError(f"LoRA {path} has an unreadable safetensors header ({e})", param="loras") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
               and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise GenError(f"LoRA {path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}",
                       param="loras")


def read_lora(path: str | os.PathLike, family: str) -> LoraWeights:
    """A LoRA file (or a folder holding one) read and mapped onto `family`'s modules (fp32, on the CPU)."""
    from safetensors import SafetensorError, safe_open

    file = lora_file(path)
    _check_header(file)
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise GenError(f"LoRA {file} cannot be read ({e})", param="loras") from None
    return parse(tensors, family, str(file), _peft_alpha(file, metadata))


def _peft_alpha(file: Path, metadata: dict) -> dict:
    """The PEFT config's alphas by component slot: diffusers' `lora_adapter_metadata` (keys `transformer.*`,
    `text_encoder.*`, `text_encoder_2.*`) or a PEFT folder's adapter_config.json (the transformer's); none when
    neither is there (scale 1 unless the file has `.alpha` keys)."""
    configs = {}
    if DIFFUSERS_METADATA in metadata:
        try:
            packed = json.loads(metadata[DIFFUSERS_METADATA])
        except ValueError as e:
            raise GenError(f"LoRA {file}: unreadable {DIFFUSERS_METADATA} metadata ({e})", param="loras") from None
        for key, value in packed.items():
            slot, _, name = key.partition(".")
            configs.setdefault(slot, {})[name] = value
    elif (file.parent / PEFT_CONFIG).is_file():
        try:
            configs["transformer"] = json.loads((file.parent / PEFT_CONFIG).read_text())
        except ValueError as e:
            raise GenError(f"LoRA {file.parent / PEFT_CONFIG} is not valid JSON ({e})", param="loras") from None
    return {slot: peft_alphas(config) for slot, config in configs.items() if config}


# ---------------------------------------------------------------- the cache


class LoraCache:
    """Loaded LoRAs by (file, size, mtime, family), least recently used dropped first past `max_mb` (a LoRA larger
    than the whole cache is still returned, not kept). Tensors are kept on `device` in `dtype`. Thread-safe."""

    def __init__(self, max_mb: float = DEFAULT_CACHE_MB, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if not (isinstance(max_mb, (int, float)) and math.isfinite(max_mb) and max_mb >= 0):
            raise GenError(f"max_lora_cache_mb must be a number >= 0, got {max_mb!r}", param="max_lora_cache_mb")
        self.max_bytes = int(max_mb * 2**20)
        self.device, self.dtype = torch.device(device), dtype
        self.entries: OrderedDict[tuple, LoraWeights] = OrderedDict()
        self.lock = threading.Lock()
        self.loads = 0  # files read (misses)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.entries.values())

    def get(self, path: str | os.PathLike, family: str) -> LoraWeights:
        file = lora_file(path)
        st = file.stat()
        key = (str(file.resolve()), st.st_size, st.st_mtime_ns, family)
        with self.lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
                return hit
        weights = read_lora(file, family).to(self.device, self.dtype)
        with self.lock:
            self.loads += 1
            if weights.nbytes <= self.max_bytes:
                self.entries[key] = weights
                while self.nbytes > self.max_bytes:
                    dropped = self.entries.popitem(last=False)[1]
                    log.info("LoRA cache: dropped %s (%.1f MB)", dropped.source, dropped.nbytes / 2**20)
        return weights


# ---------------------------------------------------------------- requested sets


def check_scale(scale, param: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or abs(scale) > MAX_SCALE:
        raise GenError(f"LoRA scale must be a finite number in [-{MAX_SCALE:g}, {MAX_SCALE:g}], got {scale!r}",
                       param=param)
    return float(scale)


def check_specs(loras, max_loras: int = DEFAULT_MAX_LORAS, slots: tuple[str, ...] | None = None,
                param: str = "loras") -> tuple[LoraSpec, ...]:
    """`loras` (LoraSpecs, or (path, scale) / (path, scale, target) tuples, or paths) checked: at most `max_loras`,
    scales finite in [-10, 10], targets among `slots`; GenError with `param` like `loras[1].scale`."""
    if isinstance(loras, (str, os.PathLike, LoraSpec)):
        loras = [loras]
    try:
        loras = list(loras)
    except TypeError:
        raise GenError(f"loras must be a list, got {type(loras).__name__}", param=param) from None
    if len(loras) > max_loras:
        raise GenError(f"at most {max_loras} LoRAs per request, got {len(loras)}", param=param)
    specs = []
    for i, item in enumerate(loras):
        where = f"{param}[{i}]"
        if isinstance(item, LoraSpec):
            spec = item
        elif isinstance(item, (str, os.PathLike)):
            spec = LoraSpec(str(item))
        elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 3 and isinstance(item[0], (str, os.PathLike)):
            spec = LoraSpec(str(item[0]), *item[1:])
        else:
            raise GenError(f"a LoRA is a path, (path, scale) or (path, scale, target); got {item!r}", param=where)
        check_scale(spec.scale, f"{where}.scale")
        if spec.target is not None and slots is not None and spec.target not in slots:
            raise GenError(f"LoRA target {spec.target!r} is not a transformer of this model (it has {list(slots)})",
                           param=f"{where}.target")
        specs.append(LoraSpec(str(spec.path), float(spec.scale), spec.target))
    return tuple(specs)


def parse_lora_arg(text: str) -> LoraSpec:
    """The CLI's `PATH[:SCALE][@TARGET]` (a path that exists as written is taken whole)."""
    if Path(text).expanduser().exists():
        return LoraSpec(text)
    target = None
    body = text
    if "@" in body:
        body, target = body.rsplit("@", 1)
        if not target:
            raise GenError(f"--lora {text!r}: empty target after '@'", param="lora")
    path, scale = body, 1.0
    if ":" in body:
        head, tail = body.rsplit(":", 1)
        try:
            scale = float(tail)
        except ValueError:
            head = None
        if head is not None:
            path = head
    spec = LoraSpec(path, scale, target)
    check_scale(spec.scale, "lora")
    return spec


# ---------------------------------------------------------------- a folder of LoRAs (what a server offers)


class LoraLibrary:
    """The LoRAs in one folder, by file stem (`<dir>/<name>.safetensors`, or `<dir>/<name>/` holding one
    .safetensors file); requests name them, never paths. `cache`: share the pipeline's (gen/transforms/lora.py
    `LoraAdapters.cache`) so a checked LoRA is not loaded twice; else one of `max_cache_mb` on the CPU."""

    def __init__(self, directory: str | os.PathLike, max_cache_mb: float = DEFAULT_CACHE_MB,
                 cache: LoraCache | None = None):
        self.directory = Path(directory).expanduser()
        if not self.directory.is_dir():
            raise GenError(f"LoRA directory {str(self.directory)!r} does not exist", param="lora_dir")
        self.cache = cache if cache is not None else LoraCache(max_cache_mb)

    def _files(self) -> dict[str, Path]:
        found = {}
        for p in sorted(self.directory.iterdir()):
            if p.is_file() and p.suffix == ".safetensors":
                found[p.stem] = p
            elif p.is_dir() and len(list(p.glob("*.safetensors"))) == 1:
                found.setdefault(p.name, p)
        return found

    def names(self) -> list[str]:
        return sorted(self._files())

    def list(self) -> list[dict]:
        """[{"name", "size_mb"}] for every LoRA offered (what GET /v1/loras answers)."""
        out = []
        for name, p in sorted(self._files().items()):
            f = lora_file(p)
            out.append({"name": name, "size_mb": round(f.stat().st_size / 2**20, 3)})
        return out

    def path(self, name, param: str = "loras[0].name") -> Path:
        if not isinstance(name, str) or not name:
            raise GenError(f"a LoRA name must be a non-empty string, got {name!r}", param=param)
        p = self._files().get(name)
        if p is None:
            names = self.names()
            shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            raise GenError(f"unknown LoRA {name!r}; this server offers: {shown or 'none'}", param=param)
        return p

    def load(self, name: str, family: str, param: str = "loras[0].name") -> LoraWeights:
        """The LoRA `name` loaded for `family` (cached); GenError (with `param`) when unknown or unreadable."""
        try:
            return self.cache.get(self.path(name, param), family)
        except GenError as e:
            raise GenError(str(e), param=param) from None

    def specs(self, items, family: str | None = None, max_loras: int = DEFAULT_MAX_LORAS,
              slots: tuple[str, ...] | None = None, param: str = "loras") -> tuple[LoraSpec, ...]:
        """A request's `loras` field (`[{"name": ..., "scale": 0.8, "target": "transformer_2"}, ...]`) checked and
        resolved to LoraSpecs with paths; with `family`, each file is also loaded (cached) so that a bad file is a
        GenError naming `loras[i].name` before the request runs."""
        if items is None:
            return ()
        if not isinstance(items, (list, tuple)):
            raise GenError(f"loras must be a list of {{name, scale}} objects, got {type(items).__name__}", param=param)
        if len(items) > max_loras:
            raise GenError(f"at most {max_loras} LoRAs per request, got {len(items)}", param=param)
        specs = []
        for i, item in enumerate(items):
            where = f"{param}[{i}]"
            if not isinstance(item, dict):
                raise GenError(f"each LoRA is an object {{name, scale}}, got {item!r}", param=where)
            unknown = sorted(set(item) - {"name", "scale", "target"})
            if unknown:
                raise GenError(f"unknown LoRA fields {unknown} (known: name, scale, target)", param=f"{where}.{unknown[0]}")
            path = self.path(item.get("name"), f"{where}.name")
            scale = check_scale(item.get("scale", 1.0), f"{where}.scale")
            target = item.get("target")
            if target is not None and (not isinstance(target, str) or (slots is not None and target not in slots)):
                raise GenError(f"LoRA target {target!r} is not a transformer of this model"
                               + (f" (it has {list(slots)})" if slots else ""), param=f"{where}.target")
            if family is not None:
                self.load(item["name"], family, f"{where}.name")
            specs.append(LoraSpec(str(path), scale, target))
        return tuple(specs)
