"""Loaders for model components: our own DiTs (meta + assign), transformers and diffusers modules, schedulers."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from component_loaders.weights import find_weight_files, load_weights
from gen.config import config_from_dict, read_json
from gen.types import GenError

def _config(folder: Path) -> dict:
    try:
        return read_json(folder / "config.json")
    except (FileNotFoundError, ValueError) as e:
        raise GenError(f"{folder}: {e}", param="model_path") from None


def load_own_model(folder: Path, model_cls: type, config_cls: type, device: torch.device, dtype: torch.dtype,
                   variant: str | None = None):
    """One of our own model classes (a DiT a family declares) built from `folder`'s config.json on the meta device,
    its weights then loaded (assigned) from the folder's safetensors."""
    try:
        config = config_from_dict(config_cls, _config(folder))
    except (TypeError, ValueError, AssertionError) as e:
        raise GenError(f"{folder}/config.json does not describe a valid {model_cls.__name__}: {e}",
                       param="model_path") from None
    with torch.device("meta"):
        model = model_cls(config)
    return load_weights(model, folder, device, dtype, variant)


def _check_loading_info(folder: Path, info: dict) -> None:
    missing = info.get("missing_keys") or []
    mismatched = info.get("mismatched_keys") or []
    if missing:
        raise GenError(f"{folder}: missing weights: {sorted(missing)[:12]}", param="model_path")
    if mismatched:
        raise GenError(f"{folder}: weights of the wrong shape: {sorted(map(str, mismatched))[:12]}", param="model_path")


def load_transformers_model(folder: Path, class_name: str, device: torch.device, dtype: torch.dtype,
                            variant: str | None = None):
    import transformers

    _config(folder)
    find_weight_files(folder, variant)  # a clear error when weights are absent
    cls = getattr(transformers, class_name)
    model, info = cls.from_pretrained(str(folder), dtype=dtype, variant=variant, output_loading_info=True)
    _check_loading_info(folder, info)
    return model.to(device).eval()


def load_diffusers_model(folder: Path, class_name: str, device: torch.device, dtype: torch.dtype,
                         variant: str | None = None):
    import diffusers

    _config(folder)
    files = find_weight_files(folder, variant)
    if variant is None and ".safetensors" in files[0].name:
        variant = next((v for v in ("fp16", "bf16") if f".{v}." in files[0].name), None)
    cls = getattr(diffusers, class_name)
    model, info = cls.from_pretrained(str(folder), torch_dtype=dtype, variant=variant, output_loading_info=True)
    _check_loading_info(folder, info)
    return model.to(device).eval()


def load_scheduler(folder: Path, class_name: str, **_):
    import diffusers

    if not (folder / "scheduler_config.json").is_file():
        raise GenError(f"{folder}/scheduler_config.json is missing", param="model_path")
    return getattr(diffusers, class_name).from_pretrained(str(folder))


def load_unipc_scheduler(folder: Path, class_name: str, **_):
    """Our sync-free UniPC (gen/schedulers/unipc.py) for the configs it implements (Wan's); diffusers' class, with a
    warning naming the options, for the others (same output, with its host-device syncs)."""
    from gen.schedulers.unipc import UniPCScheduler, unsupported

    try:
        config = read_json(folder / "scheduler_config.json")
    except (FileNotFoundError, ValueError) as e:
        raise GenError(f"{folder}: {e}", param="model_path") from None
    problems = unsupported(config)
    if not problems:
        return UniPCScheduler.from_config(config)
    logging.getLogger(__name__).warning("%s: using diffusers' %s (host-device syncs every step): our UniPCScheduler "
                                        "does not support %s", folder, class_name, "; ".join(problems))
    return load_scheduler(folder, class_name)


def load_processor(folder: Path, class_name: str, **_):
    import transformers

    if not folder.is_dir():
        raise GenError(f"processor folder {str(folder)!r} is missing", param="model_path")
    return getattr(transformers, class_name).from_pretrained(str(folder))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_LLM_LOAD = threading.Lock()


def load_llm(folder: Path, class_name: str, device: torch.device, dtype: torch.dtype, variant: str | None = None):
    """A text encoder that is an LLM (Qwen2.5-VL, Qwen3-VL): the process-wide shared instance of gen's LLM runtime.

    The runtime finds the tokenizer in the folder or its sibling `tokenizer/`; Qwen-Image 2.1 keeps Qwen3-VL's in
    the sibling `processor/`, so that one is handed over here (registered under the same key, loaded once)."""
    from gen.llm import LLM, registry

    _config(folder)
    find_weight_files(folder, variant)
    processor = folder.parent / "processor"
    if (any((folder / n).is_file() for n in _TOKENIZER_FILES) or (folder.parent / "tokenizer").is_dir()
            or not any((processor / n).is_file() for n in _TOKENIZER_FILES)):
        return registry.get_llm(folder, device, dtype)
    with _LLM_LOAD:
        if registry.shared(folder, device, dtype) is None:
            registry.put_llm(LLM(folder, device=device, dtype=dtype, tokenizer=processor), folder, device, dtype)
        else:
            registry.put_llm(registry.shared(folder, device, dtype), folder, device, dtype)
    return registry.get_llm(folder, device, dtype)
