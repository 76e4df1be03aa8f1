"""Reads `model_index.json`: the pipeline class and, per component slot, its [library, class]."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gen.config import read_json
from gen.types import GenError


@dataclass(frozen=True)
class ModelIndex:
    path: Path
    class_name: str  # e.g. "FluxPipeline"
    components: dict[str, tuple[str, str] | None]  # slot -> (library, class); None = slot left empty
    extra: dict  # non-component keys (Wan2.2's "boundary_ratio", "expand_timesteps"; Qwen-Image 2.1's "sample_sigmas")


def read_model_index(path: str | Path) -> ModelIndex:
    path = Path(path)
    if not path.exists():
        raise GenError(f"model path {str(path)!r} does not exist", param="model_path")
    if not path.is_dir():
        raise GenError(f"model path {str(path)!r} is not a directory (expected a diffusers-layout folder)", param="model_path")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise GenError(f"{index_file} is missing: {str(path)!r} is not a diffusers-layout model folder", param="model_path")
    try:
        data = read_json(index_file)
    except ValueError as e:
        raise GenError(str(e), param="model_path") from None
    class_name = data.get("_class_name")
    if not isinstance(class_name, str) or not class_name:
        raise GenError(f"{index_file} has no '_class_name' naming the pipeline", param="model_path")
    components: dict[str, tuple[str, str] | None] = {}
    extra = {}
    for key, value in data.items():
        if key.startswith("_"):
            continue
        is_spec = isinstance(value, list) and bool(value) and all(v is None or isinstance(v, str) for v in value)
        if is_spec and len(value) == 2:
            if value[0] is None or value[1] is None:
                components[key] = None
            else:
                components[key] = (value[0], value[1])
        elif is_spec:
            raise GenError(f"{index_file}: component {key!r} must be [library, class], got {value!r}", param="model_path")
        else:  # other values (lists of numbers included: Qwen-Image 2.1's "sample_sigmas")
            extra[key] = value
    return ModelIndex(path=path, class_name=class_name, components=components, extra=extra)
