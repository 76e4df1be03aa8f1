"""Building an LLM from an HF folder: config.json -> model class on meta, safetensors (single or sharded, block-scaled
FP8 dequantized at load) assigned with assign=True; not tokenizers."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
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


@dataclass(frozen=True)
class Fp8Blocks:
    """A block-scaled FP8 checkpoint (DeepSeek-V3 / R1 as released): `<name>.weight` float8_e4m3fn (out, in) with
    `<name>.weight_scale_inv` fp32 (ceil(out / bo), ceil(in / bi)), one scale per (bo, bi) block of the weight."""

    block: tuple[int, int]

    @classmethod
    def from_hf(cls, hf_config: dict, folder: Path) -> "Fp8Blocks | None":
        """None for an unquantized checkpoint; ValueError naming anything else than block-scaled e4m3 FP8."""
        q = hf_config.get("quantization_config")
        if not q:
            return None
        method, fmt, block = q.get("quant_method"), q.get("fmt", "e4m3"), q.get("weight_block_size")
        if method != "fp8" or fmt != "e4m3" or not block or len(block) != 2:
            raise ValueError(f"{folder}/config.json: quantization_config {q} is not supported (only quant_method 'fp8', "
                             "fmt 'e4m3' with a 2D weight_block_size, as DeepSeek-V3 / R1 are released)")
        return cls((int(block[0]), int(block[1])))

    def dequantize(self, w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """w (out, in) fp8 times its block's scale, computed in fp32 and rounded once to dtype; edge blocks partial."""
        (bo, bi), (o, i) = self.block, w.shape
        if scale_inv.shape != (math.ceil(o / bo), math.ceil(i / bi)):
            raise ValueError(f"weight_scale_inv of shape {tuple(scale_inv.shape)} does not fit a {tuple(w.shape)} weight "
                             f"in {bo}x{bi} blocks")
        scale = scale_inv.float().repeat_interleave(bo, 0)[:o].repeat_interleave(bi, 1)[:, :i]  # (out, in)
        return (w.float() * scale).to(dtype)


def read_state_dict(folder: Path, device, dtype: torch.dtype, key_map: dict | None = None, ignored=(), keep_fp32=(),
                    fp8: Fp8Blocks | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint on device, floats cast to dtype, keys renamed by `key_map` (regex -> replacement).

    Keys matching an `ignored` regex (after renaming) are never read. Keys matching a `keep_fp32` regex stay float32.
    With `fp8`, every `<name>.weight` that has a `<name>.weight_scale_inv` is dequantized into dtype here, at load: this
    runtime has no block-scaled FP8 matmul, so FP8 checkpoints cost dtype-sized memory on every device.
    """
    from safetensors import safe_open

    ignored = [re.compile(p) for p in ignored]
    keep_fp32 = [re.compile(p) for p in keep_fp32]
    files = {}  # checkpoint key -> file
    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt") as st:
            files.update((k, f) for k in st.keys())
    scales = {k.removesuffix("_scale_inv"): k for k in files if k.endswith(".weight_scale_inv")}
    if scales and fp8 is None:
        raise ValueError(f"{folder} holds FP8 scales ({next(iter(scales.values()))}, ...) but config.json has no "
                         "quantization_config")
    handles = {}

    def get(key: str) -> torch.Tensor:
        f = files[key]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt", device=str(device))
        return handles[f].get_tensor(key)

    state = {}
    for key in files:
        if key in scales.values():
            continue
        name = key
        for pattern, repl in (key_map or {}).items():
            name = re.sub(pattern, repl, name)
        if any(p.search(name) for p in ignored):
            continue
        t = get(key)
        if key in scales:
            t = fp8.dequantize(t, get(scales[key]), dtype)
        elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ValueError(f"{folder}: {key} is {t.dtype} without a {key}_scale_inv")
        elif t.is_floating_point():
            t = t.to(torch.float32 if any(p.search(name) for p in keep_fp32) else dtype)
        state[name] = t
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], tie_word_embeddings: bool) -> nn.Module:
    """Assign checkpoint tensors to a meta-built model; ValueError naming missing / unexpected keys.

    A model class may declare `checkpoint_key_map` (regex -> replacement, for older checkpoint layouts),
    `ignored_checkpoint_keys` (regexes of keys to drop, e.g. extra prediction layers), `keep_fp32_checkpoint_keys`
    (regexes of keys kept float32 whatever the load dtype; read by load_model) and `embed_key` (the input embedding
    that lm_head.weight shares when tie_word_embeddings is set).
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
    state = read_state_dict(folder, device, dtype, getattr(model, "checkpoint_key_map", {}),
                            getattr(model, "ignored_checkpoint_keys", ()), getattr(model, "keep_fp32_checkpoint_keys", ()),
                            Fp8Blocks.from_hf(hf_config, folder))
    return load_state(model, state, bool(tie) or getattr(model, "headless", False)), hf_config
