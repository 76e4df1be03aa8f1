"""LoRA adapters on a loaded pipeline's DiTs, applied from outside the model files; one set at a time, swapped per
request without reloading the model.

A set is a list of LoRA files with scales (and, for Wan2.2's two experts, the transformer each targets), read through
gen/lora (key maps per format and family, an LRU cache bounded in MB). Two ways to apply it:

- unfused (default): each adapted layer keeps its weight and adds `scale_i * (x A_i^T) B_i^T` for every LoRA i of
  the set. Its class becomes a subclass (`Lora<Linear>`, same parameters and state_dict keys) whose forward adds
  the update from two non-persistent buffers: `lora_down` (R, in) = the set's A matrices stacked, each LoRA's rows
  multiplied by its scale when the set is copied in (no multiply per step), `lora_up` (out, R) = the B matrices
  side by side: two thin matmuls for any number of LoRAs (`add_lora`: eager, the up product accumulates into the
  layer's output in place, one GEMM with beta = 1; compiled, a matmul whose add inductor fuses into the output's
  consumer; benchmarks/lora_variants.py times the alternatives). R is a fixed capacity (a power of two >= the set's
  total rank, the same for a layer in every block of a list), the unused rows zero. Switching sets copies new
  contents in place: a compiled block keeps its graph (torch.compile guards on shapes, not values) and a CUDA graph
  replays the new values. Only a set that needs more capacity, or adapters on new layers, changes the structure
  (one recompile per block list; captured CUDA graphs are dropped); an empty set takes the banks off (the plain
  compiled graph is still cached). Joined projections (gen/transforms/join.py): the group's downs are one tensor
  on its first layer (`joined_lora_down`, each member's `lora_down` a view of its rows), so
  `gen.models.layers.project` runs one down matmul for the group and each member's up on its own rows: a LoRA on
  q, k or v lands on its slice.
  Widening layers (out >= 2 x in: the joined q/k/v(+MLP) groups, the MLP's first linear) take the "wide" layout
  (`wide=True`, the default): the weight is the view `buf[:, :in]` of an (out, in + R) buffer whose spare columns
  hold the ups (a joined group's members each in their own rows and their own R columns, the rest zero), and the
  layer runs one GEMM over [x | x A^T] (gen.models.layers.wide_lora_input: under torch.compile x's producer writes
  it into that buffer; eager, it is copied once) instead of an up product as wide as the output written and read
  (FLUX.1-dev-sized step, rank 64, H200: +6.1% over no LoRA; separate ups +10-14%; docs/LORA.md). A group whose
  last member is as wide as the rest together (FLUX.1's single block: q, k, v | MLP) gets two buffers,
  run as two GEMMs over column ranges of one input [h_rest | x | h_last]: fewer zero blocks, and the MLP keeps its
  GELU epilogue (`_split_last`). The buffer is made when banks are attached and the weight compacted back (same
  values, contiguous) when they come off, so requests without LoRAs run the plain GEMM as before; both are
  structure changes (the swaps that recompile anyway). `wide=False`: every layer adds its own up product.
- fused (`fuse=True`): W += sum_i scale_i B_i A_i, computed in fp32; no cost per step. The original weights are
  kept (in host memory when the model is on an accelerator) and copied back before another set goes in: unfusing
  restores them bit for bit.

Full deltas (`diff`, `diff_b`, `diff_m`, PEFT's lora bias: lightx2v's norm, bias and modulation deltas) are always
merged into their parameters the fused way, originals kept. FP8 / quantized linears take unfused LoRAs (the update
runs beside their own matmul); fusing into them, or a full delta of their weight, is refused.

Text encoders (FLUX.1's CLIP and T5: gen/lora/formats.py TEXT_ENCODERS) take a LoRA's text-encoder pairs the same
two ways, on their linears (banks uniform over their layer lists), whatever the LoRA's target. A set is held for the
whole generation, text encoding included, and nothing keeps prompt embeddings between generations (CLIP / T5
encodes are neither cached nor merged across requests: gen/transforms/batch.py serializes them), so embeddings
always come from the set the request runs with.

Requests share the model: `LoraAdapters.use(specs)` holds the set for one generation; generations with the same set
run together (batching, gen/transforms/batch.py), one with another set waits until they are done, then swaps.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gen.lora.files import DEFAULT_CACHE_MB, DEFAULT_MAX_LORAS, LoraCache, check_specs, lora_file
from gen.lora.formats import TEXT_ENCODERS, LoraWeights, Pair
from gen.models.layers import add_lora, wide_lora_linear
from gen.types import GenError, LoraSpec

log = logging.getLogger(__name__)

MIN_CAPACITY = 8
WIDE_RATIO = 2  # the wide layout for layers with out >= WIDE_RATIO x in (benchmarks/lora_variants.py: it wins there)


# ---------------------------------------------------------------- the adapted layer


class LoraLayer:
    """Mixin put in front of a linear layer's class: its own output plus the low-rank update of its banks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_lora(super().forward(x), F.linear(x, self.lora_down), self.lora_up)


