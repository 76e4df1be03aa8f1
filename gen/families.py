"""The registries, built from each family's declaration (`FAMILY` at the end of its file in pipelines/):
model_index.json pipeline class -> our pipeline class, checkpoint transformer class -> our DiT."""
from __future__ import annotations

from torch import nn

from gen.types import GenError
from pipelines import flux, qwen_image, wan
from pipelines import qwen_image21
from pipelines import z_image
from pipelines import flux2
from pipelines.family import DiT, Family

FAMILIES: dict[str, Family] = {
    "flux": flux.FAMILY,
    "wan": wan.FAMILY,
    "qwen-image": qwen_image.FAMILY,
    "qwen-image-2.1": qwen_image21.FAMILY,
    "z-image": z_image.FAMILY,
    "flux2": flux2.FAMILY,
}
PIPELINES: dict[str, type] = {name: cls for f in FAMILIES.values() for name, cls in f.pipelines.items()}
DITS: dict[str, DiT] = {d.checkpoint_class: d for f in FAMILIES.values() for d in f.dits}


def pipeline_class(class_name: str) -> type:
    """Our pipeline for a model_index.json `_class_name`."""
    cls = PIPELINES.get(class_name)
    if cls is None:
        raise GenError(f"unknown pipeline class {class_name!r} in model_index.json; supported: {sorted(PIPELINES)}",
                       param="model_path")
    return cls


def dit_of(model: nn.Module) -> DiT:
    """The declaration of the DiT `model` is an instance of."""
    for dit in DITS.values():
        if type(model) is dit.model:
            return dit
    raise GenError(f"{type(model).__name__} is not a DiT any family declares; known: "
                   f"{sorted(d.model.__name__ for d in DITS.values())}", param="model_path")
