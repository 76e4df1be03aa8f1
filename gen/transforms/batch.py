"""Batching concurrent generations: DiT calls of several generations that meet run as one batched call.

Each generation runs its own pipeline (own seed, text encoding, scheduler, CFG) in its own thread; only the
transformer calls (and a 2D VAE's decode) are shared. `BatchGroup` knows the generations in flight (`with
group.member(): ...` around each) and where each is: its pipeline's stages mark it (`Pipeline.stage_locks`, entered by
`Timings`): inside "denoise" it is *stepping* (its next DiT call comes after one step of host work: scheduler, CFG),
inside "decode" *decoding*, after either *away* (no DiT call soon), before *new* (encoding its text: it may call
soon). Each DiT gets a
`CallBatcher` forward wrapper (gen/transforms/forward.py). A call is batched with the calls of other generations
whose signature matches: same non-batched arguments (values; tensors compared by content), same shapes past the
batch dimension for the batched ones (`DiT.batch_args`, concatenated along dim 0) and, for a padded text argument
(`DiT.batch_pad`: text -> its mask argument), any length: shorter texts are padded with zeros and masked out.
Timesteps are batched arguments, so generations at different steps (or with different step counts) still share calls.

One forward of a DiT runs at a time: calls that arrive while it runs wait and go together in the next one. The caller
that finds the DiT free gathers: it waits until every stepping generation has its call queued (no timer: they are
between two steps and come; a generation stuck longer than `stall_s` is left for the next forward), and up to
`wait_s` for new ones; never for away ones, and not at all when it is the only generation. So generations fall into
lock-step: one full forward per step while the others wait asleep (the host work of every generation, serialized by
the GIL, runs between forwards, not against the forward's kernel launches). At most `max_batch` calls go together;
every caller gets back its own rows. Waiting callers are woken one by one (their call done, or their turn to run the
next forward), not all at each change.

Outputs equal those of unbatched calls up to the kernels' batch-size-dependent rounding (and, for padded texts, the
masked attention kernel's; a DiT whose padded text leads its attention keys runs those attentions row by row over
the real keys instead, unmasked: `RealKeysByRow`). Not with the step cache (it keys its state by the text tensor of each call).
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from gen.models.attention import masked_calls_through
from gen.transforms.forward import unwrap_forward, wrap_forward

log = logging.getLogger(__name__)
WRAPPER = "batch"
NEW, STEPPING, DECODING, AWAY = "new", "stepping", "decoding", "away"  # where a generation is (module doc)
STALL_S = 1.0  # default: a stepping generation that has not called within this long is left for the next forward
STAGES = {"denoise": (STEPPING, AWAY), "decode": (DECODING, AWAY)}  # the state inside, and after


@dataclass(eq=False)
class _Member:
    """One generation in flight: where it is, and whether a call of it waits in a batcher (or runs in a forward)."""

    state: str = NEW
    queued: bool = False


class BatchGroup:
    """The generations in flight on one pipeline, and the lock its batchers share."""

    def __init__(self, max_batch: int = 8, wait_s: float = 0.005, stall_s: float | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if wait_s < 0:
            raise ValueError(f"batch wait must be >= 0 s, got {wait_s}")
        stall_s = max(STALL_S, wait_s) if stall_s is None else stall_s
        if stall_s < wait_s:
            raise ValueError(f"stall_s must be >= wait_s ({wait_s}), got {stall_s}")
        self.max_batch, self.wait_s, self.stall_s = max_batch, wait_s, stall_s
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)  # gathering callers wait here for the others' calls
        self.members: dict[int, _Member] = {}  # thread id -> the generation that thread runs
        self.batchers: list[CallBatcher] = []
        self.stats = _stats()  # of all its batchers together; each batcher has its own too

    def reset_stats(self) -> None:
        with self.lock:
            for stats in (self.stats, *(b.stats for b in self.batchers)):
                stats.update(_stats())

    def report(self) -> dict[str, dict]:
        """Each batcher's stats, by the name of what it wraps (e.g. "QwenImageTransformer.forward")."""
        with self.lock:
            return {b.name: dict(b.stats) for b in self.batchers}

    @property
    def active(self) -> int:
        return len(self.members)

    @contextlib.contextmanager
    def member(self):
        """One generation in flight for the duration, run by this thread (others may wait for its DiT calls)."""
        me, tid = _Member(), threading.get_ident()
        with self.lock:
            outer = self.members.get(tid)
            if outer is None:
                self.members[tid] = me
        if outer is not None:  # a generation run inside another one's run, in its thread: the same member
            yield outer
            return
        try:
            yield me
        finally:
            with self.lock:
                del self.members[tid]
                self.arrived.notify_all()  # a gatherer waiting for this generation's call need not wait any longer

    def stage(self, name: str) -> "_Stage":
        """The context manager marking the current thread's generation inside pipeline stage `name` (STAGES)."""
        return _Stage(self, *STAGES.get(name, (None, None)))

    def _mark(self, state: str | None) -> None:
        if state is None:
            return
        with self.lock:
            me = self.members.get(threading.get_ident())
            if me is not None and me.state != state:
                me.state = state
                self.arrived.notify_all()

    def _expected(self, states: tuple[str, ...]) -> set[str]:
        """The states in `states` of the generations that have no call queued (lock held)."""
        return {m.state for m in self.members.values() if not m.queued and m.state in states}