class WideLoraLayer(LoraLayer):
    """The wide layout (module doc): one GEMM over [x | x A^T] against [W | ups] (`lora_wide`, the weight a view of
    its first columns)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wide_lora_linear(x, self.lora_down, self.lora_wide, self.bias)


_CLASSES: dict[tuple[type, type], type] = {}


def lora_class(cls: type, mixin: type = LoraLayer) -> type:
    """`cls` with `mixin`'s forward in front (one class per base class and mixin)."""
    if issubclass(cls, LoraLayer):
        return cls
    if (cls, mixin) not in _CLASSES:
        prefix = "WideLora" if mixin is WideLoraLayer else "Lora"
        _CLASSES[(cls, mixin)] = type(f"{prefix}{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _CLASSES[(cls, mixin)]


def _is_linear(m: nn.Module) -> bool:
    return isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int) \
        and hasattr(m, "weight")


def _widens(layers: list[nn.Module], dtype: torch.dtype) -> bool:
    """Whether these layers (one, or a joined group) take the wide layout: plain full-precision linears in the
    banks' dtype whose outputs are at least WIDE_RATIO times their input."""
    return all(type(l) is nn.Linear and l.weight.dtype == dtype for l in layers) \
        and sum(l.out_features for l in layers) >= WIDE_RATIO * layers[0].in_features


def _capacity(rank: int) -> int:
    return max(MIN_CAPACITY, 1 << max(rank - 1, 0).bit_length())


@dataclass
class _Use:
    """One LoRA of the active set: its weights, scale and the expert slots it targets."""

    weights: LoraWeights
    scale: float
    slots: tuple[str, ...]


