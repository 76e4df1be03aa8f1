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
                  options: TransformOptions = TransformOptions(), parallel=None, transformer: str | Path | None = None):
    """The pipeline `path`'s model_index.json names, its components loaded on `device` in `dtype`, with `options`'
    transforms applied (and, with `parallel`, a gen.distributed.ParallelContext, run over its ranks). `transformer`:
    one checkpoint file whose weights replace the folder's transformer (component_loaders/single_file.py)."""
    index = read_model_index(path)
    pipe_cls = pipeline_class(index.class_name)
    # offloaded components are loaded in host memory; the offload transform moves them to `device` as they run
    offloaded = options.offload not in (None, "none") or options.max_gpu_memory is not None
    load_device = torch.device("cpu") if offloaded else device
    # the single file first: a bad one is refused before the other components are read
    dit = load_transformer_file(transformer, index, load_device, device, dtype) if transformer is not None else None
    skip = ("transformer",) if transformer is not None else ()
    components = load_components(path, load_device, dtype, variant=variant, own_models=DITS, skip=skip)
    if dit is not None:
        components.modules["transformer"] = dit
    log.info("loaded %s (%s) on %s in %s", path, pipe_cls.__name__, load_device, dtype)
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


def load_transformer_file(file: str | Path, index, load_device: torch.device, device: torch.device,
                          dtype: torch.dtype):
    """The transformer of the model folder `index` describes, its weights read from one file (any layout and format of
    component_loaders/single_file.py); FP8 weights run on FP8 tensor cores where `device` has them."""
    from component_loaders.single_file import fp8_matmul_ok, load_single_file
    from gen.types import GenError

    spec = index.components.get("transformer")
    dit = DITS.get(spec[1]) if spec else None
    if dit is None:
        raise GenError(f"{index.path}: --transformer replaces the folder's transformer, but its model_index.json names "
                       f"{spec!r} for `transformer`, not a DiT we implement ({sorted(DITS)})", param="transformer")
    return load_single_file(file, index.path / "transformer", dit, load_device, dtype, fp8_matmul_ok(device, dtype))