def _stats() -> dict:
    """calls in, calls that shared a forward, forwards; seconds spent gathering and running forwards of several calls;
    gathers that stopped waiting for a stepping generation at stall_s."""
    return dict(calls=0, batched_calls=0, forwards=0, gather_s=0.0, forward_s=0.0, stalls=0)


class _Stage:
    """A pipeline stage as a batch group sees it: marks the generation `inside` on entry and `after` on exit, and
    holds `lock` (if any) inside (Timings enters it as the stage's lock, from any thread)."""

    def __init__(self, group: BatchGroup, inside: str | None, after: str | None, lock: threading.Lock | None = None):
        self.group, self.inside, self.after, self.lock = group, inside, after, lock

    def __enter__(self):
        self.group._mark(self.inside)  # waiting for the lock is time away too
        if self.lock is not None:
            self.lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()
        self.group._mark(self.after)


@dataclass(eq=False)  # compared by identity (its call holds tensors)
class _Entry:
    """One call waiting to run, alone or in a batch; the caller that finds the module free runs a batch."""

    call: dict
    key: Any
    member: _Member | None
    wake: threading.Condition
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
    """The batching wrapper of one module's `method` (a DiT's forward; see the module doc). `expects`: the states of
    generations whose calls a gatherer waits for (the DiT: stepping ones, and new ones up to wait_s); `after`: the state a
    generation takes once its call is done (a VAE decoder's caller is away: it makes one call per decode)."""

    def __init__(self, model: nn.Module, group: BatchGroup, batch_args: tuple[str, ...],
                 batch_pad: tuple[tuple[str, str], ...] = (), method: str = "forward",
                 expects: tuple[str, ...] = (STEPPING, NEW), after: str | None = None, real_keys: bool = False):
        self.model, self.group, self.method, self.expects, self.after = model, group, method, expects, after
        self.real_keys = real_keys  # merge_calls' real_keys (the DiT's padded_text_leads_keys)
        self.batch_args, self.batch_pad = set(batch_args), dict(batch_pad)
        self.queue: list[_Entry] = []  # calls waiting for this module
        self.busy = False  # a call of this module is gathering or running
        self.name, self.stats = f"{type(model).__name__}.{method}", _stats()
        group.batchers.append(self)

        def make(inner):
            self.forward, self.signature = inner, inspect.signature(inner)
            unknown = (self.batch_args | set(self.batch_pad.values())) - set(self.signature.parameters)
            assert not unknown, f"batch arguments {sorted(unknown)} are not arguments of {type(model).__name__}"
            return self._call

        if method == "forward":
            wrap_forward(model, WRAPPER, make)
        else:
            model.__dict__[method] = make(getattr(model, method))

    def _count(self, name: str, value: float = 1) -> None:  # lock held
        self.stats[name] += value
        self.group.stats[name] += value

    def remove(self) -> None:
        self.group.batchers.remove(self)
        if self.method == "forward":
            unwrap_forward(self.model, WRAPPER)
        else:
            self.model.__dict__.pop(self.method, None)

    # ---- one call

    def _call(self, *args, **kwargs):
        group = self.group
        with group.lock:
            self._count("calls")
            alone = len(group.members) <= 1 or group.max_batch == 1
            if alone:
                self._count("forwards")
        if alone:
            return self.forward(*args, **kwargs)
        a = self.signature.bind(*args, **kwargs)
        a.apply_defaults()
        call = dict(a.arguments)
        masks = set(self.batch_pad.values())
        key = tuple((name, _key_of(v, name in self.batch_args, name in self.batch_pad))
                    for name, v in call.items() if name not in masks)  # a missing mask means all tokens count
        with group.lock:
            entry = _Entry(call, key, group.members.get(threading.get_ident()), threading.Condition(group.lock))
            self._enqueue(entry)
            while not entry.done:
                if not self.busy:  # this module is free: gather the waiting calls that go with this one, run them
                    self.busy = True
                    try:
                        batch = self._gather(entry)
                    except BaseException:  # leave the module free for the others, then let the error go on
                        self._dequeue([entry])
                        self._release()
                        raise
                    break
                entry.wake.wait()
            else:  # another caller's forward ran this call
                if entry.error is not None:
                    raise entry.error
                return entry.output
        start = time.perf_counter()
        try:
            outputs = self._run([e.call for e in batch])
            for e, out in zip(batch, outputs):
                e.output = out
        except BaseException as err:  # every caller of the batch gets the error
            for e in batch:
                e.error = err
        finally:
            with group.lock:
                if len(batch) > 1:
                    self._count("forward_s", time.perf_counter() - start)
                for e in batch:
                    e.done = True
                    e.wake.notify()
                self._dequeue(batch)
                self._release()
        if entry.error is not None:
            raise entry.error
        return entry.output

    def _enqueue(self, entry: _Entry) -> None:  # lock held
        self.queue.append(entry)
        if entry.member is not None:
            entry.member.queued = True
        self.group.arrived.notify_all()  # a gatherer may be waiting for this call

    def _dequeue(self, entries: list[_Entry]) -> None:  # lock held; the entries' calls are done (or failed)
        for e in entries:
            if e in self.queue:
                self.queue.remove(e)
            if e.member is not None:
                e.member.queued = False
                if self.after is not None and e.done:
                    e.member.state = self.after

    def _release(self) -> None:  # lock held: the module is free; the oldest waiting call gathers the next batch
        self.busy = False
        if self.queue:
            self.queue[0].wake.notify()

    def _gather(self, entry: _Entry) -> list[_Entry]:
        """The batch of `entry` (lock held, this module busy): wait while generations that will call soon have not
        (new ones up to wait_s, the others up to stall_s), then take the matching calls out of the queue (their
        generations stay `queued` until their forward is done)."""
        group = self.group
        start = time.monotonic()
        while len(batch := self._batch_for(entry)) < group.max_batch:
            waited = time.monotonic() - start
            expected = group._expected(self.expects)
            if waited >= group.wait_s:
                expected.discard(NEW)
            if not expected:
                break
            if waited >= group.stall_s:
                self._count("stalls")
                break
            group.arrived.wait((group.wait_s if NEW in expected else group.stall_s) - waited)
        for e in batch:
            self.queue.remove(e)
        self._count("gather_s", time.monotonic() - start)
        self._count("forwards")
        if len(batch) > 1:
            self._count("batched_calls", len(batch))
        return batch

    def _batch_for(self, entry: _Entry) -> list[_Entry]:
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
        return merge_calls(self.forward, calls, tuple(self.batch_args), tuple(self.batch_pad.items()), self.real_keys)