class LoraAdapters:
    """The LoRA state of one pipeline (`pipeline.loras`): the cache, the default set, the active one; see the module
    doc. `fuse`: merge sets into the weights. `default`: the set of requests that name none (`loras=None`)."""

    def __init__(self, pipeline, fuse: bool = False, max_loras: int = DEFAULT_MAX_LORAS,
                 max_cache_mb: float = DEFAULT_CACHE_MB, default=(), offloaded: bool = False, wide: bool = True):
        if isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 1:
            raise GenError(f"max_loras must be an integer >= 1, got {max_loras!r}", param="max_loras")
        self.pipeline, self.fuse, self.max_loras, self.offloaded = pipeline, fuse, max_loras, offloaded
        self.wide = wide  # the wide layout for widening layers (module doc); False: every layer adds its up product
        dits = pipeline.dits()
        self.slots = tuple(slot for slot, _, _ in dits)  # the DiTs (what a LoRA's target names)
        self.models = {slot: m for slot, m, _ in dits}
        self.family = dits[0][2].checkpoint_class if dits else None
        self.block_lists = {slot: dit.blocks for slot, _, dit in dits}
        self.dtypes = {slot: pipeline.dtype for slot in self.slots}  # the banks' (the activations') dtype
        components = getattr(pipeline, "components", None)
        self.encoders = {}  # text-encoder slot -> model, for the encoders this family's LoRAs may adapt
        for enc in TEXT_ENCODERS.get(self.family, ()) if components is not None else ():
            m = components.get(enc.slot)
            if isinstance(m, nn.Module) and type(m).__name__ == enc.model_class:
                self.encoders[enc.slot] = self.models[enc.slot] = m
                self.block_lists[enc.slot] = (enc.blocks,)
                self.dtypes[enc.slot] = next(m.parameters()).dtype
        self.all_slots = (*self.slots, *self.encoders)
        self.cache = LoraCache(max_cache_mb, pipeline.device, pipeline.dtype)
        self.default = self.check(default) if default else ()
        self.active_key: tuple = ()
        self.active: list[_Use] = []
        self.capacity: dict[str, dict[tuple, int]] = {slot: {} for slot in self.all_slots}  # slot -> uniform key -> R
        self.originals: dict[tuple[str, str], torch.Tensor] = {}  # (slot, parameter) -> its value before merging
        self.switches = 0  # sets swapped in
        self.restructures = 0  # swaps that changed which layers carry banks or their capacity
        self.last_switch_s = 0.0
        self._users = 0
        self._cond = threading.Condition()
        self._groups = {slot: self._joined_groups(m) for slot, m in self.models.items()}
        self._index: dict[str, dict[str, nn.Module]] = {}  # slot -> path -> module, made at each switch

    # ---- requests

    def check(self, loras) -> tuple[LoraSpec, ...]:
        """A requested set checked (count, scales, targets; each file read through the cache, so a missing, corrupt
        or foreign file is a GenError naming it); the specs back."""
        specs = self._specs(loras)
        for i, spec in enumerate(specs):
            try:
                weights = self.cache.get(spec.path, self.family)
            except GenError as e:
                raise GenError(str(e), param=f"loras[{i}]") from None
            self._check_encoders(weights, f"loras[{i}]")
        return specs

    def _check_encoders(self, weights: LoraWeights, param: str) -> None:
        missing = sorted(set(weights.encoders) - set(self.encoders))
        if missing:
            raise GenError(f"LoRA {weights.source} adapts the text encoder {missing[0]!r}, which this pipeline lacks "
                           f"(text encoders that take LoRAs here: {sorted(self.encoders) or 'none'})", param=param)

    def resolve(self, loras) -> tuple[LoraSpec, ...]:
        return self.default if loras is None else self._specs(loras)

    def _specs(self, loras) -> tuple[LoraSpec, ...]:
        specs = check_specs(loras, self.max_loras, self.slots)
        if specs and self.offloaded:
            raise GenError("LoRAs and offload cannot be combined yet: the adapters would not follow the offloaded "
                           "weights", param="loras")
        return specs

    @contextlib.contextmanager
    def use(self, loras):
        """Hold `loras` (None: the default set) active for one generation; see the module doc."""
        specs = self.resolve(loras)
        key = self._key(specs)
        with self._cond:
            while self._users and key != self.active_key:
                self._cond.wait()
            if key != self.active_key:
                self._switch(specs, key)
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    def set(self, loras) -> None:
        """Make `loras` the active set now (waits for generations using another set to end)."""
        with self.use(loras):
            pass

    def __repr__(self) -> str:
        mode = "fused" if self.fuse else "unfused"
        return f"LoraAdapters({mode}, active={[os.path.basename(u.weights.source) for u in self.active]})"

    def describe(self) -> list[dict]:
        """The active set: file, format, scale, rank, targets (the DiTs, then the text encoders it adapts)."""
        return [{"path": u.weights.source, "format": u.weights.format, "scale": u.scale, "rank": u.weights.rank,
                 "targets": [*(u.slots if u.weights.pairs or u.weights.deltas else ()), *sorted(u.weights.encoders)]}
                for u in self.active]

    def _key(self, specs: tuple[LoraSpec, ...]) -> tuple:
        key = []
        for s in specs:
            f = lora_file(s.path)
            st = f.stat()
            key.append((str(f.resolve()), st.st_size, st.st_mtime_ns, s.scale, s.target))
        return tuple(key)

    # ---- swapping sets

    def _index_modules(self) -> None:
        """Path -> module of every model, once per switch: a switch looks up each adapted layer several times, and
        walking the path each time was most of a switch's host time (FLUX.1: ~500 layers)."""
        self._index = {slot: dict(m.named_modules()) for slot, m in self.models.items()}

    def _module(self, slot: str, path: str) -> nn.Module | None:
        return self._index[slot].get(path)

    @torch.no_grad()
    def _switch(self, specs: tuple[LoraSpec, ...], key: tuple) -> None:
        start = time.perf_counter()
        self._index_modules()
        uses = [_Use(self.cache.get(s.path, self.family), s.scale, self.slots if s.target is None else (s.target,))
                for s in specs]
        plans = {slot: self._plan(slot, [u for u in uses if slot in u.slots]) for slot in self.slots}
        plans.update({slot: self._plan(slot, uses) for slot in self.encoders})  # whatever the LoRA's target
        for u in uses:
            self._check_encoders(u.weights, "loras")
        self._restore()
        self.active, self.active_key = [], ()
        changed = False
        for slot, (pairs, deltas) in plans.items():
            if self.fuse:
                self._fuse(slot, pairs)
            else:
                changed |= self._fill(slot, pairs)
            self._merge(slot, deltas)
        if changed:
            self.restructures += 1
            self._forget_graphs()
        self.active, self.active_key = uses, key
        self.switches += 1
        self.last_switch_s = time.perf_counter() - start
        log.info("LoRA set %s in %.1f ms%s", [os.path.basename(s.path) for s in specs] or "(none)",
                 1000 * self.last_switch_s, " (adapters restructured)" if changed else "")

    def _plan(self, slot: str, uses: list[_Use]):
        """Per layer the (pair, scale) list and per parameter the (delta, scale) list of the LoRAs targeting `slot`,
        checked against the model (paths, kinds, shapes)."""
        model = self.models[slot]
        pairs: dict[str, list[tuple[Pair, float]]] = {}
        deltas: dict[str, list[tuple[torch.Tensor, float]]] = {}
        encoder = slot in self.encoders
        for u in uses:
            src = u.weights.source
            for path, pair in (u.weights.encoders.get(slot, {}) if encoder else u.weights.pairs).items():
                layer = self._module(slot, path)
                if layer is None or not _is_linear(layer):
                    raise GenError(f"LoRA {src} adapts {path}, which this {slot} " + (
                        "lacks" if layer is None else f"has as a {type(layer).__name__}, not a linear layer"),
                        param="loras")
                if pair.down.shape[1] != layer.in_features or pair.up.shape[0] != layer.out_features:
                    raise GenError(f"LoRA {src}: {path} is {layer.in_features} -> {layer.out_features} in this "
                                   f"{slot}, the LoRA's is {pair.down.shape[1]} -> {pair.up.shape[0]} (a LoRA of "
                                   "another model size?)", param="loras")
                pairs.setdefault(path, []).append((pair, u.scale))
            params = dict(model.named_parameters()) if u.weights.deltas and not encoder else {}
            for name, delta in () if encoder else u.weights.deltas.items():
                p = params.get(name)
                if p is None:
                    raise GenError(f"LoRA {src} changes {name}, which this {slot} lacks", param="loras")
                if tuple(delta.shape) != tuple(p.shape):
                    raise GenError(f"LoRA {src}: {name} is {tuple(p.shape)} in this {slot}, the LoRA's delta is "
                                   f"{tuple(delta.shape)}", param="loras")
                if not p.is_floating_point() or p.dtype.itemsize < 2:
                    raise GenError(f"LoRA {src} has a full delta of {name}, a quantized ({p.dtype}) weight: "
                                   "load the model without fp8 / a quantized transformer file", param="loras")
                deltas.setdefault(name, []).append((delta, u.scale))
        return pairs, deltas

    # ---- merged parameters (fused pairs, full deltas)

    def _keep(self, slot: str, name: str, p: torch.Tensor) -> None:
        if (slot, name) not in self.originals:
            self.originals[(slot, name)] = p.detach().to("cpu", copy=True)

    def _restore(self) -> None:
        """Every merged parameter back to its original value, bit for bit."""
        for (slot, name), value in self.originals.items():
            _parameter(self.models[slot], name).copy_(value)
        self.originals.clear()

    def _merge(self, slot: str, deltas: dict) -> None:
        model = self.models[slot]
        for name, items in deltas.items():
            p = _parameter(model, name)
            self._keep(slot, name, p)
            total = p.float() + sum(s * d.float() for d, s in items)
            p.copy_(total.to(p.dtype))

    def _fuse(self, slot: str, pairs: dict) -> None:
        model = self.models[slot]
        for path, items in pairs.items():
            layer = self._module(slot, path)
            if type(layer) is not nn.Linear:
                raise GenError(f"fuse_lora merges LoRAs into full-precision weights; {path} is a "
                               f"{type(layer).__name__} (load without fp8 / a quantized file, or without fuse_lora)",
                               param="fuse_lora")
            self._keep(slot, f"{path}.weight", layer.weight)
            w = layer.weight.float()
            for pair, s in items:
                w = w + s * (pair.up.float() @ pair.down.float())
            layer.weight.copy_(w.to(layer.weight.dtype))

    # ---- banks (unfused)

    def _uniform(self, slot: str, path: str) -> tuple:
        """A layer's key shared by the same layer of every block of its list: (list attr, path in the block)."""
        for attr in self.block_lists[slot]:
            head = attr + "."
            if path.startswith(head):
                rest = path[len(head):]
                index, _, inner = rest.partition(".")
                if index.isdigit():
                    return attr, inner
        return None, path

    def _layers(self, slot: str, key: tuple) -> list[tuple[str, nn.Module]]:
        """(path, layer) of every layer a uniform key covers."""
        attr, inner = key
        if attr is None:
            return [(inner, self._module(slot, inner))]
        found = []
        for i in range(len(self._module(slot, attr))):
            path = f"{attr}.{i}.{inner}"
            layer = self._module(slot, path)
            if layer is not None:
                found.append((path, layer))
        return found

    @staticmethod
    def _joined_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
        """Each joined layer's path -> the paths of its whole group (gen/transforms/join.py), in group order."""
        groups = {}
        for name, module in model.named_modules():
            for group in getattr(type(module), "joinable", ()):
                layers = [module.get_submodule(p) for p in group]
                if hasattr(layers[0], "joined_sizes"):
                    paths = tuple(f"{name}.{p}" if name else p for p in group)
                    groups.update({p: paths for p in paths})
        return groups

    def _fill(self, slot: str, pairs: dict) -> bool:
        """Banks sized for `pairs` (grown or added where needed, all off for an empty set), then their contents
        copied in; True when the structure changed."""
        need: dict[tuple, int] = {}
        for path, items in pairs.items():
            key = self._uniform(slot, path)
            need[key] = max(need.get(key, 0), sum(p.down.shape[0] for p, _ in items))
        groups = self._groups[slot]
        for key in list(need):  # a joined group's members share one capacity
            _, inner = key
            first_path = self._layers(slot, key)[0][0]
            if first_path in groups:
                members = [self._uniform(slot, p) for p in groups[first_path]]
                top = max(need.get(k, 0) for k in members)
                need.update({k: top for k in members})
        current = self.capacity[slot]
        if not pairs:
            wanted = {}  # (a set not touching this slot takes its banks off)
        else:
            wanted = dict(current)
            for key, rank in need.items():
                if current.get(key, 0) < rank:
                    wanted[key] = _capacity(rank)
        changed = {k for k in set(current) | set(wanted) if current.get(k) != wanted.get(k)}
        for key in changed:  # only the layers whose banks are new, grown or gone are rebuilt
            for _, layer in self._layers(slot, key):
                _detach_layer(layer)
        self.capacity[slot] = wanted
        self._attach(slot, changed & set(wanted))
        banks = [t for _, layer in self._all_layers(slot) for t in (layer.lora_down, layer.lora_up)]
        if banks:
            torch._foreach_zero_(banks)
        targets, sources, downs, scales = [], [], [], []  # copied in two batched calls (one launch per layer was
        for path, items in pairs.items():                # most of a switch's time on a GPU's host)
            layer = self._module(slot, path)
            row = 0
            for pair, s in items:
                r = pair.down.shape[0]
                down = layer.lora_down[row:row + r]
                targets += [down, layer.lora_up[:, row:row + r]]
                sources += [pair.down, pair.up]
                downs.append(down)
                scales.append(s)  # the scale folded into its rows
                row += r
        if targets:
            torch._foreach_copy_(targets, sources)
            torch._foreach_mul_(downs, scales)
        return bool(changed)

    def _all_layers(self, slot: str) -> list[tuple[str, nn.Module]]:
        return [pl for key in self.capacity[slot] for pl in self._layers(slot, key)]

    def _attach(self, slot: str, keys: set) -> None:
        groups, done = self._groups[slot], set()
        for key in keys:
            cap = self.capacity[slot][key]
            for path, layer in self._layers(slot, key):
                if path in done:
                    continue
                dtype = self.dtypes[slot]
                if path in groups:
                    members = [(p, self._module(slot, p)) for p in groups[path]]
                    _attach_group(members, cap, dtype, self.wide and _widens([m for _, m in members], dtype))
                    done.update(p for p, _ in members)
                else:
                    _attach_layer(layer, cap, dtype, wide=self.wide and _widens([layer], dtype))
                    done.add(path)

    def _detach(self, slot: str) -> None:
        for _, layer in self._all_layers(slot):
            _detach_layer(layer)
        self.capacity[slot] = {}

    def _forget_graphs(self) -> None:
        """Captured CUDA graphs replay the old structure: drop them (gen/transforms/cuda_graph.py recaptures)."""
        from gen.transforms.forward import forward_wrapper

        for slot in self.slots:
            graphed = forward_wrapper(self.models[slot], "cuda_graphs")
            if graphed is not None and hasattr(graphed, "drop"):
                graphed.drop()

    # ---- undo

    @torch.no_grad()
    def remove(self) -> None:
        """Every LoRA off: merged parameters restored, banks removed, layers back to their own classes."""
        with self._cond:
            self._index_modules()
            self._restore()
            changed = False
            for slot in self.all_slots:
                changed |= bool(self.capacity[slot])
                self._detach(slot)
            if changed:
                self._forget_graphs()
            self.active, self.active_key = [], ()


