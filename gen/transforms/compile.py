"""Regional torch.compile: each repeated block compiled once (same code, so one graph reused by every block)."""
from __future__ import annotations

from torch import nn


def _blocks(model: nn.Module, block_lists: tuple[str, ...]) -> list[nn.Module]:
    return [block for attr in block_lists for block in getattr(model, attr)]


def compile_blocks(model: nn.Module, block_lists: tuple[str, ...], **compile_kwargs) -> int:
    """Compile every block of the model's `block_lists` (its family's `DiT.blocks`); returns the count."""
    blocks = _blocks(model, block_lists)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def uncompile_blocks(model: nn.Module, block_lists: tuple[str, ...]) -> None:
    """Undo compile_blocks: the blocks run eagerly again."""
    for block in _blocks(model, block_lists):
        block._compiled_call_impl = None
