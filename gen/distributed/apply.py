"""Sequence and CFG parallelism applied to a loaded pipeline from outside: wrappers and hooks driven by a ShardPlan.

Not the attention math (gen/distributed/attention.py) nor the plans (each family's `DiT.shard_plan`); the model
files are not touched. `parallelize(pipeline, ctx)` wraps each of the pipeline's DiTs (gen/transforms/forward.py) so
that each call shards its per-token tensors over the sp group, runs with the sequence-parallel attention backend
installed, and gathers the output; with cfg_degree 2 the two calls of a true-CFG step run on different rank halves.
One of the transforms gen.transforms.apply_transforms composes.
"""
from __future__ import annotations

import contextlib
import inspect
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gen.distributed.attention import CallState, SequenceParallelAttention
from gen.distributed.groups import ParallelContext
from gen.distributed.plans import ShardPlan
from gen.distributed.vae import SplitDecode
from gen.models.attention import get_attention_backend, set_attention_backend
from gen.transforms.forward import unwrap_forward, wrap_forward

WRAPPER = "sequence_parallel"


class ShardedTransformer:
    """The hooks and the forward wrapper that run one transformer sequence-parallel; `remove()` undoes them."""

    def __init__(self, model: torch.nn.Module, plan: ShardPlan, ctx: ParallelContext, cfg: "CfgParallel"):
        self.model, self.plan, self.ctx, self.cfg = model, plan, ctx, cfg
        heads = getattr(model.config, plan.heads_attr)
        ctx.config.check_heads(heads)
        self.sp = ctx.config.sp_degree > 1
        self.attn = SequenceParallelAttention(ctx, get_attention_backend())
        self.handles = []
        self.methods: list[str] = []
        self.prefixes: list[int] = []  # text prefix lengths set aside inside `no_prefix` modules
        if self.sp:
            self._install_hooks()

        def make(inner):
            self.forward, self.signature = inner, inspect.signature(inner)
            return self._forward

        wrap_forward(model, WRAPPER, make)

    # ---- sharding helpers (active only inside a wrapped call)

    def shard(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's piece of the sequence along `dim` (padded with zeros to a multiple of the sp degree)."""
        st = self.attn.state
        dim = dim % t.ndim
        length = t.shape[dim]
        if st.full_len is None:
            st.full_len = length
        elif length != st.full_len:
            return t  # not per-token (e.g. a (B, 1) timestep)
        n = self.ctx.config.sp_degree
        padded = -(-length // n) * n
        if padded != length:
            pad = [0, 0] * (t.ndim - 1 - dim) + [0, padded - length]
            t = F.pad(t, pad)
        size = padded // n
        return t.narrow(dim, self.ctx.sp_rank * size, size)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L_shard, ...) on every sp rank -> (B, L, ...) on every sp rank, padding dropped."""
        parts = [torch.empty_like(t) for _ in range(self.ctx.config.sp_degree)]
        dist.all_gather(parts, t.contiguous(), group=self.ctx.sp_group)
        return torch.cat(parts, dim=1)[:, : self.attn.state.full_len]

    def apply_split(self, value, split):
        if value is None or self.attn.state is None:
            return value
        if isinstance(split, int):
            return self.shard(value, split) if isinstance(value, torch.Tensor) else value
        return split(value, self.shard)

    # ---- hooks

    def _install_hooks(self) -> None:
        model, plan = self.model, self.plan
        for name, split in plan.split_outputs.items():
            hook = lambda m, args, out, split=split: self.apply_split(out, split)
            self.handles.append(model.get_submodule(name).register_forward_hook(hook))
        for name, split in plan.split_methods.items():
            method = getattr(model, name)
            setattr(model, name, lambda *a, method=method, split=split, **kw: self.apply_split(method(*a, **kw), split))
            self.methods.append(name)
        for pattern, splits in plan.split_args.items():
            for module in self._matching(pattern):
                signature = inspect.signature(module.forward)
                unknown = set(splits) - set(signature.parameters)
                assert not unknown, f"plan splits {sorted(unknown)}: not arguments of {type(module).__name__}.forward"

                def pre(m, args, kwargs, splits=splits, signature=signature):
                    bound = signature.bind(*args, **kwargs)
                    for name, split in splits.items():
                        if name in bound.arguments:
                            bound.arguments[name] = self.apply_split(bound.arguments[name], split)
                    return bound.args, bound.kwargs

                self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if plan.gather:
            hook = lambda m, args, out: self.gather(out) if self.attn.state is not None else out
            self.handles.append(model.get_submodule(plan.gather).register_forward_hook(hook))
        for pattern in plan.local_attention:
            for module in self._matching(pattern):
                self.handles.append(module.register_forward_pre_hook(lambda m, a: self._local(+1)))
                self.handles.append(module.register_forward_hook(lambda m, a, o: self._local(-1)))
        for pattern in plan.no_prefix:
            for module in self._matching(pattern):
                self.handles.append(module.register_forward_pre_hook(lambda m, a: self._no_prefix(True)))
                self.handles.append(module.register_forward_hook(lambda m, a, o: self._no_prefix(False)))

    def _matching(self, pattern: str) -> list[torch.nn.Module]:
        """Submodules whose dotted name matches `pattern`, where `*` stands for one name component."""
        regex = re.compile(re.escape(pattern).replace(r"\*", r"[^.]+"))
        found = [m for name, m in self.model.named_modules() if regex.fullmatch(name)]
        assert found, f"plan pattern {pattern!r} matches no submodule of {type(self.model).__name__}"
        return found

    def _local(self, delta: int) -> None:
        if self.attn.state is not None:
            self.attn.state.local_depth += delta

    def _no_prefix(self, enter: bool) -> None:
        """Inside a `no_prefix` module the sharded tokens attend among themselves: no replicated text leads."""
        st = self.attn.state
        if st is not None:
            if enter:
                self.prefixes.append(st.prefix_len)
                st.prefix_len = 0
            else:
                st.prefix_len = self.prefixes.pop()

    # ---- the call

    def _forward(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        return self.cfg(lambda: self._run(bound), bound.arguments)

    def _run(self, bound: inspect.BoundArguments):
        if not self.sp:
            return self.forward(*bound.args, **bound.kwargs)
        plan, a = self.plan, bound.arguments
        prefix = plan.text_prefix
        state = CallState(prefix_len=0 if prefix is None else prefix(self.model, a) if callable(prefix)
                          else a[prefix].shape[1])
        if plan.seq_len is not None:
            state.full_len = plan.seq_len(self.model, a)
        with self._installed(state):
            if self._shard_text(a, state):
                state.sharded_text, state.prefix_len = state.prefix_len, 0
            for name, split in plan.split_inputs.items():
                if name in a:
                    a[name] = self.apply_split(a[name], split)
            out = self.forward(*bound.args, **bound.kwargs)
            return out if plan.gather else self.gather(out)

    def _shard_text(self, a: dict, state: CallState) -> bool:
        """Split the plan's text inputs in `a` (in place) when the text prefix divides evenly over the sp ranks and
        the call passes no mask (reading one would wait for the device); True when it did. Otherwise the text stays
        replicated."""
        n, p = self.ctx.config.sp_degree, state.prefix_len
        if not self.plan.text_inputs or p == 0 or p % n or any(
                "mask" in name and isinstance(v, torch.Tensor) for name, v in a.items()):
            return False

        def piece(t: torch.Tensor, dim: int) -> torch.Tensor:
            dim = dim % t.ndim
            assert t.shape[dim] == p, f"text input of length {t.shape[dim]} at dim {dim}, the prefix is {p}"
            return t.narrow(dim, self.ctx.sp_rank * (p // n), p // n)

        for name, split in self.plan.text_inputs.items():
            value = a.get(name)
            if isinstance(value, torch.Tensor) or (value is not None and callable(split)):
                a[name] = piece(value, split) if isinstance(split, int) else split(value, piece)
        return True

    @contextlib.contextmanager
    def _installed(self, state: CallState):
        assert self.attn.state is None, "a sharded call is already in progress (re-entrant transformer call?)"
        self.attn.state = state
        previous = set_attention_backend(self.attn)
        try:
            yield
        finally:
            set_attention_backend(previous)
            self.attn.state = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for name in self.methods:
            self.model.__dict__.pop(name, None)
        unwrap_forward(self.model, WRAPPER)


class CfgParallel:
    """Runs the two transformer calls of a true-CFG step (same timestep, conditional then unconditional) on the
    two rank halves, and swaps the results so every rank returns what the unparallel call would.

    Which calls pair up is learnt from the first step (run whole on both halves): a second call with the same
    timestep marks CFG on. From then on half 0 computes the first call while half 1 returns a placeholder, half 1
    computes the second call, and the halves exchange results; the placeholder is filled in place (the pipelines
    hold the first result untouched until the second call returns). `reset()` before each request.
    """

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.enabled = ctx.config.cfg_degree > 1
        self.reset()

    def reset(self) -> None:
        self.paired: bool | None = None  # None: not known yet for this request
        self.first = None  # (timestep, input shape) of a step's first call, until its second call comes
        self.pending: torch.Tensor | None = None  # half 1's placeholder for the first call's result
        self.shapes: dict = {}  # input shape -> (output shape, dtype)
        self.exchanges = 0  # steps whose two branches ran on different halves (this request)

    def __call__(self, run, args: dict):
        if not self.enabled:
            return run()
        t, x = args["timestep"], args["hidden_states"]
        second = self.first is not None and self.first[1] == x.shape and torch.equal(self.first[0], t)
        half = self.ctx.cfg_rank
        if not second:
            if self.first is not None:
                self.paired = False  # the previous step made one call: no CFG in this request
            self.first = (t.clone(), x.shape)
            if not self.paired:
                return self._full(run, x)
            self.pending = run() if half == 0 else self._placeholder(x)
            return self.pending
        self.first = None
        if not self.paired:  # the learning step: its second call, run whole
            self.paired = True
            return self._full(run, x)
        mine = run() if half == 1 else self._placeholder(x)
        parts = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(parts, (self.pending if half == 0 else mine).contiguous(), group=self.ctx.cfg_group)
        if half == 1:
            self.pending.copy_(parts[0])
        self.pending = None
        self.exchanges += 1
        return parts[1] if half == 0 else mine

    def _full(self, run, x):
        out = run()
        self.shapes[x.shape] = (out.shape, out.dtype)
        return out

    def _placeholder(self, x):
        shape, dtype = self.shapes[x.shape]
        return torch.empty(shape, dtype=dtype, device=x.device)


class SequenceParallel:
    """The sequence / CFG parallel state of one pipeline on this rank: its DiTs sharded, the CFG pairing reset before
    each request; `remove()` undoes it."""

    def __init__(self, pipeline, ctx: ParallelContext):
        self.pipeline, self.ctx = pipeline, ctx
        self.cfg = CfgParallel(ctx)
        self.sharded: list[ShardedTransformer] = []
        try:
            for _, model, dit in pipeline.dits():
                self.sharded.append(ShardedTransformer(model, dit.shard_plan, ctx, self.cfg))
        except BaseException:  # undo the hooks already installed, then let the error go on
            self.remove()
            raise
        pipeline.request_hooks.append(self.cfg.reset)
        vae = getattr(pipeline, "vae", None)
        self.decode: SplitDecode | None = None  # the VAE decode split by rows over all ranks
        if ctx.all_group is not None and hasattr(vae, "decoder"):
            split = SplitDecode(vae, ctx.all_group, ctx.rank, ctx.config.world_size)
            self.decode = None if split.unsupported else split

    def remove(self) -> None:
        if self.decode is not None:
            self.decode.remove()
            self.decode = None
        for s in reversed(self.sharded):
            s.remove()
        self.sharded = []
        if self.cfg.reset in self.pipeline.request_hooks:
            self.pipeline.request_hooks.remove(self.cfg.reset)


def parallelize(pipeline, ctx: ParallelContext) -> SequenceParallel:
    """Run `pipeline`'s DiTs over `ctx`'s ranks, in place (every rank calls this and then runs every request)."""
    return SequenceParallel(pipeline, ctx)