def _attach_layer(layer: nn.Module, cap: int, dtype: torch.dtype, down: torch.Tensor | None = None,
                  up: torch.Tensor | None = None, wide: bool = False) -> None:
    """Banks of capacity `cap` in `dtype` (the activations') on the layer, and its class made a LoraLayer. `wide`:
    the layer's weight moved into an (out, in + cap) buffer whose last columns are its up bank (module doc); `down`,
    `up`: banks given (a joined group's, views of the group's tensors)."""
    device, d = layer.weight.device, layer.in_features
    if wide:
        buf = torch.zeros(layer.out_features, d + cap, device=device, dtype=dtype)
        buf[:, :d].copy_(layer.weight)
        layer.weight.data = buf[:, :d]
        layer.register_buffer("lora_wide", buf, persistent=False)
        up = buf[:, d:]
    if down is None:
        down = torch.zeros(cap, d, device=device, dtype=dtype)
    if up is None:
        up = torch.zeros(layer.out_features, cap, device=device, dtype=dtype)
    layer.register_buffer("lora_down", down, persistent=False)
    layer.register_buffer("lora_up", up, persistent=False)
    layer.__class__ = lora_class(type(layer), WideLoraLayer if wide else LoraLayer)


def _attach_group(members: list[tuple[str, nn.Module]], cap: int, dtype: torch.dtype, wide: bool = False) -> None:
    """A joined group: one down tensor on the first layer, each member's its rows (views). `wide`: the joined weight
    moved into an (out, in + n cap) buffer, member i's up bank its rows of columns in + i cap .. in + (i + 1) cap;
    or, where the last member is as wide as the rest together (`_split_last`), two buffers: the rest's
    (out_rest, (n-1) cap + in) = [their ups | W_rest] and the last's (out_last, in + cap) = [W_last | its up], read
    as two GEMMs over column ranges of one input [h_rest | x | h_last] (gen.models.layers.project)."""
    first = members[0][1]
    n, d = len(members), first.in_features
    layers = [layer for _, layer in members]
    down = torch.zeros(n * cap, d, device=first.weight.device, dtype=dtype)
    joined = first.joined_weight
    blocks = []  # per member: (buffer, its first row, its weight's first column, its up's first column)
    if wide and _split_last(layers):
        rest, n_rest = (n - 1) * cap, joined.shape[0] - layers[-1].out_features
        left = torch.zeros(n_rest, rest + d, device=joined.device, dtype=dtype)
        left[:, rest:].copy_(joined[:n_rest])
        last = torch.zeros(layers[-1].out_features, d + cap, device=joined.device, dtype=dtype)
        last[:, :d].copy_(joined[n_rest:])
        row = 0
        for i, layer in enumerate(layers[:-1]):
            blocks.append((left, row, rest, i * cap))
            row += layer.out_features
        blocks.append((last, 0, 0, d))
        first.register_buffer("joined_weight", None, persistent=False)  # no one tensor holds the weights now
        first.register_buffer("joined_lora_wide", left, persistent=False)
        first.register_buffer("joined_lora_wide_last", last, persistent=False)
    elif wide:
        buf = torch.zeros(joined.shape[0], d + n * cap, device=joined.device, dtype=dtype)
        buf[:, :d].copy_(joined)
        row = 0
        for i, layer in enumerate(layers):
            blocks.append((buf, row, 0, d + i * cap))
            row += layer.out_features
        first.register_buffer("joined_weight", buf[:, :d], persistent=False)
        first.register_buffer("joined_lora_wide", buf, persistent=False)
    if wide:
        first.__dict__["_wide_weights"] = [layer.weight for layer in layers]
    for i, layer in enumerate(layers):
        up = None
        if blocks:
            buf, row, col, up_col = blocks[i]
            rows = slice(row, row + layer.out_features)
            layer.weight.data = buf[rows, col:col + d]
            up = buf[rows, up_col:up_col + cap]
        _attach_layer(layer, cap, dtype, down[i * cap:(i + 1) * cap], up)
    first.register_buffer("joined_lora_down", down, persistent=False)
    first.joined_lora_ranks = [cap] * n


