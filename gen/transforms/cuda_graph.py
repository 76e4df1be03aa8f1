"""CUDA graphs for the transformer call: each input signature is captured once, then replayed.

One denoising step launches thousands of kernels; on small inputs (the 128x128 default model, low resolutions) the
GPU waits on the host's launches, and a replayed graph removes that wait. `GraphedCall(fn)` wraps a function of
tensors (a DiT's bound `forward`): the first call with a new signature (the shapes, dtypes and devices of its tensor
arguments plus the values of all other arguments) warms `fn` up on a side stream (torch.compile and lazy caches
run there, outside the graph), copies the tensor arguments into static buffers and captures one call on them. Each
call then copies its tensors into that signature's buffers, replays the graph and returns a copy of the static
output, so a caller may keep results across calls (the two CFG branches of one step do).

Applied from outside the model files (`enable_cuda_graphs(model)`, through gen.transforms.apply_transforms). Requires: no host-device
sync inside the call (capture fails loudly otherwise), no data-dependent Python control flow (the step cache has
some: refused together), one process (collectives of sequence-parallel ranks are not captured: refused). The
graphs of one GraphedCall share a memory pool for the call's intermediates (held for as long as the graphs are:
memory the rest of the program cannot use); at most `max_graphs` signatures are kept, the least recently used is
dropped first.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from gen.device import is_cuda
from gen.transforms.forward import forward_wrapper, unwrap_forward, wrap_forward
from gen.types import GenError

log = logging.getLogger(__name__)

# (fn, static args, static kwargs) -> (replay, static output): replay() recomputes fn on the static arguments
# and leaves the result in the static output's tensors
Capture = Callable[[Callable, tuple, dict], tuple[Callable[[], None], Any]]


def cuda_capture(fn: Callable, args: tuple, kwargs: dict, pool=None) -> tuple[Callable[[], None], Any]:
    """Warm `fn` up twice on a side stream, then capture one call into a CUDA graph (its intermediates in `pool`)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*args, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(*args, **kwargs)
    return graph.replay, out


def pooled_cuda_capture() -> Capture:
    """cuda_capture with one memory pool for every graph it captures. Safe for GraphedCall's use: its graphs run one
    at a time on one stream, and every tensor that outlives a replay (static inputs and outputs) stays referenced,
    so a later capture only reuses an earlier graph's temporaries. Two signatures (the two CFG branches of Qwen-Image,
    whose prompts differ in length) then cost one set of intermediates, not two."""
    pool = torch.cuda.graph_pool_handle()
    return lambda fn, args, kwargs: cuda_capture(fn, args, kwargs, pool)


def eager_capture(fn: Callable, args: tuple, kwargs: dict) -> tuple[Callable[[], None], Any]:
    """What a graph does, run eagerly (any device): replay recomputes `fn` on the static arguments into the static
    output. Lets the wrapper's own logic (signatures, input copies, output copies) be tested without CUDA."""
    out = fn(*args, **kwargs)

    def replay() -> None:
        for static, new in zip(tree_flatten(out)[0], tree_flatten(fn(*args, **kwargs))[0]):
            if isinstance(static, torch.Tensor):
                static.copy_(new)

    return replay, out


def check_cuda_graphs(device: torch.device, step_cache: float | None = None) -> None:
    """GenError unless CUDA graphs can serve this load: a CUDA device and no step cache."""
    if not is_cuda(device):
        raise GenError(f"cuda_graphs needs a CUDA device, got {device}", param="cuda_graphs")
    if step_cache is not None:
        raise GenError(f"cuda_graphs and step_cache={step_cache} cannot be combined: the step cache decides on the "
                       "host, per step, which blocks run", param="cuda_graphs")


def _leaf_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device)
    try:
        hash(x)
    except TypeError:
        return ("repr", repr(x))
    return ("value", x)


class GraphedCall:
    """`fn` replayed from a CUDA graph per input signature; see the module doc."""

    def __init__(self, fn: Callable, capture: Capture | None = None, max_graphs: int = 4):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.fn, self.max_graphs = fn, max_graphs
        self._new_capture = (lambda: capture) if capture is not None else pooled_cuda_capture
        self.capture = self._new_capture()
        self.graphs: OrderedDict[tuple, tuple[list, Callable[[], None], Any]] = OrderedDict()
        self.captures = 0

    def __call__(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        key = (spec, tuple(_leaf_key(x) for x in leaves))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(leaves, spec, key)
        else:
            self.graphs.move_to_end(key)
            for static, x in zip(entry[0], leaves):
                if isinstance(x, torch.Tensor) and static is not x:
                    static.copy_(x)
        _, replay, out = entry
        with torch.no_grad():
            replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

    def drop(self) -> None:
        """Every captured graph dropped (a change of the model's structure: LoRA banks added or removed), and with
        them their memory pool: the next capture starts a new one (capturing into the pool of graphs that are all
        gone fails an allocator assertion)."""
        self.graphs.clear()
        self.capture = self._new_capture()

    def _capture(self, leaves: list, spec, key: tuple):
        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = tree_unflatten(static, spec)
        with torch.no_grad():
            replay, out = self.capture(self.fn, args, kwargs)
        self.captures += 1
        log.info("captured a CUDA graph for a new input signature (%d so far, %d kept)", self.captures,
                 min(len(self.graphs) + 1, self.max_graphs))
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        self.graphs[key] = entry = (static, replay, out)
        return entry


WRAPPER = "cuda_graphs"


def enable_cuda_graphs(model: nn.Module, capture: Capture | None = None, max_graphs: int = 4) -> GraphedCall:
    """Wrap `model.forward` in a GraphedCall of it (undone by disable_cuda_graphs)."""
    installed = forward_wrapper(model, WRAPPER)
    if installed is not None:
        return installed
    return wrap_forward(model, WRAPPER, lambda inner: GraphedCall(inner, capture, max_graphs))


def disable_cuda_graphs(model: nn.Module) -> None:
    """Give the model back the forward it had before enable_cuda_graphs (the graphs are dropped)."""
    unwrap_forward(model, WRAPPER)
