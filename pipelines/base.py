"""What every pipeline shares: construction from loaded components and per-stage timing."""
from __future__ import annotations

import contextlib
import time
from typing import ClassVar

import torch

from component_loaders import Components
from gen.types import CancelFn, GenError, GenerationRequest, GenerationResult, ProgressFn
from PIL import Image

from stages.validate import FamilyDefaults, validate_request


class Timings(dict):
    """stage name -> seconds; `with timings("denoise"): ...` records one stage."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


class Pipeline:
    """A model family's generation: `__call__(request) -> result`, a short list of stages."""

    family: ClassVar[str]
    modality: ClassVar[str] = "image"  # "image" or "video"
    defaults: ClassVar[FamilyDefaults]
    takes_images: ClassVar[str] = "never"  # "never", "optional" or "required"
    required: ClassVar[tuple[str, ...]] = ()  # component slots that must be present

    def __init__(self, components: Components, device: torch.device, dtype: torch.dtype):
        missing = [slot for slot in self.required if components.get(slot) is None]
        if missing:
            raise GenError(f"{components.index.path}: model_index.json lacks components {missing} "
                           f"that {components.index.class_name} needs", param="model_path")
        self.components = components
        self.device = device
        self.dtype = dtype

    def check_images(self, req: GenerationRequest) -> None:
        if self.takes_images == "never" and req.images:
            raise GenError(f"{type(self).__name__} does not take input images", param="image")
        if self.takes_images == "required" and not req.images:
            raise GenError(f"{type(self).__name__} needs an input image", param="image")
        bad = [type(i).__name__ for i in req.images if not isinstance(i, Image.Image)]
        if bad:
            raise GenError(f"input images must be PIL images, got {bad}", param="image")

    def size_defaults(self, req: GenerationRequest) -> FamilyDefaults:
        """The defaults that fill `req` (edit pipelines take the output size from the input image)."""
        return self.defaults

    def validate(self, req: GenerationRequest) -> GenerationRequest:
        """`req` checked against this model and filled with its defaults; GenError naming the first bad field.
        The one validation of a request: the pipeline runs it first, the server before queueing (same result)."""
        self.check_images(req)
        return validate_request(req, self.size_defaults(req), video=self.modality == "video")

    def __call__(self, req: GenerationRequest, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None) -> GenerationResult:
        raise NotImplementedError
