"""Batching concurrent generations: DiT calls of several generations that meet run as one batched call.

Each generation runs its own pipeline (own seed, text encoding, scheduler, CFG) in its own thread; only the
transformer calls are shared. `BatchGroup` counts the generations in flight (`with group.member(): ...` around
each); each DiT gets a `CallBatcher` forward wrapper (gen/transforms/forward.py). A call is batched with the calls of
other generations whose signature matches: same non-batched arguments (values; tensors compared by content), same
shapes past the batch dimension for the batched ones (`DiT.batch_args`, concatenated along dim 0) and, for a padded
text argument (`DiT.batch_pad`: text -> its mask argument), any length: shorter texts are padded with zeros and
masked out. Timesteps are batched arguments, so generations at different steps (or with different step counts) still
share calls. One forward of a DiT runs at a time: calls that arrive while it runs wait and go together in the next
one (so generations fall into step with each other), and the caller that finds the DiT free waits up to `wait_s`
for the other generations in flight (not at all when it is the only one); at most `max_batch` calls go together;
every caller gets back its own rows.

Outputs equal those of unbatched calls up to the kernels' batch-size-dependent rounding (and, for padded texts, the
masked attention kernel's). Not with the step cache (it keys its state by the text tensor of each call).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from gen.transforms.forward import unwrap_forward, wrap_forward

log = logging.getLogger(__name__)
WRAPPER = "batch"


class BatchGroup:
    """The generations in flight on one pipeline, and the lock its batchers share."""

    def __init__(self, max_batch: int = 8, wait_s: float = 0.005):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if wait_s < 0:
            raise ValueError(f"batch wait must be >= 0 s, got {wait_s}")
        self.max_batch, self.wait_s = max_batch, wait_s
        self.cond = threading.Condition()
        self.active = 0
        self.stats = {"calls": 0, "batched_calls": 0, "forwards": 0}  # calls in, calls that shared a forward, forwards

    @contextlib.contextmanager
    def member(self):
        """One generation in flight for the duration (others may wait for its DiT calls)."""
        with self.cond:
            self.active += 1
        try:
            yield
        finally:
            with self.cond:
                self.active -= 1
                self.cond.notify_all()  # a leader waiting for this generation's calls need not wait any longer


@dataclass(eq=False)  # compared by identity (its call holds tensors)
class _Entry:
    """One DiT call waiting to run, alone or in a batch; the caller that finds the DiT free runs a batch."""

    call: dict
    key: Any
    done: bool = False
    output: Any = None
    error: BaseException | None = None


def _key_of(value: Any, batched: bool, padded: bool) -> Any:
    if isinstance(value, torch.Tensor):
        shape = tuple(value.shape[1:]) if batched else tuple(value.shape)
        if padded:
            shape = shape[1:]  # any text length
        return ("tensor", shape, value.dtype, value.device)
    if value is None:
        return ("none",)
    leaves, spec = tree_flatten(value)
    if len(leaves) != 1 or leaves[0] is not value:
        return ("tree", str(spec), tuple(_key_of(x, False, False) for x in leaves))
    try:
        hash(value)
    except TypeError:
        return ("repr", repr(value))
    return ("value", value)


class CallBatcher:
    """The forward wrapper of one DiT; see the module doc."""

    def __init__(self, model: nn.Module, group: BatchGroup, batch_args: tuple[str, ...],
                 batch_pad: tuple[tuple[str, str], ...] = ()):
        self.model, self.group = model, group
        self.batch_args, self.batch_pad = set(batch_args), dict(batch_pad)
        self.queue: list[_Entry] = []  # calls waiting for this DiT
        self.busy = False  # a forward of this DiT is running

        def make(inner):
            self.forward, self.signature = inner, inspect.signature(inner)
            unknown = (self.batch_args | set(self.batch_pad.values())) - set(self.signature.parameters)
            assert not unknown, f"batch arguments {sorted(unknown)} are not arguments of {type(model).__name__}"
            return self._call

        wrap_forward(model, WRAPPER, make)

    def remove(self) -> None:
        unwrap_forward(self.model, WRAPPER)

    # ---- one call

    def _call(self, *args, **kwargs):
        group = self.group
        with group.cond:
            group.stats["calls"] += 1
            alone = group.active <= 1 or group.max_batch == 1
        if alone:
            with group.cond:
                group.stats["forwards"] += 1
            return self.forward(*args, **kwargs)
        a = self.signature.bind(*args, **kwargs)
        a.apply_defaults()
        call = dict(a.arguments)
        masks = set(self.batch_pad.values())
        key = tuple((name, _key_of(v, name in self.batch_args, name in self.batch_pad))
                    for name, v in call.items() if name not in masks)  # a missing mask means all tokens count
        entry = _Entry(call, key)
        with group.cond:
            self.queue.append(entry)
            group.cond.notify_all()  # a runner gathering its batch may be waiting for this call
            while not entry.done:
                if not self.busy:  # this DiT is free: run the waiting calls that go with this one
                    self.busy = True
                    try:
                        deadline = time.monotonic() + group.wait_s
                        while (len(self._batch_for(entry)) < min(group.max_batch, group.active)
                               and (left := deadline - time.monotonic()) > 0):
                            group.cond.wait(left)  # the others are between two calls (a scheduler step): they come
                        batch = self._batch_for(entry)
                        for e in batch:
                            self.queue.remove(e)
                    except BaseException:  # leave the DiT free for the others, then let the error go on
                        self.busy = False
                        self.queue.remove(entry)
                        group.cond.notify_all()
                        raise
                    group.stats["forwards"] += 1
                    if len(batch) > 1:
                        group.stats["batched_calls"] += len(batch)
                    break
                group.cond.wait()
            else:  # another caller's forward ran this call
                if entry.error is not None:
                    raise entry.error
                return entry.output
        try:
            outputs = self._run([e.call for e in batch])
            for e, out in zip(batch, outputs):
                e.output = out
        except BaseException as err:  # every caller of the batch gets the error
            for e in batch:
                e.error = err
        finally:
            with group.cond:
                for e in batch:
                    e.done = True
                self.busy = False
                group.cond.notify_all()
        if entry.error is not None:
            raise entry.error
        return entry.output

    def _batch_for(self, entry: "_Entry") -> list["_Entry"]:
        """The waiting calls that can run with `entry` (itself first), at most max_batch."""
        same = [e for e in self.queue if e is not entry and e.key == entry.key
                and self._same_constants(entry.call, e.call)]
        return [entry, *same][: self.group.max_batch]

    def _same_constants(self, first: dict, call: dict) -> bool:
        """Non-batched tensors equal in content (positions ids, ...) — same shapes are already in the key."""
        masks = set(self.batch_pad.values())
        for name, v in call.items():
            if name in self.batch_args or name in masks or not isinstance(v, torch.Tensor):
                continue
            if v is not first[name] and not torch.equal(v, first[name]):
                return False
        return True

    def _run(self, calls: list[dict]) -> list[Any]:
        return merge_calls(self.forward, calls, tuple(self.batch_args), tuple(self.batch_pad.items()))


def merge_calls(forward: Callable, calls: list[dict], batch_args: tuple[str, ...],
                batch_pad: tuple[tuple[str, str], ...] = ()) -> list[Any]:
    """`forward(**call)` for each of `calls` (keyword dicts of one signature) as one batched forward: `batch_args`
    concatenated along dim 0, padded texts (`batch_pad`: text -> mask argument) padded with zeros and masked,
    everything else taken from the first call; each call gets its own rows of every output tensor."""
    if len(calls) == 1:
        return [forward(**calls[0])]
    pads = dict(batch_pad)
    merged = dict(calls[0])
    for text, mask in pads.items():
        if calls[0].get(text) is None:
            continue
        length = max(c[text].shape[1] for c in calls)
        if all(c[text].shape[1] == length and c.get(mask) is None for c in calls):
            merged[text] = torch.cat([c[text] for c in calls])  # nothing to pad: no mask, as unbatched
            continue
        padded, masks = [], []
        for c in calls:
            t = c[text]
            m = c.get(mask)
            if m is None:
                m = torch.ones(t.shape[:2], dtype=torch.long, device=t.device)
            pad = length - t.shape[1]
            padded.append(F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad)))
            masks.append(F.pad(m, (0, pad)))
        merged[text], merged[mask] = torch.cat(padded), torch.cat(masks)
    for name in batch_args:
        if name in pads or calls[0].get(name) is None:
            continue
        merged[name] = torch.cat([c[name] for c in calls])
    out = forward(**merged)
    sizes = [_batch_size(c, batch_args) for c in calls]
    leaves, spec = tree_flatten(out)
    parts = [x.split(sizes) if isinstance(x, torch.Tensor) else [x] * len(calls) for x in leaves]
    return [tree_unflatten([p[i] for p in parts], spec) for i in range(len(calls))]


def _batch_size(call: dict, batch_args: tuple[str, ...]) -> int:
    for name in sorted(batch_args):
        v = call.get(name)
        if isinstance(v, torch.Tensor):
            return v.shape[0]
    raise AssertionError("a batched call has no batched tensor")


class Serialized:
    """`methods` of `module` run one thread at a time (diffusers' video VAEs keep per-call caches on the module:
    two concurrent decodes would corrupt each other)."""

    def __init__(self, module: nn.Module, methods: tuple[str, ...], lock: threading.Lock):
        self.module, self.methods = module, [m for m in methods if hasattr(module, m)]
        for name in self.methods:
            method = getattr(module, name)

            def locked(*args, method=method, **kwargs):
                with lock:
                    return method(*args, **kwargs)

            module.__dict__[name] = locked

    def remove(self) -> None:
        for name in self.methods:
            self.module.__dict__.pop(name, None)


class SerializedStages:
    """The pipeline's stages named `names` run one generation at a time (text encoding: tokenizers change their
    padding settings between calls and are not safe to share between threads)."""

    def __init__(self, pipeline, names: tuple[str, ...]):
        self.pipeline, self.names = pipeline, [n for n in names if n not in pipeline.stage_locks]
        for name in self.names:
            pipeline.stage_locks[name] = threading.Lock()

    def remove(self) -> None:
        for name in self.names:
            self.pipeline.stage_locks.pop(name, None)


def enable_batching(pipeline, group: BatchGroup) -> list:
    """A CallBatcher on each of the pipeline's DiTs whose family declares batch arguments; text encoding and the
    VAE's encode and decode serialized."""
    undo: list = [CallBatcher(m, group, dit.batch_args, dit.batch_pad) for _, m, dit in pipeline.dits()
                  if dit.batch_args]
    undo.append(SerializedStages(pipeline, ("encode_text",)))
    vae = pipeline.components.get("vae")
    if isinstance(vae, nn.Module):
        undo.append(Serialized(vae, ("encode", "decode", "tiled_decode", "tiled_encode"), threading.Lock()))
    return undo


def disable_batching(batchers: list) -> None:
    for b in reversed(batchers):
        b.remove()


__all__ = ["BatchGroup", "CallBatcher", "enable_batching", "disable_batching", "merge_calls"]
