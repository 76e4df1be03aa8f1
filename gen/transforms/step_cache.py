"""First-block step cache ("FBCache", as in ParaAttention / Cache-DiT): a lossy speed-up, off by default.

Per transformer call, the first block always runs. Its residual (output minus input, image stream) is compared
with the residual at the last fully computed step of the same CFG branch: when the relative mean absolute
difference is below the threshold, the remaining blocks are skipped and the cached residual (the last full step's
final hidden states minus its first-block hidden states, per stream) is added instead; otherwise every block runs
and the cache is refreshed. As in ParaAttention, the reference residual moves only on fully computed steps, so the
drift a run of skipped steps may build up stays bounded by the threshold.

Applied from outside the model files: `StepCache(model, blocks, layout, threshold)` wraps the model's `forward`
(gen/transforms/forward.py); during one wrapped call the model's block lists (the family's `DiT.blocks`) are shadowed
by lists of gate functions around the same block objects, so the model's own `for block in ...` loop runs through
the gates. Parameters, module names, state_dict and (regionally) compiled blocks are untouched.

CFG branches: our pipelines call the transformer once per branch per step (conditional, then unconditional), each
branch with its own text tensor that lives, unchanged, for the whole generation. A call's branch is therefore the
`encoder_hidden_states` tensor object itself (held by weak reference: ids and data pointers are reused once a
tensor is freed, a weak reference cannot be fooled). A new generation brings new text tensors, hence fresh
branches; the branches of finished generations are dropped when their tensors die. A branch also starts over when
its timestep goes up (a new generation reusing a cached text tensor) or its input shape changes. The ways this can
fail cost the speed-up, never correctness: a pipeline that re-creates its text tensor every step gets a fresh
branch every call, and a text tensor seen twice at one timestep (two branches sharing it) is never skipped.

Not for sequence-parallel runs: ranks would decide on their own shards (gen.transforms.check_options refuses both).
"""
from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from gen.transforms.forward import forward_wrapper, unwrap_forward, wrap_forward
from gen.types import GenError

Streams = tuple[torch.Tensor, ...]


def _identity(streams: Streams) -> Streams:
    return streams


@dataclass(frozen=True)
class CacheLayout:
    """How a model's blocks chain, per block list of its `DiT.blocks`: the number of streams a block returns (its first
    that many arguments are those streams, image first), and `join`: the first block's output streams -> the last
    block's input streams, as the model hands them on when every block between does nothing."""

    streams: tuple[int, ...]
    join: Callable[[Streams], Streams] = _identity


