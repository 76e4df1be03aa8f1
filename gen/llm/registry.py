"""The process-wide table of loaded LLMs, so pipelines naming the same checkpoint share one instance; not loading itself.

Two paths share one instance when they name the same checkpoint, or when their weights are the same by content: a
fingerprint of the weight files (names, sizes, headers and samples of their bytes) and of the tokenizer files
(hashed whole) — two model folders that each carry a copy of one text encoder load it once.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import torch

from gen.device import resolve_device, resolve_dtype

_LLMS: dict[tuple[str, str, str], object] = {}
_BY_CONTENT: dict[tuple[str, str, str], object] = {}  # (fingerprint, dtype, device) -> the instance
_LOCK = threading.Lock()
_SAMPLE = 1 << 20  # bytes read at the start, middle and end of each weight file
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                    "special_tokens_map.json", "chat_template.jinja", "config.json", "generation_config.json")


def _sample_file(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
            f.seek(offset)
            h.update(f.read(_SAMPLE))


def fingerprint(path) -> str:
    """A content fingerprint of an LLM checkpoint: a .gguf file, or an HF folder's weight files (sampled: safetensors
    headers name every tensor's dtype, shape and offset) with its config and tokenizer files (whole, with those of a
    diffusers-layout sibling `tokenizer/` or `processor/`)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        _sample_file(h, path)
        return h.hexdigest()
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    for p in weights:
        _sample_file(h, p)
    for label, folder in (("", path), ("tokenizer/", path.parent / "tokenizer"), ("processor/", path.parent / "processor")):
        for name in _TOKENIZER_FILES:
            f = folder / name
            if f.is_file():
                h.update(f"{label}{name}".encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def key(path, device=None, dtype=None) -> tuple[str, str, str]:
    """(resolved checkpoint path: a folder or a .gguf file, dtype, device): the identity of a loaded LLM."""
    dev = resolve_device(device)
    return str(Path(path).resolve()), str(resolve_dtype(dtype, dev)), str(dev)


def get_llm(path, device=None, dtype=None):
    """The shared LLM for this checkpoint (an HF folder, or a .gguf file loaded with LLM.from_gguf), dtype and device,
    loading it on first use (thread-safe: loads once)."""
    from gen.llm.api import LLM

    k = key(path, device, dtype)
    with _LOCK:  # one lock for all: loads are rare and must not run twice for the same key
        if k not in _LLMS:
            path_str, dtype_str, dev_str = k
            same = _BY_CONTENT.get((fingerprint(path_str), dtype_str, dev_str))
            if same is not None:  # another path, the same weights and tokenizer: share the loaded instance
                _LLMS[k] = same
            else:
                load = LLM.from_gguf if path_str.endswith(".gguf") else LLM
                _LLMS[k] = load(path_str, device=dev_str, dtype=getattr(torch, dtype_str.removeprefix("torch.")))
                _BY_CONTENT[(fingerprint(path_str), dtype_str, dev_str)] = _LLMS[k]
        return _LLMS[k]


def put_llm(llm, path, device=None, dtype=None) -> None:
    """Register an LLM built another way (e.g. with a tokenizer from elsewhere) under its key."""
    k = key(path, device, dtype)
    with _LOCK:
        _LLMS[k] = llm
        if os.path.exists(k[0]):
            _BY_CONTENT.setdefault((fingerprint(k[0]), k[1], k[2]), llm)


def shared(path, device=None, dtype=None):
    """The loaded instance whose checkpoint has `path`'s content, or None (no loading)."""
    k = key(path, device, dtype)
    with _LOCK:
        return _LLMS.get(k) or _BY_CONTENT.get((fingerprint(k[0]), k[1], k[2]))


def loaded() -> list[tuple[str, str, str]]:
    with _LOCK:
        return list(_LLMS)


def instances() -> list:
    """The distinct loaded LLMs (several keys may share one)."""
    with _LOCK:
        return list({id(v): v for v in _LLMS.values()}.values())


def clear() -> None:
    """Drop every shared LLM (tests, or freeing memory)."""
    with _LOCK:
        _LLMS.clear()
        _BY_CONTENT.clear()
