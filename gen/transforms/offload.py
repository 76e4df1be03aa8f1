"""Weight offload: a pipeline's components live in pinned host memory and move to the accelerator when they run.

Applied from outside the model files (gen.transforms.apply_transforms, first after the attention backend); the
pipelines call their components as always and the moves follow the calls:

- `model`: each component (text encoders, image encoder, DiT(s), VAE) is a unit; calling it (its forward, or a
  VAE's encode / decode, an LLM encoder's encode) loads it and evicts the others, so the stages move them in their
  own order: text encoders, then the DiT, then the VAE. With a memory budget the least recently used units are
  evicted only as far as needed (small ones then stay on the device).
- `layer`: as `model`, but a DiT's repeated blocks (its family's `DiT.blocks`) are streamed: block i runs while
  block i+1 (`prefetch` blocks ahead) is copied on a side stream; a block's weights leave the device after it
  ran. Everything else of the DiT (embedders, final layers, and, with a budget, the leading blocks that fit) stays
  on the device while the DiT is in use.
- `none` (chosen by `max_gpu_memory` when everything fits): every unit is loaded once and stays.

A move never changes a module: each tensor (parameter, buffer, or plain tensor attribute such as a joined weight)
keeps its identity and gets its `.data` pointed at a device copy of its storage, views of one storage staying views
of one copy (joined projections). Eviction points `.data` back at the host copy: weights are never copied back.
Host copies are packed into pinned slabs of whole powers of two (the pinned allocator rounds every allocation up to
a power of two, so one allocation per tensor would waste up to half the host memory).

`settle()` runs once every transform is applied (apply_transforms calls it last): FP8 and joined projections change
the tensors, so the sizes, the plan and the packing are decided then. `plan_offload` picks the lightest mode that fits
`max_gpu_memory` (weights plus `WORK_RESERVE` for activations), or says the least any mode needs.

On the CPU the same code runs with plain copies (no streams), so the order of moves, what is on the "device" at
each point and the outputs are tested there; `Mover.log` records each move.
"""
from __future__ import annotations

import bisect
import contextlib
import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from gen.types import GenError

log = logging.getLogger(__name__)

MODES = ("none", "model", "layer")
GIB = 1 << 30
WORK_RESERVE = 3 * GIB  # kept free for activations by the plan (a VAE decode is usually the peak)
# blocks kept resident next to the streaming window leave this share of the budget to activations: a DiT step's
# activations grow with the request (measured on an H200: Wan2.1-14B at 480p x 33 frames needs ~9 GiB besides its
# weights, and a plan filling 24 GB up to the 3 GiB reserve ran out of memory)
RESIDENT_MARGIN = 0.4
SLAB = 1 << 30  # pinned host memory is taken in slabs of this size (or the next power of two above a bigger tensor)
ALIGN = 512  # byte alignment of each storage inside a slab
METHODS = ("encode", "decode")  # component entry points besides forward (VAEs; LLM encoders)
LLM_METHODS = ("encode", "generate", "chat")


def check_offload(mode: str | None, max_gpu_memory: float | None) -> None:
    """GenError naming the bad value unless `mode` is None or one of MODES and `max_gpu_memory` a positive number."""
    if mode is not None and mode not in MODES:
        raise GenError(f"offload must be one of {list(MODES)}, got {mode!r}", param="offload")
    if max_gpu_memory is not None and (isinstance(max_gpu_memory, bool) or not isinstance(max_gpu_memory, (int, float))
                                       or not max_gpu_memory > 0):
        raise GenError(f"max_gpu_memory must be a positive number of GiB, got {max_gpu_memory!r}",
                       param="max_gpu_memory")


# ---------------------------------------------------------------- the tensors of a unit