class RealKeysByRow:
    """The attention backend of a merged forward whose one padded text leads every masked attention's keys
    (`DiT.padded_text_leads_keys`): a masked call runs over each row's real keys (its text's first `lengths[b]`
    tokens, then everything from `padded` on), unmasked, rows of one length together, instead of as one masked
    batch: the same keys attended, so the same result up to the kernels' rounding, without the masked kernel path
    (cuDNN's was 1.4-2.6x slower than two unmasked calls at Qwen-Image's shapes: benchmarks/masked_attention.py).
    Queries at padded positions attend to the real keys, as under the mask. Calls of another shape go to `inner`,
    the backend installed. One per merged forward, for its thread only (gen.models.attention.masked_calls_through:
    concurrent forwards of other models are not affected; under torch.compile, the lengths are guarded values)."""

    def __init__(self, lengths: list[int], padded: int):
        self.lengths, self.padded = lengths, padded

    def __call__(self, q, k, v, mask, inner: Callable):
        if q.shape[0] != len(self.lengths) or k.shape[1] != mask.shape[-1] or k.shape[1] < self.padded:
            return inner(q, k, v, mask)
        outs, start = [], 0
        for n, same in itertools.groupby(self.lengths):  # runs of rows with one text length
            rows = slice(start, start + len(list(same)))
            start = rows.stop
            kr, vr = k[rows], v[rows]
            if n < self.padded:
                kr, vr = (torch.cat([t[:, :n], t[:, self.padded:]], dim=1) for t in (kr, vr))
            outs.append(inner(q[rows], kr, vr, None))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def merge_calls(forward: Callable, calls: list[dict], batch_args: tuple[str, ...],
                batch_pad: tuple[tuple[str, str], ...] = (), real_keys: bool = False) -> list[Any]:
    """`forward(**call)` for each of `calls` (keyword dicts of one signature) as one batched forward: `batch_args`
    concatenated along dim 0, padded texts (`batch_pad`: text -> mask argument) padded with zeros and masked,
    everything else taken from the first call; each call gets its own rows of every output tensor. `real_keys`
    (the DiT's `padded_text_leads_keys`): when one text was padded and no call brought its own mask, its masked
    attentions run through `RealKeysByRow`."""
    if len(calls) == 1:
        return [forward(**calls[0])]
    pads = dict(batch_pad)
    merged = dict(calls[0])
    by_row = None  # (lengths per row, padded length) for RealKeysByRow
    for text, mask in pads.items():
        if calls[0].get(text) is None:
            continue
        length = max(c[text].shape[1] for c in calls)
        if all(c[text].shape[1] == length and c.get(mask) is None for c in calls):
            merged[text] = torch.cat([c[text] for c in calls])  # nothing to pad: no mask, as unbatched
            continue
        if real_keys and len(pads) == 1 and all(c.get(mask) is None for c in calls):
            by_row = ([c[text].shape[1] for c in calls for _ in range(c[text].shape[0])], length)
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
    if by_row is None:
        out = forward(**merged)
    else:
        with masked_calls_through(RealKeysByRow(*by_row)):
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


