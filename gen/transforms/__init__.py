"""Everything applied to a loaded pipeline from outside the model files, composed here in one order.

A transform changes how a pipeline's DiTs (or its VAE) run, never what the model files say; each has an apply and
an undo, and reads what it needs about a DiT from its family's declaration (`DiT.blocks`, `.shard_plan`,
`.cache_layout`, pipelines/family.py). `apply_transforms` applies the chosen ones in this order (innermost first)
and returns an `Applied` record whose `undo()` takes them off in the reverse order:

| # | transform          | module                      | what it changes                                         |
|---|--------------------|-----------------------------|---------------------------------------------------------|
| 1 | attention backend  | gen/models/attention.py     | the process's attention function (chosen once)          |
| 1b| offload            | gen/transforms/offload.py   | components in host memory, moved in per call / per block|
| 2 | fp8 (lossy)        | gen/transforms/fp8.py       | block nn.Linear -> Fp8Linear                            |
| 3 | join (exact)       | gen/transforms/join.py      | q/k/v (+MLP) weights become views of one joined weight  |
| 3a| GELU epilogue      | gen/transforms/epilogue.py  | feed-forward matmul + GELU(tanh) as one cuBLASLt call   |
| 3a| q/k norm + RoPE    | gen/transforms/norm_rope.py | q/k RMSNorm and rotation as one Triton kernel (CUDA)    |
| 3b| LoRA               | gen/transforms/lora.py      | adapter banks on the linears, or sets merged; per request |
| 3c| modulation schedule| gen/transforms/modulation.py| every step's adaLN modulations made in one product      |
| 4 | compile            | gen/transforms/compile.py   | each block torch.compile'd (regional)                   |
| 5 | step cache (lossy) | gen/transforms/step_cache.py| forward wrapper skipping later blocks on quiet steps     |
| 6 | sequence parallel  | gen/distributed/apply.py    | forward wrapper + hooks sharding tokens over ranks      |
| 7 | CUDA graphs        | gen/transforms/cuda_graph.py| forward wrapper replaying captured graphs (outermost)   |
| 8 | batching           | gen/transforms/batch.py     | forward wrapper merging concurrent generations' calls   |
| 9 | VAE settings       | gen/transforms/vae.py       | channels-last convs, compiled decoder, tiled decode     |

Forward wrappers (5-8) stack through gen/transforms/forward.py, removed in the reverse order. Combinations that
cannot work are refused by `check_options` before any weight is loaded: the step cache decides on the host per
step, so neither CUDA graphs (no host decisions inside a graph) nor parallel ranks (each would decide on its own
shard) go with it; CUDA graphs do not capture the ranks' collectives; FP8 needs a CUDA GPU of compute capability
8.9+ in bf16; offload goes with neither CUDA graphs (they replay fixed weight addresses) nor batching (concurrent
generations would move each other's weights), and settles its plan last, once FP8 and join changed the tensors.
FP8 goes before join (joining needs plain nn.Linear layers; FP8 layers stay unjoined) and compile
after both (it traces the final layers). LoRA goes after join (a joined group's adapters run as one down matmul) and
before compile (switching sets copies into fixed-size banks: no recompile); fusing LoRAs into FP8 weights is refused.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from gen.types import GenError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransformOptions:
    """Which transforms to apply (the Generator.from_pretrained / CLI flags of the same names)."""

    compile: bool = False
    kernel_tuning: bool = False  # with compile, on accelerators: inductor's coordinate-descent tuning of its kernels
    attention: str = "auto"
    fp8: bool = False
    step_cache: float | None = None
    cuda_graphs: bool = False
    vae_tiling: bool = False
    join: bool = True  # the exact fusions: joined projections, GELU epilogues, q/k norm + RoPE (join.py, epilogue.py,
    # norm_rope.py in gen/transforms)
    cfg_batch: bool | None = None  # CFG branches in one batched forward; None: on accelerators, one process
    max_batch: int = 1  # > 1: batch the DiT calls of up to this many concurrent generations
    batch_wait_ms: float = 5.0  # how long a call waits for others to join its batch
    offload: str | None = None  # "none", "model", "layer"; None: "none", or what fits max_gpu_memory
    max_gpu_memory: float | None = None  # GiB the weights (plus working memory) may take on the device
    loras: tuple = ()  # the default LoRA set (LoraSpecs / paths / (path, scale) tuples): requests with loras=None
    fuse_lora: bool = False  # merge LoRA sets into the weights (no per-step cost; a switch rewrites the weights)
    max_loras: int = 4  # LoRAs per request
    max_lora_cache_mb: float = 2048  # loaded LoRA tensors kept (LRU), on the device
    # every step's adaLN modulations in one product per generation (gen/transforms/modulation.py); None: on
    # accelerators, where neither CUDA graphs, offload nor concurrent-generation batching is on
    modulation_schedule: bool | None = None


def check_options(options: TransformOptions, device: torch.device, dtype: torch.dtype, parallel: bool = False) -> None:
    """Refuse, with a GenError naming the option, what cannot run on `device` in `dtype` (on parallel ranks)."""
    from gen.transforms.cuda_graph import check_cuda_graphs
    from gen.transforms.fp8 import check_fp8
    from gen.transforms.step_cache import check_threshold

    if options.kernel_tuning and not options.compile:
        raise GenError("kernel_tuning tunes the compiled blocks' kernels: add compile", param="kernel_tuning")
    if options.step_cache is not None:
        check_threshold(options.step_cache)
        if parallel:
            raise GenError(f"step_cache={options.step_cache} works in one process only: ranks would decide to skip "
                           "on their own shards; drop it or the parallel flags", param="step_cache")
    if isinstance(options.max_batch, bool) or not isinstance(options.max_batch, int) or options.max_batch < 1:
        raise GenError(f"max_batch must be an integer >= 1, got {options.max_batch!r}", param="max_batch")
    if not 0 <= options.batch_wait_ms <= 10_000:
        raise GenError(f"batch_wait_ms must be between 0 and 10000, got {options.batch_wait_ms!r}",
                       param="batch_wait_ms")
    if options.max_batch > 1 and options.step_cache is not None:
        raise GenError(f"max_batch={options.max_batch} and step_cache cannot be combined: the step cache keys its "
                       "state by each call's text tensor", param="max_batch")
    if options.max_batch > 1 and parallel:
        raise GenError(f"max_batch={options.max_batch} works in one process only: parallel ranks run one "
                       "generation at a time", param="max_batch")
    if options.cfg_batch and options.step_cache is not None:
        raise GenError("cfg_batch and step_cache cannot be combined: the step cache tells the CFG branches apart by "
                       "their text tensors", param="cfg_batch")
    if options.cfg_batch and parallel:
        raise GenError("cfg_batch works in one process (on several ranks, cfg_parallel runs the CFG branches on "
                       "two rank halves instead)", param="cfg_batch")
    from gen.transforms.lora import check_lora_options

    offloaded = options.offload not in (None, "none") or options.max_gpu_memory is not None
    check_lora_options(options.fuse_lora, options.fp8, offloaded, bool(options.loras))
    if options.fp8:
        check_fp8(device, dtype)
    if options.offload not in (None, "none") or options.max_gpu_memory is not None:
        from gen.transforms.offload import check_offload

        check_offload(options.offload, options.max_gpu_memory)
        if options.cuda_graphs:
            raise GenError("cuda_graphs and offload cannot be combined: a graph replays the weight addresses it was "
                           "captured with, and offloaded weights move", param="cuda_graphs")
        if options.max_batch > 1:
            raise GenError(f"max_batch={options.max_batch} and offload cannot be combined: concurrent generations in "
                           "different stages would move each other's weights", param="max_batch")
    if options.modulation_schedule:
        clash = ("cuda_graphs" if options.cuda_graphs else "offload" if offloaded
                 else "max_batch" if options.max_batch > 1 else None)
        if clash is not None:
            raise GenError(f"modulation_schedule and {clash} cannot be combined: it copies each step's prepared rows "
                           "into one buffer before the forward, which a CUDA graph would replay with one step's rows, "
                           "offloaded weights are not all on the device to prepare them, and concurrent generations "
                           "would share the buffer", param="modulation_schedule")
    if options.cuda_graphs:
        check_cuda_graphs(device, options.step_cache)
        if parallel:
            raise GenError("cuda_graphs works in one process only (the ranks' collectives are not captured); "
                           "drop it or the parallel flags", param="cuda_graphs")


@dataclass
class Step:
    """One applied transform: its name, what it reports, and how to take it off."""

    name: str
    detail: Any
    undo: Callable[[], None]


class Applied(list):
    """The transforms applied to one pipeline, innermost first."""

    def summary(self) -> dict:
        """name -> what it reports, as plain values (a transform's own object by its str), for logs and JSON."""
        plain = (bool, int, float, str, type(None))

        def show(detail):
            if isinstance(detail, plain) or (isinstance(detail, list) and all(isinstance(x, plain) for x in detail)):
                return detail
            return str(detail)

        return {s.name: show(s.detail) for s in self}

    def get(self, name: str) -> Step | None:
        return next((s for s in self if s.name == name), None)

    def undo(self) -> None:
        """Take every transform off, the outermost first."""
        while self:
            self.pop().undo()


def apply_transforms(pipeline, options: TransformOptions = TransformOptions(), parallel=None) -> Applied:
    """Apply the chosen transforms to `pipeline` in the order of the module doc; `parallel`: a
    gen.distributed.ParallelContext to run its DiTs on (sequence / CFG parallel). Records them in
    `pipeline.transforms` and returns that record."""
    from gen.models.attention import get_attention_backend, select_attention_backend, set_attention_backend

    check_options(options, pipeline.device, pipeline.dtype, parallel is not None)
    applied = Applied()
    dits = pipeline.dits()
    try:
        cfg_batch = options.cfg_batch
        # asked for: always; by default (where memory is plentiful and kernels are launch- or occupancy-bound) only
        # branches that need no padding: a padded batch masks its attention keys, which cost more than it saves
        # (Qwen-Image 1328^2 on an H200: 32.2 s batched and masked, 25.4 s as two forwards; docs/BENCHMARKS.md)
        pipeline.cfg_batch_padded = cfg_batch is not None
        if cfg_batch is None:
            cfg_batch = pipeline.device.type != "cpu" and parallel is None and options.step_cache is None
        pipeline.cfg_batch = cfg_batch
        applied.append(Step("cfg_batch", cfg_batch, lambda: setattr(pipeline, "cfg_batch", False)))
        previous = get_attention_backend()
        backend = select_attention_backend(pipeline.device, pipeline.dtype, options.attention)
        applied.append(Step("attention", backend, lambda: set_attention_backend(previous)))
        offload = None
        if options.offload not in (None, "none") or options.max_gpu_memory is not None:
            from gen.transforms.offload import Offload

            offload = Offload(pipeline, options.offload, options.max_gpu_memory)
            applied.append(Step("offload", offload, offload.remove))
        if options.fp8:
            from gen.transforms.fp8 import dequantize_transformer, quantize_transformer

            counts = [quantize_transformer(m, dit.blocks) for _, m, dit in dits]
            applied.append(Step("fp8_linears", sum(c["fp8_linears"] for c in counts),
                                lambda: [dequantize_transformer(m, dit.blocks) for _, m, dit in dits]))
        if options.join:
            from gen.transforms.join import join_projections, unjoin_projections

            n = sum(join_projections(m) for _, m, _ in dits)
            applied.append(Step("joined_projections", n, lambda: [unjoin_projections(m) for _, m, _ in dits]))
            from gen.transforms.epilogue import fuse_gelu_epilogues, unfuse_gelu_epilogues

            n = sum(fuse_gelu_epilogues(m) for _, m, _ in dits)
            applied.append(Step("gelu_epilogues", n, lambda: [unfuse_gelu_epilogues(m) for _, m, _ in dits]))
            from gen.transforms.norm_rope import fuse_norm_rope, unfuse_norm_rope

            n = sum(fuse_norm_rope(m) for _, m, _ in dits)
            applied.append(Step("norm_rope", n, lambda: [unfuse_norm_rope(m) for _, m, _ in dits]))
        from gen.transforms.lora import LoraAdapters

        loras = LoraAdapters(pipeline, options.fuse_lora, options.max_loras, options.max_lora_cache_mb, options.loras,
                             offloaded=offload is not None)
        pipeline.loras = loras
        applied.append(Step("lora", loras, lambda: (loras.remove(), setattr(pipeline, "loras", None))))
        if loras.default:
            loras.set(None)
        schedule = options.modulation_schedule
        if schedule is None:
            schedule = pipeline.device.type != "cpu"
        if schedule and not options.cuda_graphs and offload is None and options.max_batch == 1:
            from gen.transforms.modulation import prepare_modulations

            schedules = [s for s in (prepare_modulations(m, dit) for _, m, dit in dits) if s is not None]
            if schedules:
                applied.append(Step("modulation_schedule", sum(len(s.modules) for s in schedules),
                                    lambda: [s.remove() for s in reversed(schedules)]))
        if options.compile:
            from gen.transforms.compile import compile_blocks, uncompile_blocks

            tune = options.kernel_tuning and pipeline.device.type != "cpu"
            n = sum(compile_blocks(m, dit.blocks, tune_kernels=tune) for _, m, dit in dits)
            applied.append(Step("compiled_blocks", n, lambda: [uncompile_blocks(m, dit.blocks) for _, m, dit in dits]))
        if options.step_cache is not None:
            from gen.transforms.step_cache import StepCache

            caches = [StepCache(m, dit.blocks, dit.cache_layout, options.step_cache) for _, m, dit in dits]
            applied.append(Step("step_cache", options.step_cache, lambda: [c.remove() for c in reversed(caches)]))
        if parallel is not None:
            from gen.distributed.apply import parallelize

            sp = parallelize(pipeline, parallel)
            applied.append(Step("parallel", sp, sp.remove))
        if options.cuda_graphs:
            from gen.transforms.cuda_graph import disable_cuda_graphs, enable_cuda_graphs

            for _, m, _ in dits:
                enable_cuda_graphs(m)
            applied.append(Step("cuda_graphs", len(dits), lambda: [disable_cuda_graphs(m) for _, m, _ in dits]))
        if options.max_batch > 1:
            from gen.transforms.batch import BatchGroup, disable_batching, enable_batching

            group = BatchGroup(options.max_batch, options.batch_wait_ms / 1000)
            batchers = enable_batching(pipeline, group)
            applied.append(Step("batch", group, lambda: disable_batching(batchers)))
        vae = pipeline.components.get("vae")
        if vae is not None:
            from gen.transforms.vae import is_3d, tune_vae

            accel, video = pipeline.device.type != "cpu", pipeline.modality == "video"
            settings = dict(channels_last=accel and video, compile=options.compile and accel and not is_3d(vae),
                            tiling=options.vae_tiling)
            applied.append(Step("vae", [k for k, on in settings.items() if on], tune_vae(vae, **settings)))
        if offload is not None:  # sizes, plan and host copies once FP8 / join changed the tensors
            offload.settle()
    except BaseException:  # leave the pipeline as it was, then let the error go on
        applied.undo()
        raise
    pipeline.transforms = applied
    log.info("transforms: %s", applied.summary())
    return applied