def module_tensors(roots: list[nn.Module], exclude: set[int] = frozenset()) -> list[torch.Tensor]:
    """Every tensor the modules under `roots` hold (parameters, buffers, plain tensor attributes), each once; the
    subtrees of modules whose id is in `exclude` are left out."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    stack = list(reversed(roots))
    visited: set[int] = set()
    while stack:
        m = stack.pop()
        if m is None or id(m) in exclude or id(m) in visited:
            continue
        visited.add(id(m))
        values = list(m._parameters.values()) + list(m._buffers.values())
        values += [v for v in m.__dict__.values() if isinstance(v, torch.Tensor)]
        for t in values:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        stack.extend(reversed(list(m._modules.values())))
    return [t for t in out if t is not None]


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (s.device.type, s.data_ptr(), s.nbytes()) if s.nbytes() else ("empty", id(t))


def storage_groups(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The tensors grouped by the storage they view (a group moves as one copy, so views stay views)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(_storage_key(t), []).append(t)
    return list(groups.values())


def tensors_nbytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the storages under `tensors` (each once), for tensors not packed into an arena."""
    return sum(g[0].untyped_storage().nbytes() for g in storage_groups(tensors))


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under `t` as a flat uint8 tensor."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _view_like(buf: torch.Tensor, start: int, t: torch.Tensor) -> torch.Tensor:
    """`t`'s view (dtype, size, stride, offset) of bytes [start, ...) of its storage, copied to the uint8 `buf`."""
    item = t.element_size()
    base = buf.storage_offset() - start  # where byte 0 of t's storage lands in buf's storage
    assert base % item == 0, (base, t.dtype)
    whole = torch.empty(0, dtype=t.dtype, device=buf.device).set_(buf.untyped_storage())
    return whole.as_strided(t.size(), t.stride(), base // item + t.storage_offset())


@dataclass
class Unit:
    """Tensors moved together: a component, a DiT without its streamed blocks, or one block."""

    name: str
    roots: list[nn.Module]
    exclude: set[int] = field(default_factory=set)  # ids of submodules (streamed blocks) not part of this unit
    loaded: "Loaded | None" = None
    nbytes: int = 0
    permanent: bool = False  # never evicted (mode none)
    on_evict: list[Callable[[], None]] = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        return module_tensors(self.roots, self.exclude)

    def measure(self, mover: "Mover") -> int:
        self.nbytes = mover.nbytes(self.tensors())
        return self.nbytes


@dataclass
class Loaded:
    """A unit's device copies: (tensor, its host data) to point back at on eviction, the device buffers, and the
    event a side-stream copy recorded."""

    records: list[tuple[torch.Tensor, torch.Tensor]]
    buffers: list[torch.Tensor]
    event: Any = None
    side: bool = False


# ---------------------------------------------------------------- host memory and moves


class HostArena:
    """Host copies of storages packed into slabs (pinned when `pin`); a slab is SLAB bytes, or the next power of two
    above a storage bigger than that, and fills first-fit. Remembers where each packed storage lies."""

    def __init__(self, pin: bool, slab: int = SLAB):
        self.pin, self.slab = pin, slab
        self.slabs: list[list] = []  # [buffer, bytes used]
        self.bases: set[int] = set()  # data_ptr of each slab
        self.ranges: list[tuple[int, int, int]] = []  # (absolute start address, bytes, start within its slab), sorted

    def place(self, data: torch.Tensor, keep_alignment: bool = False) -> tuple[torch.Tensor, int]:
        """Copy the uint8 `data` into a slab; returns (slab, byte offset). `keep_alignment`: at the same address modulo
        64 as `data` (vectorized CPU kernels round differently at other alignments)."""
        n = data.numel()

        def start_in(buf, used):
            start = -(-used // ALIGN) * ALIGN
            return start + (data.data_ptr() - buf.data_ptr() - start) % 64 if keep_alignment else start

        for entry in self.slabs:
            buf, used = entry
            start = start_in(buf, used)
            if start + n <= buf.numel():
                break
        else:
            size = max(self.slab, 1 << max(n + 64 - 1, 1).bit_length())
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            entry, start = [buf, 0], 0
            start = start_in(buf, 0)
            self.slabs.append(entry)
            self.bases.add(buf.data_ptr())
        buf[start:start + n].copy_(data)
        entry[1] = start + n
        bisect.insort(self.ranges, (buf.data_ptr() + start, n, start))
        return buf, start

    def owns(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self.bases

    def extent(self, t: torch.Tensor) -> tuple[int, int]:
        """(start, bytes) within its slab of the packed storage `t` views."""
        i = bisect.bisect_right(self.ranges, (t.data_ptr(), float("inf"))) - 1
        assert i >= 0, "tensor not inside a packed storage"
        addr, n, start = self.ranges[i]
        assert addr <= t.data_ptr() <= addr + n, "tensor not inside a packed storage"
        return start, n

    @property
    def nbytes(self) -> int:
        return sum(buf.numel() for buf, _ in self.slabs)


@dataclass
class Extent:
    """One host storage (or the packed copy of one, inside a slab) and the tensors viewing it."""

    host: torch.Tensor  # its bytes, uint8
    start: int  # where they begin in the storage the tensors view
    tensors: list[torch.Tensor]


class Mover:
    """Copies storages to `device` (on the current stream, or on a side stream with an event to wait for) and points
    tensors at the copies; `log` (a list, when set) records ("load" | "evict" | "wait", unit name, side)."""

    def __init__(self, device: torch.device, pack: bool | None = None):
        self.device = torch.device(device)
        self.accel = self.device.type != "cpu"
        self.pack = self.accel if pack is None else pack  # pack host copies into (pinned, on accelerators) slabs
        self.arena = HostArena(pin=self.accel) if self.pack else None
        self.side = torch.Stream(self.device) if self.accel else None
        self.log: list[tuple] | None = None
        self.stats = {"loads": 0, "bytes": 0}

    def _note(self, *entry) -> None:
        if self.log is not None:
            self.log.append(entry)

    def extents(self, tensors: list[torch.Tensor]) -> list[Extent]:
        """`tensors` grouped by the (packed) storage they view."""
        out: dict[tuple, Extent] = {}
        for t in tensors:
            if self.arena is not None and self.arena.owns(t):
                start, n = self.arena.extent(t)
                key = (t.untyped_storage().data_ptr(), start)
                if key not in out:
                    out[key] = Extent(_bytes_of(t)[start:start + n], start, [])
            else:
                key = _storage_key(t)
                if key not in out:
                    out[key] = Extent(_bytes_of(t), 0, [])
            out[key].tensors.append(t)
        return list(out.values())

    def nbytes(self, tensors: list[torch.Tensor]) -> int:
        return sum(e.host.numel() for e in self.extents(tensors))

    def home(self, tensors: list[torch.Tensor]) -> None:
        """Give every storage of `tensors` its host copy: packed into the arena (each once) when packing, copied to
        the host when it is on the device; the tensors then view those copies."""
        for group in storage_groups(tensors):
            t0 = group[0]
            if t0.untyped_storage().nbytes() == 0 or (self.arena is not None and self.arena.owns(t0)):
                continue
            if self.arena is None:
                if t0.device.type == "cpu":
                    continue
                buf, offset = _bytes_of(t0).cpu(), 0  # loaded on the device: its host copy
            else:
                buf, offset = self.arena.place(_bytes_of(t0).cpu(), keep_alignment=not self.accel)
            views = [_view_like(buf, -offset, t) for t in group]
            for t, v in zip(group, views):
                t.data = v

    def _buffer(self, host: torch.Tensor) -> torch.Tensor:
        """An empty device buffer for `host`'s bytes; on the CPU at the same address modulo 64 as `host`, so that
        vectorized kernels give the same bits as on the host copy."""
        n = host.numel()
        if self.accel:
            return torch.empty(n, dtype=torch.uint8, device=self.device)
        raw = torch.empty(n + 64, dtype=torch.uint8)
        shift = (host.data_ptr() - raw.data_ptr()) % 64
        return raw[shift:shift + n]

    def main_stream(self):
        return torch.accelerator.current_stream(self.device) if self.accel else None

    def load(self, unit: Unit, side: bool = False) -> Loaded:
        """Copy `unit`'s storages to the device and point its tensors at them (`side`: on the side stream)."""
        tensors = unit.tensors()
        self.home(tensors)
        records, buffers = [], []
        stream = self.side if side and self.accel else None
        with torch.inference_mode(False), (stream if stream is not None else contextlib.nullcontext()):
            for ext in self.extents(tensors):
                buf = self._buffer(ext.host)
                buf.copy_(ext.host, non_blocking=True)
                views = [_view_like(buf, ext.start, t) for t in ext.tensors]
                for t, v in zip(ext.tensors, views):
                    records.append((t, t.data))
                    t.data = v
                buffers.append(buf)
                self.stats["bytes"] += buf.numel()
            event = stream.record_event() if stream is not None else None
        self.stats["loads"] += 1
        self._note("load", unit.name, side)
        loaded = Loaded(records, buffers, event, side)
        unit.loaded = loaded
        return loaded

    def wait(self, unit: Unit) -> None:
        """Make the current stream wait for `unit`'s side-stream copy."""
        loaded = unit.loaded
        if loaded is not None and loaded.event is not None:
            self.main_stream().wait_event(loaded.event)
            loaded.event = None
        self._note("wait", unit.name, loaded is not None and loaded.side)

    def evict(self, unit: Unit) -> None:
        """Point `unit`'s tensors back at their host copies and release the device copies (once the work queued on
        the current stream no longer reads them)."""
        loaded = unit.loaded
        if loaded is None:
            return
        for t, host in loaded.records:
            t.data = host
        if loaded.side and self.accel:
            main = self.main_stream()
            for buf in loaded.buffers:
                buf.record_stream(main)
        unit.loaded = None
        self._note("evict", unit.name, loaded.side)
        for fn in unit.on_evict:
            fn()


def _to_device(obj, device: torch.device):
    """Tensors in `obj` (nested tuples, lists, dicts) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device) if obj.device != device else obj
    if isinstance(obj, (list, tuple)):
        moved = [_to_device(o, device) for o in obj]
        return type(obj)(moved) if type(obj) in (list, tuple) else obj
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            obj[k] = _to_device(v, device)
        return obj
    return obj


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class DiTSizes:
    """A DiT's bytes: everything but its repeated blocks, and each block in call order."""

    slot: str
    rest: int
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """The chosen mode and how much it keeps on the device."""

    mode: str
    max_gpu_memory: float | None  # GiB asked for (None: no budget)
    budget: int | None  # bytes the loaded units may take together (None: one component at a time)
    resident_blocks: dict[str, int]  # DiT slot -> leading blocks kept with the rest (layer)
    need: int  # bytes this plan needs on the device, working reserve included
    prefetch: int = 1

    def describe(self) -> str:
        cap = "" if self.max_gpu_memory is None else f" (max_gpu_memory {self.max_gpu_memory:g} GiB)"
        what = {"none": "every component stays on the device",
                "model": "each component moves to the device for its own stage",
                "layer": f"DiT blocks stream from pinned host memory, {self.prefetch} ahead; other components move "
                         "to the device for their own stage"}[self.mode]
        kept = "".join(f"; {slot}: {n} leading blocks kept on the device" for slot, n in self.resident_blocks.items()
                       if n)
        return f"{self.mode}{cap}: {what}{kept}; needs about {self.need / GIB:.1f} GiB"


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def plan_offload(mode: str | None, max_gpu_memory: float | None, components: dict[str, int],
                 dits: list[DiTSizes], prefetch: int = 1, reserve: int = WORK_RESERVE) -> Plan:
    """The plan for `mode` (None: the lightest mode that fits `max_gpu_memory`, GiB). `components`: slot -> bytes
    (DiTs included, whole). GenError when the asked mode, or every mode, needs more than `max_gpu_memory`."""
    dit_slots = {d.slot for d in dits}
    others = [n for s, n in components.items() if s not in dit_slots]
    window = lambda d, k: d.rest + sum(d.blocks[:k]) + (1 + prefetch) * max(d.blocks[k:], default=0)  # noqa: E731
    needs = {
        "none": sum(components.values()) + reserve,
        "model": max(components.values(), default=0) + reserve,
        "layer": max(others + [window(d, 0) for d in dits] + [0]) + reserve,
    }
    if not dits:
        needs["layer"] = needs["model"]
    budget = None if max_gpu_memory is None else int(max_gpu_memory * GIB)
    if mode is None:
        if budget is None:
            mode = "none"
        else:
            fits = [m for m in MODES if needs[m] <= budget]
            if not fits:
                units = {s: n for s, n in components.items() if s not in dit_slots}
                units.update({f"{d.slot} without its streamed blocks": window(d, 0) for d in dits})
                largest = max(units, key=units.get)
                raise GenError(
                    f"max_gpu_memory={max_gpu_memory:g} GiB is below what any offload mode needs: the lightest, "
                    f"layer, needs at least {_gib(needs['layer'])} (the largest unit on the device at once, "
                    f"{largest}: {_gib(units[largest])}, plus {_gib(reserve)} working memory)",
                    param="max_gpu_memory")
            mode = fits[0]
    elif budget is not None and needs[mode] > budget:
        raise GenError(f"offload={mode} needs at least {_gib(needs[mode])} on the device, more than "
                       f"max_gpu_memory={max_gpu_memory:g} GiB" +
                       ("" if mode == "layer" or needs["layer"] > budget else "; offload=layer fits"),
                       param="max_gpu_memory")
    resident: dict[str, int] = {}
    need = needs[mode]
    if mode == "layer" and budget is not None:
        for d in dits:  # keep as many leading blocks as fit next to the streaming window
            k = 0
            while k < len(d.blocks) and window(d, k + 1) + max(reserve, RESIDENT_MARGIN * budget) <= budget:
                k += 1
            resident[d.slot] = k
        need = max(others + [window(d, resident.get(d.slot, 0)) for d in dits] + [0]) + reserve
    streaming = 0  # the block window next to the units (layer)
    if mode == "layer":
        streaming = max([(1 + prefetch) * max(d.blocks[resident.get(d.slot, 0):], default=0) for d in dits] + [0])
    unit_budget = None if budget is None else budget - reserve - streaming
    return Plan(mode, max_gpu_memory, unit_budget, resident, need, prefetch)


# ---------------------------------------------------------------- streaming a DiT's blocks


class BlockStream:
    """Streams the blocks of one DiT: before block i runs, its copy is waited for and the next `prefetch` streamed
    blocks (cyclically: the next call starts with the first) are copied on the side stream; after it ran, it leaves."""

    def __init__(self, mover: Mover, slot: str, blocks: list[nn.Module], prefetch: int,
                 methods: tuple[str, ...] = ()):
        self.mover, self.slot, self.blocks, self.prefetch = mover, slot, blocks, prefetch
        self.units = [Unit(f"{slot}.block{i}", [b]) for i, b in enumerate(blocks)]
        self.keep(0)
        self.ahead: set[int] = set()  # streamed blocks on the device
        self.handles = []
        self.wrapped: list[tuple[nn.Module, str]] = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(functools.partial(self._before, i)))
            self.handles.append(block.register_forward_hook(functools.partial(self._after, i)))
            for name in methods:  # the block's other entry points (the DiT declares them), streamed the same way
                method = getattr(block, name)

                def call(*args, i=i, method=method, block=block, **kwargs):
                    self._before(i, block, args)
                    out = method(*args, **kwargs)
                    self._after(i, block, args, out)
                    return out

                block.__dict__[name] = call
                self.wrapped.append((block, name))

    def keep(self, k: int) -> None:
        """The first `k` blocks stay with the DiT's other weights; the others stream."""
        self.streamed = list(range(k, len(self.blocks)))
        self.streamed_set = set(self.streamed)

    def _window(self, i: int) -> list[int]:
        order = self.streamed
        pos = order.index(i)
        ahead = [order[(pos + d) % len(order)] for d in range(1, self.prefetch + 1)]
        return [j for j in dict.fromkeys(ahead) if j != i]

    def _load(self, i: int) -> None:
        if self.units[i].loaded is None:
            self.mover.load(self.units[i], side=True)
            self.ahead.add(i)

    def _evict(self, i: int) -> None:
        self.mover.evict(self.units[i])
        self.ahead.discard(i)

    def prime(self) -> None:
        """Start copying the first streamed block (the DiT is about to run)."""
        if self.streamed:
            self._load(self.streamed[0])

    @torch.compiler.disable
    def _before(self, i: int, module, args) -> None:
        if i not in self.streamed_set:
            return
        self._load(i)
        self.mover.wait(self.units[i])
        window = self._window(i)
        for j in window:
            self._load(j)
        for j in sorted(self.ahead - {i} - set(window)):  # loaded ahead but skipped (step cache)
            self._evict(j)

    @torch.compiler.disable
    def _after(self, i: int, module, args, output) -> None:
        if i in self.ahead:
            self._evict(i)

    def release(self) -> None:
        """Every streamed block off the device."""
        for j in sorted(self.ahead):
            self._evict(j)

    def remove(self) -> None:
        self.release()
        for h in self.handles:
            h.remove()
        for block, name in self.wrapped:
            block.__dict__.pop(name, None)


# ---------------------------------------------------------------- the transform


class Offload:
    """The offload transform of one pipeline (see the module doc): `settle()` once the other transforms are applied,
    `remove()` to undo (everything back on the device, as loaded without offload)."""

    def __init__(self, pipeline, mode: str | None, max_gpu_memory: float | None = None, prefetch: int = 1,
                 mover: Mover | None = None, reserve: int = WORK_RESERVE):
        check_offload(mode, max_gpu_memory)
        if not isinstance(prefetch, int) or prefetch < 1:
            raise GenError(f"offload prefetch must be an integer >= 1, got {prefetch!r}", param="offload")
        self.pipeline, self.requested, self.max_gpu_memory = pipeline, mode, max_gpu_memory
        self.prefetch, self.reserve = prefetch, reserve
        self.device = pipeline.device
        self.mover = mover or Mover(self.device)
        self.units: dict[str, Unit] = {}
        self.resident: OrderedDict[str, Unit] = OrderedDict()  # loaded units, least recently used first
        self.streams: dict[str, BlockStream] = {}
        self.handles: list = []
        self.restore: list[Callable[[], None]] = []
        self.plan: Plan | None = None
        self.dit_slots = {slot: dit for slot, _, dit in pipeline.dits()}
        for slot, obj in pipeline.components.modules.items():
            self._manage(slot, obj)

    # ---- what a component is and how its calls are caught

    def _manage(self, slot: str, obj) -> None:
        from gen.llm.api import LLM

        llm = obj if isinstance(obj, LLM) else getattr(obj, "llm", None)
        if isinstance(llm, LLM):
            if getattr(llm, "_offload", None) is not None:
                log.warning("offload: %s (%s) is already managed by another pipeline's offload; left as it is",
                            slot, llm)
                return
            unit = self.units[slot] = Unit(slot, [llm.model])
            old = (llm.device, llm.engine.device)
            llm.device = llm.engine.device = self.device
            llm._offload = self
            self.restore.append(lambda: setattr(llm, "_offload", None))
            self.restore.append(lambda: (setattr(llm, "device", old[0]), setattr(llm.engine, "device", old[1])))
            for name in LLM_METHODS:
                self._wrap_method(llm, name, unit)
            return
        if not isinstance(obj, nn.Module):
            return  # tokenizers, schedulers, processors
        unit = self.units[slot] = Unit(slot, [obj])

        def pre(module, args, kwargs):
            self.use(unit)
            return _to_device(tuple(args), self.device), _to_device(dict(kwargs), self.device)

        self.handles.append(obj.register_forward_pre_hook(pre, with_kwargs=True))
        if slot not in self.dit_slots:
            for name in METHODS:
                if callable(getattr(obj, name, None)):
                    self._wrap_method(obj, name, unit)
        else:
            for name in self.dit_slots[slot].entry_methods:  # e.g. a prompt prefix pass before the steps
                self._wrap_method(obj, name, unit)

    def _wrap_method(self, obj, name: str, unit: Unit) -> None:
        method = getattr(obj, name)

        @functools.wraps(method)
        def call(*args, **kwargs):
            self.use(unit)
            return method(*_to_device(args, self.device), **_to_device(kwargs, self.device))

        obj.__dict__[name] = call
        self.restore.append(lambda: obj.__dict__.pop(name, None))

    def _prime_before(self, model: nn.Module, name: str, stream: "BlockStream") -> None:
        method = getattr(model, name)

        @functools.wraps(method)
        def call(*args, **kwargs):
            stream.prime()
            return method(*args, **kwargs)

        model.__dict__[name] = call
        self.restore.append(lambda: model.__dict__.pop(name, None))

    # ---- settling: sizes, plan, host copies

    def settle(self) -> Plan:
        """Decide the plan from the tensors as the other transforms left them, pack the host copies, and (mode none)
        load everything for good. Returns the plan."""
        sizes = {slot: unit.measure(self.mover) for slot, unit in self.units.items()}
        dit_sizes = []
        for slot, model, dit in self.pipeline.dits():
            if slot not in self.units:
                continue
            blocks = [b for attr in dit.blocks for b in getattr(model, attr)]
            block_bytes = tuple(self.mover.nbytes(module_tensors([b])) for b in blocks)
            dit_sizes.append(DiTSizes(slot, sizes[slot] - sum(block_bytes), block_bytes))
        self.plan = plan = plan_offload(self.requested, self.max_gpu_memory, sizes, dit_sizes, self.prefetch,
                                        self.reserve)
        if plan.mode == "none":  # everything fits: straight from the loaded host tensors to the device, for good
            self.mover.arena = None
            for unit in self.units.values():
                self.mover.load(unit)
                unit.loaded.records.clear()  # no way back to the host: the host copies are freed
                unit.permanent = True
                self.resident[unit.name] = unit
            log.info("offload: %s", plan.describe())
            return plan
        if plan.mode == "layer":
            for slot, model, dit in self.pipeline.dits():
                if slot not in self.units:
                    continue
                blocks = [b for attr in dit.blocks for b in getattr(model, attr)]
                stream = self.streams[slot] = BlockStream(self.mover, slot, blocks, self.prefetch, dit.block_methods)
                stream.keep(plan.resident_blocks.get(slot, 0))
                unit = self.units[slot]
                unit.exclude = {id(blocks[i]) for i in stream.streamed}
                unit.on_evict.append(stream.release)
                self.handles.append(model.register_forward_pre_hook(lambda m, a, s=stream: s.prime()))
                for name in dit.entry_methods:
                    self._prime_before(model, name, stream)
                for u in stream.units:
                    self.mover.home(u.tensors())
        for unit in self.units.values():
            self.mover.home(unit.tensors())
            unit.measure(self.mover)
        log.info("offload: %s", plan.describe())
        return plan

    # ---- the moves

    @torch.compiler.disable
    def use(self, unit: Unit) -> None:
        """`unit` on the device, evicting others (least recently used first) as the budget needs."""
        if unit.loaded is not None:
            self.resident.move_to_end(unit.name)
            return
        budget = self.plan.budget if self.plan is not None else None
        for other in list(self.resident.values()):
            if other.permanent:
                continue
            if budget is not None and sum(u.nbytes for u in self.resident.values()) + unit.nbytes <= budget:
                break
            self.mover.evict(other)
            del self.resident[other.name]
        self.mover.load(unit)
        self.resident[unit.name] = unit

    def remove(self) -> None:
        """Undo: every unit back on the device for good, hooks and wrappers off."""
        for stream in self.streams.values():
            stream.remove()
        for h in self.handles:
            h.remove()
        for fn in reversed(self.restore):
            fn()
        for unit in self.units.values():
            unit.exclude = set()
            unit.on_evict.clear()
            if unit.loaded is not None and not unit.permanent:
                self.mover.evict(unit)
            if unit.loaded is None:
                self.mover.load(unit)
                unit.loaded.records.clear()
            unit.permanent = True
        self.handles, self.restore, self.streams = [], [], {}

    def __repr__(self) -> str:
        return self.plan.describe() if self.plan is not None else f"offload={self.requested} (not settled)"
