"""What every pipeline shares: construction from loaded components, validation, per-stage timing and cancel checks,
the DiTs the transforms reach, and the lifecycle (ready / alive / close) a group of ranks overrides."""
from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from typing import Callable, ClassVar

import torch
from PIL import Image
from torch import nn

from component_loaders import Components
from gen.types import CancelFn, GenError, GenerationRequest, GenerationResult, ProgressFn
from gen.transforms.batch import merge_calls
from pipelines.family import DiT
from stages.preview import LatentPreview, wanted
from stages.validate import FamilyDefaults, validate_request


# stage name -> lock, for the pipeline call running in this thread (Pipeline.__call__ sets it)
_STAGE_LOCKS: contextvars.ContextVar[dict[str, threading.Lock]] = contextvars.ContextVar("stage_locks", default={})


class Timings(dict):
    """stage name -> seconds; `with timings("denoise"): ...` records one stage. A stage the running pipeline
    serializes (`Pipeline.stage_locks`: concurrent generations, gen/transforms/batch.py) runs under its lock."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        lock = _STAGE_LOCKS.get().get(name)
        with lock if lock is not None else contextlib.nullcontext():
            start = time.perf_counter()
            try:
                yield
            finally:
                self[name] = self.get(name, 0.0) + time.perf_counter() - start


class Pipeline:
    """A model family's generation: `__call__(request) -> result`, a short list of stages (`run`)."""

    family: ClassVar[str]
    modality: ClassVar[str] = "image"  # "image" or "video"
    defaults: ClassVar[FamilyDefaults]
    takes_images: ClassVar[str] = "never"  # "never", "optional" or "required"
    required: ClassVar[tuple[str, ...]] = ()  # component slots that must be present
    dit: ClassVar[DiT]  # the transformer architecture its expert slots hold
    expert_slots: ClassVar[tuple[str, ...]] = ("transformer",)  # component slots holding a DiT, in denoising order
    cfg_batch: bool = False  # CFG branches as one batched forward (set by gen.transforms.apply_transforms)
    cfg_batch_padded: bool = False  # ... also when their text lengths differ (padded, keys masked)

    def __init__(self, components: Components, device: torch.device, dtype: torch.dtype):
        missing = [slot for slot in self.required if components.get(slot) is None]
        if missing:
            raise GenError(f"{components.index.path}: model_index.json lacks components {missing} "
                           f"that {components.index.class_name} needs", param="model_path")
        self.components = components
        self.device = device
        self.dtype = dtype
        self.request_hooks: list[Callable[[], None]] = []  # called before each request (transforms' per-request state)
        self.stage_locks: dict[str, threading.Lock] = {}  # stages one generation at a time when several run at once
        self.transforms = None  # gen.transforms.Applied once gen.transforms.apply_transforms ran
        self._preview: LatentPreview | None = None  # fitted at the first preview asked for
        self._preview_lock = threading.Lock()
        self.loras = None  # gen.transforms.lora.LoraAdapters: the LoRA set of each request (apply_transforms)

    # ---- the DiTs, for the transforms applied from outside

    def dits(self) -> list[tuple[str, nn.Module, DiT]]:
        """(slot, model, declaration) of each DiT this pipeline holds."""
        return [(slot, m, self.dit) for slot in self.expert_slots if isinstance(m := self.components.get(slot), nn.Module)]

    def branches(self, model: nn.Module, *calls: dict) -> list:
        """The DiT `model` on each keyword set of one step (the CFG branches, conditional first), as one batched
        forward when `cfg_batch` is on: the same results up to batched-kernel rounding, twice the activations.
        Branches whose sequences differ in length are batched only with `cfg_batch_padded` (padding masks keys) or
        when the DiT's attention can skip the padding without a mask (`DiT.padded_text_leads_keys`)."""
        dit = self.dit
        if self.cfg_batch and len(calls) > 1 and dit.batch_args and (
                self.cfg_batch_padded or dit.padded_text_leads_keys or not _needs_padding(calls, dit.batch_pad)):
            return merge_calls(model, list(calls), dit.batch_args, dit.batch_pad, dit.padded_text_leads_keys)
        return [model(**c) for c in calls]

    # ---- previews (stages/preview.py)

    def preview_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels in [-1, 1] -> the normalised latents the denoise loop holds, unpacked to (N, C, h, w).
        A family that can show previews implements it (it fits the latent -> RGB map once)."""
        raise NotImplementedError(f"{type(self).__name__} has no latent previews")

    def latent_preview(self) -> LatentPreview:
        with self._preview_lock:
            if self._preview is None:
                with torch.no_grad():
                    self._preview = LatentPreview.fit(
                        lambda px: self.preview_encode(px.to(self.device, self.dtype)).float())
            return self._preview

    def previewer(self, unpack: Callable[[torch.Tensor], torch.Tensor]):
        """The denoise loop's `preview` for this call: None unless previews were asked for (and the family has them);
        `unpack`: the loop's latents -> (B, C, h, w) latent images (the first frame for video)."""
        asked = wanted()
        if asked is None or type(self).preview_encode is Pipeline.preview_encode:
            return None
        callback, every = asked
        mapping = self.latent_preview()

        def preview(step: int, total: int, latents: torch.Tensor) -> None:
            if step % every == 0 or step == total:
                callback(step, total, mapping.image(unpack(latents)[0]))

        return preview

    # ---- requests

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
        if req.loras:
            req = req.replace(loras=self._lora_adapters().check(req.loras))
        return validate_request(req, self.size_defaults(req), video=self.modality == "video")

    def _lora_adapters(self):
        if self.loras is None:
            raise GenError(f"{type(self).__name__} was built without the LoRA transform (gen.transforms."
                           "apply_transforms), so it takes no LoRAs", param="loras")
        return self.loras

    def __call__(self, req: GenerationRequest, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None) -> GenerationResult:
        for hook in self.request_hooks:
            hook()
        loras = self._lora_adapters().use(req.loras) if self.loras is not None or req.loras else \
            contextlib.nullcontext()
        token = _STAGE_LOCKS.set(self.stage_locks)
        try:
            with loras:  # this request's LoRA set swapped in and held for its run
                return self.run(req, progress, cancel)
        finally:
            _STAGE_LOCKS.reset(token)

    def run(self, req: GenerationRequest, progress: ProgressFn | None, cancel: CancelFn | None) -> GenerationResult:
        """The family's stages."""
        raise NotImplementedError

    # ---- lifecycle: one process is always ready; a group of ranks (gen.distributed.ranks.RankGroup) is not always

    @property
    def ready(self) -> bool:
        return True

    @property
    def alive(self) -> bool:
        return True

    def close(self) -> None:
        """Release what the pipeline holds beyond its memory (other ranks for a group; nothing here)."""


def _needs_padding(calls: tuple[dict, ...], batch_pad) -> bool:
    """Whether merging the calls pads a sequence argument (`batch_pad`: (argument, its mask) pairs)."""
    for name, _ in batch_pad:
        if len({c[name].shape[1] for c in calls if c.get(name) is not None}) > 1:
            return True
    return False
