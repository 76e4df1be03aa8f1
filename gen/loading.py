"""Loading a model folder into a ready pipeline in this process: the one function Generator and every rank call."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from component_loaders import load_components
from component_loaders.model_index import read_model_index
from gen.families import DITS, pipeline_class
from gen.transforms import TransformOptions, apply_transforms

log = logging.getLogger(__name__)


def load_pipeline(path: str | Path, device: torch.device, dtype: torch.dtype, variant: str | None = None,
                  options: TransformOptions = TransformOptions(), parallel=None):
    """The pipeline `path`'s model_index.json names, its components loaded on `device` in `dtype`, with `options`'
    transforms applied (and, with `parallel`, a gen.distributed.ParallelContext, run over its ranks)."""
    pipe_cls = pipeline_class(read_model_index(path).class_name)
    components = load_components(path, device, dtype, variant=variant, own_models=DITS)
    log.info("loaded %s (%s) on %s in %s", path, pipe_cls.__name__, device, dtype)
    pipeline = pipe_cls(components, device, dtype)
    apply_transforms(pipeline, options, parallel)
    return pipeline


def load_dit(folder: str | Path, device: torch.device, dtype: torch.dtype, variant: str | None = None):
    """A transformer folder (config.json + safetensors) loaded into the DiT its `_class_name` names."""
    from component_loaders.models import load_own_model
    from gen.config import read_json
    from gen.types import GenError

    folder = Path(folder)
    class_name = read_json(folder / "config.json").get("_class_name")
    dit = DITS.get(class_name)
    if dit is None:
        raise GenError(f"{folder}/config.json: _class_name {class_name!r} is not a DiT we implement; known: "
                       f"{sorted(DITS)}", param="model_path")
    return load_own_model(folder, dit.model, dit.config, device, dtype, variant)
