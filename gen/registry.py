"""The pipeline registry: model_index.json `_class_name` -> our pipeline class (a plain dict, imported lazily)."""
from __future__ import annotations

import importlib

from gen.types import GenError

PIPELINES = {
    "FluxPipeline": "pipelines.flux:FluxPipeline",
    "QwenImagePipeline": "pipelines.qwen_image:QwenImagePipeline",
    "QwenImageEditPipeline": "pipelines.qwen_image:QwenImageEditPipeline",
    "QwenImageEditPlusPipeline": "pipelines.qwen_image:QwenImageEditPlusPipeline",
    "QwenImageLLMPipeline": "pipelines.qwen_image:QwenImageLLMPipeline",
    "WanPipeline": "pipelines.wan:WanPipeline",
    "WanImageToVideoPipeline": "pipelines.wan:WanImageToVideoPipeline",
}


def pipeline_class(class_name: str):
    target = PIPELINES.get(class_name)
    if target is None:
        raise GenError(f"unknown pipeline class {class_name!r} in model_index.json; supported: {sorted(PIPELINES)}",
                       param="model_path")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)
