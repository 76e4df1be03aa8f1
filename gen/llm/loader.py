"""Building an LLM from an HF folder: config.json -> model class on meta, safetensors (single or sharded) loaded with assign=True; not tokenizers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from gen.config import read_json
from gen.llm.models import model_class


def architecture(hf_config: dict, folder: Path) -> str:
    archs = hf_config.get("architectures") or []
    if not archs:
        raise ValueError(f"{folder}/config.json names no `architectures`; cannot tell which LLM it is")
    return archs[0]


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: the shards of model.safetensors.index.json, or model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")


def read_state_dict(folder: Path, device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, floats cast to dtype, on device."""
    state = {}
    for f in safetensors_files(folder):
        for k, t in load_file(str(f), device=str(device)).items():
            state[k] = t.to(dtype) if t.is_floating_point() else t
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], tie_word_embeddings: bool) -> nn.Module:
    """Assign checkpoint tensors to a meta-built model; ValueError naming missing / unexpected keys.

    A model class may declare `checkpoint_key_map` (regex -> replacement, for older checkpoint layouts),
    `ignored_checkpoint_keys` (regexes of keys to drop, e.g. extra prediction layers) and `embed_key`
    (the input embedding that lm_head.weight shares when tie_word_embeddings is set).
    """
    for pattern, repl in getattr(model, "checkpoint_key_map", {}).items():
        state = {re.sub(pattern, repl, k): v for k, v in state.items()}
    ignored = [re.compile(p) for p in getattr(model, "ignored_checkpoint_keys", ())]
    state = {k: v for k, v in state.items() if not any(p.search(k) for p in ignored)}
    expected = set(model.state_dict())
    embed_key = getattr(model, "embed_key", "model.embed_tokens.weight")
    if tie_word_embeddings and "lm_head.weight" in expected and embed_key in state:
        state["lm_head.weight"] = state[embed_key]  # one tensor, two parameters
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {type(model).__name__}: "
                         f"missing keys {_few(missing)}; unexpected keys {_few(unexpected)}")
    model.load_state_dict(state, strict=True, assign=True)
    left = [k for k, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"still on meta after loading: {left[:5]}"
    return model.eval()


def _few(keys: list[str], n: int = 10) -> str:
    return "[]" if not keys else ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def build_model(hf_config: dict, device, dtype: torch.dtype) -> nn.Module:
    """The model class for config.json, built on meta (no memory) with its Config read by from_hf."""
    cls = model_class(architecture(hf_config, Path("<config>")))
    with torch.device("meta"):
        return cls(cls.Config.from_hf(hf_config))


def load_model(folder: str | Path, device, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    """(model on device in dtype, config.json dict) from an HF checkpoint folder."""
    folder = Path(folder)
    hf_config = read_json(folder / "config.json")
    architecture(hf_config, folder)
    model = build_model(hf_config, device, dtype)
    tie = hf_config.get("tie_word_embeddings", (hf_config.get("text_config") or {}).get("tie_word_embeddings", False))
    return load_state(model, read_state_dict(folder, device, dtype), bool(tie)), hf_config