class StageMarks:
    """The pipeline's stages (STAGES) mark where each generation is for `group`; text encoding also runs one
    generation at a time unless `serial_encode` is False (tokenizers change their padding settings between calls and
    are not safe to share between threads; the LLM runtime's own encoder merges concurrent calls instead)."""

    def __init__(self, pipeline, group: BatchGroup, serial_encode: bool = True):
        self.names = [*STAGES, *(["encode_text"] if serial_encode else [])]
        taken = set(self.names) & set(pipeline.stage_locks)
        assert not taken, f"stages {sorted(taken)} already have locks"
        self.pipeline = pipeline
        for name in self.names:
            pipeline.stage_locks[name] = _Stage(group, *STAGES.get(name, (None, None)),
                                                threading.Lock() if name == "encode_text" else None)

    def remove(self) -> None:
        for name in self.names:
            self.pipeline.stage_locks.pop(name, None)


def merges_encodes(text_encoder) -> bool:
    """Whether concurrent encode calls of `text_encoder` are safe and merged into one batched call: the LLM runtime's
    text encoder (component_loaders/gguf_encoder.py; tokenizes without padding or truncation, so its tokenizer's
    settings never change)."""
    from component_loaders.gguf_encoder import LLMTextEncoder

    return isinstance(text_encoder, LLMTextEncoder)


DECODER_CLASSES = ("AutoencoderKL",)  # VAEs whose decode keeps no state between calls: concurrent decodes merge


def enable_batching(pipeline, group: BatchGroup) -> list:
    """A CallBatcher on each of the pipeline's DiTs whose family declares batch arguments and on a 2D VAE's decode;
    the stages marked (text encoding serialized unless its encoder merges concurrent calls); other VAE calls
    serialized."""
    undo: list = [CallBatcher(m, group, dit.batch_args, dit.batch_pad, real_keys=dit.padded_text_leads_keys)
                  for _, m, dit in pipeline.dits() if dit.batch_args]
    undo.append(StageMarks(pipeline, group, serial_encode=not merges_encodes(pipeline.components.get("text_encoder"))))
    vae = pipeline.components.get("vae")
    if isinstance(vae, nn.Module):
        serial = ("encode", "decode", "tiled_decode", "tiled_encode")
        if type(vae).__name__ in DECODER_CLASSES:
            undo.append(CallBatcher(vae, group, ("z",), method="decode", expects=(DECODING,), after=AWAY))
            serial = ("encode", "tiled_encode")
        undo.append(Serialized(vae, serial, threading.Lock()))
    return undo


def disable_batching(batchers: list) -> None:
    for b in reversed(batchers):
        b.remove()


__all__ = ["BatchGroup", "CallBatcher", "StageMarks", "enable_batching", "disable_batching", "merge_calls"]