def _split_last(layers: list[nn.Module]) -> bool:
    """Whether a joined group's wide layout splits its last member off (project runs two GEMMs): where the last
    (the single FLUX block's MLP beside q, k, v) and the rest are each at least WIDE_RATIO x the input wide. A
    member's up columns then meet only its own segment's rows (fewer zeros to multiply), and the last member's
    GEMM can take an epilogue (GELU) of its own. FLUX.1-dev's single block, rank 64, H200: the layer 1.27 -> 1.01 ms
    against 0.91 without LoRA (benchmarks/lora_layouts.py); splitting q off q/k/v is slower (0.34 -> 0.41 ms)."""
    d, last = layers[0].in_features, layers[-1].out_features
    rest = sum(layer.out_features for layer in layers[:-1])
    return len(layers) >= 2 and min(last, rest) >= WIDE_RATIO * d


def _detach_layer(layer: nn.Module) -> None:
    """The banks off; a wide layer's (or group's) weight compacted back into a contiguous tensor of its own."""
    if "lora_wide" in layer._buffers:
        layer.weight.data = layer.weight.data.contiguous()
    if "joined_lora_wide" in layer._buffers:
        weights = layer.__dict__.pop("_wide_weights")
        joined = torch.cat([w.data for w in weights]) if "joined_lora_wide_last" in layer._buffers \
            else layer.joined_weight.contiguous()
        layer.register_buffer("joined_weight", joined, persistent=False)
        row = 0
        for w in weights:
            w.data = joined[row:row + w.shape[0]]
            row += w.shape[0]
    for name in ("lora_down", "lora_up", "lora_wide", "joined_lora_down", "joined_lora_wide", "joined_lora_wide_last"):
        if name in layer._buffers:
            del layer._buffers[name]
    layer.__dict__.pop("joined_lora_ranks", None)
    if isinstance(layer, LoraLayer):
        layer.__class__ = next(c for c in type(layer).__mro__[1:] if not issubclass(c, LoraLayer))


def _parameter(model: nn.Module, name: str) -> torch.Tensor:
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module) if module else model, attr)


def check_lora_options(fuse: bool, fp8: bool, offload: bool, has_loras: bool) -> None:
    """The combinations refused before any weight is loaded."""
    if fuse and fp8:
        raise GenError("fuse_lora and fp8 cannot be combined: FP8 weights cannot take a LoRA merged in and give the "
                       "originals back; use unfused LoRAs with fp8 (the default)", param="fuse_lora")
    if offload and (has_loras or fuse):
        raise GenError("LoRAs and offload cannot be combined yet: the adapters would not follow the offloaded "
                       "weights", param="loras")
