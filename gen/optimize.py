"""Speed-ups applied to a loaded pipeline from outside the model files, each small and opt-out."""
from __future__ import annotations

import logging

import torch
from torch import nn

from gen.models.attention import select_attention_backend

log = logging.getLogger(__name__)

# module attributes that hold a model's repeated blocks, per architecture
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Regional torch.compile: compile each repeated block once (same code, so one graph reused); returns the count."""
    n = 0
    for attr in BLOCK_LISTS:
        for block in getattr(model, attr, None) or []:
            block.compile(**compile_kwargs)
            n += 1
    return n


def optimize(pipeline, compile: bool = False, attention: str = "auto", fp8: bool = False,
             step_cache: float | None = None, join: bool = True, cuda_graphs: bool = False,
             vae_tiling: bool = False) -> dict:
    """Choose the attention backend for the pipeline's device and dtype; join the q/k/v (+MLP) projections that
    read the same input into one matmul each (`join`, on by default: same math, gen/fuse.py); optionally compile
    the blocks of its DiTs.

    Lossy, off by default: `fp8` swaps the blocks' linears for FP8 ones (gen/fp8.py; CUDA sm89+, bf16) before
    compiling; `step_cache` (a threshold in (0, 1)) skips the later blocks on steps whose first block barely
    changed (gen/step_cache.py), wrapped around the compiled blocks.
    Exact, off by default: `cuda_graphs` replays each DiT call from a CUDA graph (gen/cuda_graph.py; CUDA only,
    not with the step cache).

    The VAE (gen/vae.py): on an accelerator a video VAE's convs run channels-last (faster Conv3d kernels) and
    `compile` also compiles a 2D VAE's decoder; `vae_tiling` decodes in tiles (less memory, slower).
    """
    from gen.cuda_graph import check_cuda_graphs, enable_cuda_graphs
    from gen.fp8 import check_fp8, quantize_transformer  # it imports BLOCK_LISTS from here
    from gen.fuse import join_projections
    from gen.step_cache import apply_step_cache, check_threshold, transformers
    from gen.vae import is_3d, tune_vae

    if step_cache is not None:
        check_threshold(step_cache)
    if fp8:
        check_fp8(pipeline.device, pipeline.dtype)
    if cuda_graphs:
        check_cuda_graphs(pipeline.device, step_cache)
    applied = {"attention": select_attention_backend(pipeline.device, pipeline.dtype, attention)}
    models = transformers(pipeline)
    if fp8:
        applied["fp8_linears"] = sum(quantize_transformer(m)["fp8_linears"] for m in models)
    if join:  # after FP8, which leaves no plain Linear in the blocks to join
        applied["joined_projections"] = sum(join_projections(m) for m in models)
    if compile:
        applied["compiled_blocks"] = sum(compile_blocks(m) for m in models)
    if step_cache is not None:
        apply_step_cache(pipeline, step_cache)
        applied["step_cache"] = step_cache
    if cuda_graphs:
        for m in models:
            enable_cuda_graphs(m)
        applied["cuda_graphs"] = len(models)
    vae = getattr(pipeline, "vae", None)
    if vae is not None:
        accel, video = pipeline.device.type != "cpu", pipeline.modality == "video"
        settings = dict(channels_last=accel and video, compile=compile and accel and not is_3d(vae), tiling=vae_tiling)
        tune_vae(vae, **settings)
        applied["vae"] = [k for k, on in settings.items() if on]
    log.info("optimizations: %s", applied)
    return applied


__all__ = ["compile_blocks", "optimize", "torch"]