def check_threshold(threshold) -> float:
    """The step-cache threshold as a float in (0, 1); anything else is a GenError naming the value."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise GenError(f"step_cache must be a threshold between 0 and 1 (exclusive), e.g. 0.1; got {threshold!r}",
                       param="step_cache")
    return float(threshold)


def relative_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """mean |a - ref| / mean |ref| (fp32)."""
    a, ref = a.float(), ref.float()
    return ((a - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12)).item()


@dataclass
class _Branch:
    """One CFG branch of one generation: its text tensor, last timestep and cached residuals."""

    text: weakref.ref
    timestep: float = float("inf")
    shape: tuple = ()
    first_residual: torch.Tensor | None = None  # first block's output - input (image stream), last full step
    residual: Streams | None = None  # last block's outputs - join(first block's outputs), last full step
    shared: bool = False  # several CFG branches pass this one text tensor: they cannot be told apart, never skip


@dataclass
class _Call:
    """What the gates of one transformer call share."""

    branch: _Branch
    n_blocks: int
    join: Callable[[Streams], Streams]  # the layout's join, when the last block sits in a later list than the first
    skip: bool = False
    first: Streams = field(default_factory=tuple)  # join(first block's outputs) on a full step


def _as_tuple(out) -> Streams:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


class StepCache:
    """The first-block cache of one transformer whose block lists are `blocks` chained as `layout` says; `stats`
    counts forwards and blocks run and skipped. Any threshold is taken here (0: never skip; huge: always skip);
    the user-facing check is check_threshold."""

    name = "step_cache"

    def __init__(self, model: nn.Module, blocks: tuple[str, ...], layout: CacheLayout, threshold: float):
        assert len(blocks) == len(layout.streams), (blocks, layout)
        self.model, self.threshold, self.layout = model, threshold, layout
        self.block_lists = tuple(zip(blocks, layout.streams))
        self.branches: list[_Branch] = []
        self.call: _Call | None = None
        self.stats = {"forwards": 0, "skipped_forwards": 0, "blocks": 0, "skipped_blocks": 0}

        def make(inner):
            self.forward = inner
            self.signature = inspect.signature(inner)

            @functools.wraps(inner)  # keeps the signature for those who inspect it
            def forward(*args, **kwargs):
                return self._wrapped(*args, **kwargs)

            forward.transform = self
            return forward

        wrap_forward(model, self.name, make)

    def remove(self) -> None:
        """Give the model back the forward it had before."""
        unwrap_forward(self.model, self.name)

    # ---- one call

    def _wrapped(self, *args, **kwargs):
        a = self.signature.bind(*args, **kwargs).arguments
        if self.call is not None:
            raise RuntimeError("re-entrant call of a step-cached transformer")
        branch = self._branch(a["encoder_hidden_states"], float(a["timestep"].max()), tuple(a["hidden_states"].shape))
        # the blocks as they are now (after any swap inside them), chained across the model's block lists
        chain = [(attr, arity, block) for attr, arity in self.block_lists
                 for block in self.model._modules.get(attr) or []]
        last_in_later_list = chain and chain[0][0] != chain[-1][0]
        self.call = _Call(branch, len(chain), self.layout.join if last_in_later_list else _identity)
        gates: dict[str, list[Callable]] = {attr: [] for attr, _, _ in chain}
        for pos, (attr, arity, block) in enumerate(chain):
            gates[attr].append(functools.partial(self._gate, pos, arity, block))
        shadowed = self.model.__dict__
        try:
            shadowed.update(gates)  # found before nn.Module.__getattr__ looks in _modules
            return self.forward(*args, **kwargs)
        finally:
            for attr in gates:
                shadowed.pop(attr, None)
            self.call = None

    def _branch(self, text: torch.Tensor, t: float, shape: tuple) -> _Branch:
        """The cache of the CFG branch whose text tensor is `text`; a fresh one for a new generation."""
        self.branches = [b for b in self.branches if b.text() is not None]
        branch = next((b for b in self.branches if b.text() is text), None)
        if branch is None:
            branch = _Branch(weakref.ref(text))
            self.branches.append(branch)
        if t > branch.timestep or shape != branch.shape:  # within a generation, timesteps only go down
            branch.first_residual, branch.residual, branch.shared = None, None, False
        elif t == branch.timestep:  # a second call of this step with the same text tensor: two branches share it
            branch.first_residual, branch.residual, branch.shared = None, None, True
        branch.timestep, branch.shape = t, shape
        return branch

    def _gate(self, pos: int, arity: int, block: nn.Module, *args):
        """Block `pos` of the chain, run or skipped as this call decided after its first block."""
        call = self.call
        last = call.n_blocks - 1
        if pos == 0:
            out = block(*args)
            streams = _as_tuple(out)
            residual = streams[0] - args[0]
            br = call.branch
            call.skip = (last > 0 and not br.shared and br.residual is not None
                         and relative_diff(residual, br.first_residual) < self.threshold)
            self.stats["forwards"] += 1
            self.stats["blocks"] += call.n_blocks
            if call.skip:
                self.stats["skipped_forwards"] += 1
                self.stats["skipped_blocks"] += last
            else:
                br.first_residual = residual
                call.first = call.join(streams)
            return out
        if call.skip:
            streams = args[:arity]
            if pos == last:
                streams = tuple(s + r for s, r in zip(streams, call.branch.residual))
            return streams[0] if arity == 1 else streams
        out = block(*args)
        if pos == last:
            call.branch.residual = tuple(o - f for o, f in zip(_as_tuple(out), call.first))
        return out


def step_caches(pipeline) -> list[StepCache]:
    """The step caches installed on the pipeline's DiTs (none when step caching is off)."""
    wrappers = [forward_wrapper(m, StepCache.name) for _, m, _ in pipeline.dits()]
    return [w.transform for w in wrappers if w is not None]


def step_cache_stats(pipeline) -> dict:
    """Forwards and blocks run and skipped, summed over the pipeline's DiTs since their caches were applied."""
    total = {"forwards": 0, "skipped_forwards": 0, "blocks": 0, "skipped_blocks": 0}
    for cache in step_caches(pipeline):
        for key, value in cache.stats.items():
            total[key] += value
    total["skipped_block_fraction"] = total["skipped_blocks"] / total["blocks"] if total["blocks"] else 0.0
    return total
