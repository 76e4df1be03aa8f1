"""Regional torch.compile: each repeated block compiled once (same code, so one graph reused by every block)."""
from __future__ import annotations

from torch import nn


def _blocks(model: nn.Module, block_lists: tuple[str, ...]) -> list[nn.Module]:
    return [block for attr in block_lists for block in getattr(model, attr)]


def compile_blocks(model: nn.Module, block_lists: tuple[str, ...], tune_kernels: bool = False,
                   **compile_kwargs) -> int:
    """Compile every block of the model's `block_lists` (its family's `DiT.blocks`); returns the count.
    `tune_kernels` (inductor, no mode given): coordinate-descent tuning of the generated Triton kernels' block
    sizes (off by default: TransformOptions.kernel_tuning). The first compile takes longer (H200: Qwen-Image 8.8 ->
    19.8 s, FLUX.1 8.6 -> 57.8 s; inductor caches it). Qwen-Image 1024^2: fused elementwise 14.8 -> 11.5 ms a CFG step,
    12.37 -> 12.29 s a generation; FLUX.1 6.41 -> 6.40 s (docs/BENCHMARKS.md)."""
    if tune_kernels and not ({"backend", "mode", "options"} & set(compile_kwargs)):
        compile_kwargs["options"] = {"coordinate_descent_tuning": True}
    blocks = _blocks(model, block_lists)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def uncompile_blocks(model: nn.Module, block_lists: tuple[str, ...]) -> None:
    """Undo compile_blocks: the blocks run eagerly again."""
    for block in _blocks(model, block_lists):
        block._compiled_call_impl = None
