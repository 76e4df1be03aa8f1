"""Finds a component's safetensors files (single, sharded, fp16/bf16 variants) and loads them into a meta-built module."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from gen.types import GenError

log = logging.getLogger(__name__)
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


def _variant_of(name: str) -> str | None:
    """'x.fp16.safetensors' -> 'fp16'; 'x.safetensors.index.bf16.json' -> 'bf16'; plain names -> None."""
    if name.endswith(".json"):
        parts = name.removesuffix(".json").split(".safetensors.index")
        return parts[1].lstrip(".") or None if len(parts) == 2 else None
    stem = _SHARD.sub(".safetensors", name).removesuffix(".safetensors")
    return stem.rsplit(".", 1)[1] if "." in stem else None


def find_weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files holding one component's weights.

    `variant=None` takes the plain files, or the only variant present when there are no plain ones.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GenError(f"component folder {str(folder)!r} is missing", param="model_path")
    indexes = sorted(folder.glob("*.safetensors.index*.json"))
    singles = sorted(p for p in folder.glob("*.safetensors") if not _SHARD.search(p.name))
    by_variant: dict[str | None, list[Path]] = {}
    for p in indexes + singles:
        by_variant.setdefault(_variant_of(p.name), []).append(p)
    if not by_variant:
        raise GenError(f"no *.safetensors weights in {str(folder)!r}", param="model_path")
    if variant is None and None not in by_variant:
        if len(by_variant) > 1:
            raise GenError(f"{str(folder)!r} holds several weight variants {sorted(by_variant)}; pick one with variant=",
                           param="variant")
        variant = next(iter(by_variant))
    if variant not in by_variant:
        raise GenError(f"no {variant!r} variant weights in {str(folder)!r} (found {sorted(map(str, by_variant))})",
                       param="variant")
    files = by_variant[variant]
    index = [p for p in files if p.name.endswith(".json")]
    if index:
        weight_map = json.loads(index[0].read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise GenError(f"{index[0]} has no 'weight_map'", param="model_path")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise GenError(f"weight shards listed in {index[0].name} are missing: {missing}", param="model_path")
        return shards
    return files[:1]


def read_state_dict(files: list[Path], device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for key, tensor in load_file(str(f), device=str(device)).items():
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[key] = tensor
    return state


def _names(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_weights(module: nn.Module, folder: Path, device: torch.device, dtype: torch.dtype | None,
                 variant: str | None = None) -> nn.Module:
    """Load `folder`'s weights into `module` (built on the meta device) with assign=True: no second copy.

    Missing or mis-shaped weights are refused by name; unexpected ones are reported and ignored.
    """
    state = read_state_dict(find_weight_files(folder, variant), device, dtype)
    expected = module.state_dict()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    if missing:
        raise GenError(f"{folder}: missing weights: {_names(missing)}", param="model_path")
    bad_shapes = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
                  for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad_shapes:
        raise GenError(f"{folder}: weights of the wrong shape: {_names(bad_shapes)}", param="model_path")
    if unexpected:
        log.warning("%s: ignoring unexpected weights: %s", folder, _names(unexpected))
        for k in unexpected:
            del state[k]
    module.load_state_dict(state, strict=True, assign=True)
    still_meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    assert not still_meta, f"tensors left on meta after load: {still_meta}"
    return module.eval()
