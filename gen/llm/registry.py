"""The process-wide table of loaded LLMs, so pipelines naming the same checkpoint share one instance; not loading itself."""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from gen.device import resolve_device, resolve_dtype

_LLMS: dict[tuple[str, str, str], object] = {}
_LOCK = threading.Lock()


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
            load = LLM.from_gguf if path_str.endswith(".gguf") else LLM
            _LLMS[k] = load(path_str, device=dev_str, dtype=getattr(torch, dtype_str.removeprefix("torch.")))
        return _LLMS[k]


def put_llm(llm, path, device=None, dtype=None) -> None:
    """Register an LLM built another way (e.g. from a .gguf file) under its key."""
    with _LOCK:
        _LLMS[key(path, device, dtype)] = llm


def loaded() -> list[tuple[str, str, str]]:
    with _LOCK:
        return list(_LLMS)


def clear() -> None:
    """Drop every shared LLM (tests, or freeing memory)."""
    with _LOCK:
        _LLMS.clear()
