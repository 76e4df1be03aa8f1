"""Every step's adaLN modulations prepared at once: the modulation linears read their weights once a generation
instead of once a step.

A DiT block's modulation (FLUX's `norm1`, `norm1_context`, `norm`; Qwen-Image's `img_mod`, `txt_mod`) is a linear of
the step's time embedding alone. At batch 1 it is a matrix-vector product, so it costs its weights' bytes every
step: 6.5 GB a step for FLUX.1-dev (2.0 ms on an H200), 13.6 GB for Qwen-Image (3.9 ms), 0.1 s and 0.2 s of a
50-step generation, while one product over all 50 steps' embeddings takes 2.0 and 4.2 ms
(`benchmarks/modulation_gemv.py`). The time embedding depends on the timestep (and the guidance and pooled text,
which stay the same all generation), not on the latents, so every step's is known when the loop starts.

How: the model's `time_embedding` (called once per forward, before any block) is wrapped. On a forward inside the
denoise loop (`stages.denoise.current_step`), the first call of each position within a step (the CFG branches, when
they run as separate forwards) computes the time embedding of every step of the schedule with the same arguments
(the call's timestep for schedule value t is the DiT's `call_timestep(t, batch, dtype)`, the expression its
pipeline passes; each step's embedding computed on its own, as the forward would), runs each modulation module once
over all of them, and keeps the results in one table (steps, batch, sum of the modules' widths). Each call then
copies its step's row into a fixed buffer (one small copy) and the modules return views of it. The same values as
computing them per step up to the batched matmul's rounding (tests/test_modulation.py: fp32 <= 1e-6 per
generation), no host-device sync, no recompile (the views are the same tensors every step).

A call that does not match what was prepared (another batch size, other guidance or pooled-text tensors, a forward
outside the denoise loop, calls merged across concurrent generations) runs the modules as they are.
Not applied with CUDA graphs (the copy would be captured with one step's row), offload (weights stream per block),
concurrent-generation batching (one table per model at a time), or where the DiT declares no modulations (Wan's
come from one shared projection; FLUX.2 and Z-Image not done; Qwen-Image with zero_cond_t feeds half the embedding
to its text modulation).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from gen.transforms.forward import unwrap_forward, wrap_forward

NAME = "modulation_schedule"


@dataclass
class _Table:
    batch: int
    dtype: torch.dtype
    rest: tuple  # the call's other time-embedding arguments, kept to check later calls pass the same objects
    rows: torch.Tensor | None  # (steps, batch, width); None once the last step's row was taken


class ModulationSchedule:
    """Installed on one DiT model: wraps its `time_embedding` and the forward of each module of `modules`."""

    def __init__(self, model: nn.Module, modules: list[nn.Module], call_timestep):
        from stages.denoise import current_step

        self.model, self.modules, self.call_timestep = model, list(modules), call_timestep
        self._current_step = current_step
        self._embed = model.time_embedding  # the model's own method (bound)
        self._timesteps = None  # the schedule the tables were made for
        self._tables: list[_Table] = []
        self._step, self._call = -1, -1
        self._buffer: torch.Tensor | None = None  # (batch, width): the current call's row
        self._layout: list[tuple[int, int, tuple, bool]] = []  # per module: offset, width, leaf shapes, is tuple
        self._views: list = [None] * len(self.modules)
        self._prepared_calls = 0
        for i, module in enumerate(self.modules):
            wrap_forward(module, NAME, lambda inner, i=i: self._module_forward(i, inner))
        model.time_embedding = self._time_embedding  # instance attribute over the class's method

    def __repr__(self) -> str:
        return f"ModulationSchedule({len(self.modules)} modules, {self._prepared_calls} calls served)"

    def remove(self) -> None:
        for module in reversed(self.modules):
            unwrap_forward(module, NAME)
            module.__dict__.pop("_scheduled", None)
        self.model.__dict__.pop("time_embedding", None)
        self._tables, self._buffer = [], None

    # ---- per call

    def _module_forward(self, i: int, inner):
        module = self.modules[i]

        def forward(temb):
            views = module.__dict__.get("_scheduled")
            return inner(temb) if views is None else views

        return forward

    def _time_embedding(self, timestep: torch.Tensor, *rest):
        temb = self._embed(timestep, *rest)
        ok = self._prepare(timestep, rest)
        for module, views in zip(self.modules, self._views):
            module.__dict__["_scheduled"] = views if ok else None
        return temb

    def _prepare(self, timestep: torch.Tensor, rest: tuple) -> bool:
        step = self._current_step()
        if step is None or timestep.dim() != 1:
            return False
        i, timesteps = step
        if timesteps is not self._timesteps:  # a new generation
            self._timesteps, self._tables, self._step = timesteps, [], -1
        if i != self._step:
            self._step, self._call = i, 0
        else:
            self._call += 1
        if self._call == len(self._tables):
            self._tables.append(self._build(timesteps, timestep, rest))
        if self._call >= len(self._tables):
            return False
        table = self._tables[self._call]
        same_call = (table.batch == timestep.shape[0] and table.dtype == timestep.dtype
                     and len(table.rest) == len(rest) and all(a is b for a, b in zip(table.rest, rest)))
        if table.rows is None or not same_call:
            return False
        buffer = self._buffer
        if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (table.rows.shape[1:], table.rows.dtype,
                                                                            table.rows.device):
            self._allocate(table.rows)
        self._buffer.copy_(table.rows[i])
        if i == len(timesteps) - 1:  # its last row is in the buffer: the table's memory goes back now, not next time
            self._tables[self._call] = dataclasses.replace(table, rows=None)
        self._prepared_calls += 1
        return True

    # ---- tables

    @torch.no_grad()
    def _build(self, timesteps: torch.Tensor, timestep: torch.Tensor, rest: tuple) -> _Table:
        batch, n = timestep.shape[0], len(timesteps)
        temb = torch.cat([self._embed(self.call_timestep(timesteps[s], batch, timestep.dtype), *rest)
                          for s in range(n)])  # (steps * batch, D), each step's rows as its forward makes them
        outputs, layout, offset = [], [], 0
        for module in self.modules:
            module.__dict__["_scheduled"] = None  # the module runs as it is while the table is made
            out = module(temb)
            leaves = list(out) if isinstance(out, (tuple, list)) else [out]
            shapes = tuple(tuple(leaf.shape[1:]) for leaf in leaves)
            width = sum(int(torch.Size(s).numel()) for s in shapes)
            layout.append((offset, width, shapes, isinstance(out, (tuple, list))))
            outputs.append(torch.cat([leaf.reshape(n, batch, -1) for leaf in leaves], dim=-1))
            offset += width
        rows = torch.cat(outputs, dim=-1)  # (steps, batch, width)
        self._layout = layout
        return _Table(batch, timestep.dtype, tuple(rest), rows)

    def _allocate(self, rows: torch.Tensor) -> None:
        """The fixed buffer of one call's row and each module's views of it (the same tensors every step)."""
        self._buffer = torch.empty(rows.shape[1:], dtype=rows.dtype, device=rows.device)
        views = []
        for offset, _, shapes, is_tuple in self._layout:
            leaves = []
            for shape in shapes:
                n = int(torch.Size(shape).numel())
                leaves.append(self._buffer[:, offset:offset + n].unflatten(1, shape) if shape else
                              self._buffer[:, offset])
                offset += n
            views.append(tuple(leaves) if is_tuple else leaves[0])
        self._views = views


def prepare_modulations(model: nn.Module, dit) -> ModulationSchedule | None:
    """Install a ModulationSchedule on `model` when its family declares modulations; None when it has none."""
    if dit.modulations is None or dit.call_timestep is None or not hasattr(model, "time_embedding"):
        return None
    modules = dit.modulations(model)
    if not modules:
        return None
    return ModulationSchedule(model, modules, dit.call_timestep)
