"""Parallel layout (Ulysses x Ring x CFG degrees) and the torch.distributed process groups that realise it.

Not the attention math (gen/distributed/attention.py) nor rank spawning (gen/distributed/ranks.py).
Rank layout: rank = cfg_index * sp_degree + ring_index * ulysses_degree + ulysses_index (Ulysses innermost, so
its all-to-all stays on the fastest links); a rank's sequence shard is number ring_index * ulysses + ulysses_index.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gen.types import GenError

DEFAULT_TIMEOUT_S = 600.0  # a collective that waits longer than this raises instead of hanging


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of each kind of parallelism; their product is the number of ranks."""

    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_degree: int = 1  # 2 = conditional and unconditional branches on different rank halves
    # Ulysses (without Ring) in this many head groups, pipelined: all-to-alls overlap the other groups' attention
    ulysses_chunks: int = 1

    def __post_init__(self):
        for name in ("ulysses_degree", "ring_degree", "ulysses_chunks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenError(f"{name} must be a positive integer, got {value!r}", param=name)
        if self.cfg_degree not in (1, 2):
            raise GenError(f"cfg_degree must be 1 or 2, got {self.cfg_degree!r}", param="cfg_parallel")

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return self.sp_degree * self.cfg_degree

    @classmethod
    def from_flags(cls, num_gpus: int, ulysses_degree: int | None = None, ring_degree: int | None = None,
                   cfg_parallel: bool = False, ulysses_chunks: int = 1) -> "ParallelConfig":
        """Resolve user flags: the sequence-parallel degree is num_gpus (halved by cfg_parallel); an unset
        Ulysses / Ring degree takes what the other leaves (both unset: all Ulysses)."""
        if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
            raise GenError(f"num_gpus must be a positive integer, got {num_gpus!r}", param="num_gpus")
        cfg = 2 if cfg_parallel else 1
        if num_gpus % cfg:
            raise GenError(f"cfg_parallel needs an even num_gpus, got {num_gpus}", param="num_gpus")
        sp = num_gpus // cfg
        for name, value in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise GenError(f"{name} must be a positive integer, got {value!r}", param=name)
            if value is not None and sp % value:
                raise GenError(f"{name}={value} does not divide the sequence-parallel degree {sp} "
                               f"(num_gpus={num_gpus}{', halved by cfg_parallel' if cfg_parallel else ''})", param=name)
        if ulysses_degree is None and ring_degree is None:
            ulysses_degree, ring_degree = sp, 1
        elif ulysses_degree is None:
            ulysses_degree = sp // ring_degree
        elif ring_degree is None:
            ring_degree = sp // ulysses_degree
        if ulysses_degree * ring_degree != sp:
            raise GenError(f"ulysses_degree ({ulysses_degree}) x ring_degree ({ring_degree}) must equal "
                           f"{sp} (num_gpus={num_gpus}{', halved by cfg_parallel' if cfg_parallel else ''})",
                           param="ulysses_degree")
        return cls(ulysses_degree, ring_degree, cfg, ulysses_chunks)

    def check_heads(self, num_heads: int) -> None:
        """Ulysses splits attention heads across ranks (in ulysses_chunks groups): the head count must divide evenly."""
        chunks = self.ulysses_chunks if self.ulysses_degree > 1 and self.ring_degree == 1 else 1
        if chunks > 1 and num_heads % (self.ulysses_degree * chunks):
            raise GenError(f"the model has {num_heads} attention heads, which ulysses_degree={self.ulysses_degree} x "
                           f"ulysses_chunks={chunks} does not divide", param="ulysses_chunks")
        if num_heads % self.ulysses_degree:
            raise GenError(f"the model has {num_heads} attention heads, which ulysses_degree={self.ulysses_degree} "
                           f"does not divide; pick a ulysses_degree that divides {num_heads} and use ring_degree "
                           "for the rest", param="ulysses_degree")


def timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def backend_for(device: torch.device) -> str:
    """The collective backend torch pairs with this device type (gloo on the CPU, NCCL on CUDA, ...)."""
    return dist.get_default_backend_for_device(device)


class ParallelContext:
    """This rank's place in the layout and the process groups it talks over (None where a degree is 1).

    Built collectively: every rank of the world must call `build` with the same config, in the same order. Ranks at
    or beyond `config.world_size` take part in group creation but belong to no group (`member` is False).
    """

    def __init__(self, config: ParallelConfig, rank: int, device: torch.device):
        self.config, self.rank, self.device = config, rank, device
        self.member = rank < config.world_size
        u, sp = config.ulysses_degree, config.sp_degree
        self.cfg_rank, sp_index = divmod(rank, sp) if self.member else (0, 0)
        self.ring_rank, self.ulysses_rank = divmod(sp_index, u)
        self.sp_rank = sp_index  # which sequence shard this rank holds
        self.ulysses_group = self.ring_group = self.sp_group = self.cfg_group = None
        self.all_group = None  # every rank of the layout (VAE decode splits over it), when there are several
        self.ring_ranks: list[int] = [rank]

    @classmethod
    def build(cls, config: ParallelConfig, device: torch.device,
              timeout_s: float = DEFAULT_TIMEOUT_S) -> "ParallelContext":
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; start ranks with gen.distributed.ranks")
        world, rank = dist.get_world_size(), dist.get_rank()
        if config.world_size > world:
            raise GenError(f"the layout {config} needs {config.world_size} ranks, the world has {world}",
                           param="num_gpus")
        ctx = cls(config, rank, device)
        u, r, c, sp = config.ulysses_degree, config.ring_degree, config.cfg_degree, config.sp_degree
        t = timeout(timeout_s)

        def make(ranks: list[int]):  # collective: every rank calls new_group for every group
            group = dist.new_group(ranks, timeout=t)
            return group if rank in ranks else None

        for ci in range(c):
            for ri in range(r):
                ranks = [ci * sp + ri * u + j for j in range(u)]
                g = make(ranks) if u > 1 else None
                ctx.ulysses_group = g if rank in ranks else ctx.ulysses_group
            for uj in range(u):
                ranks = [ci * sp + i * u + uj for i in range(r)]
                g = make(ranks) if r > 1 else None
                if rank in ranks:
                    ctx.ring_group, ctx.ring_ranks = g, ranks
            ranks = [ci * sp + s for s in range(sp)]
            g = make(ranks) if sp > 1 else None
            ctx.sp_group = g if rank in ranks else ctx.sp_group
        if config.world_size > 1:
            ctx.all_group = make(list(range(config.world_size)))
        if c > 1:
            for s in range(sp):
                ranks = [ci * sp + s for ci in range(c)]
                g = make(ranks)
                ctx.cfg_group = g if rank in ranks else ctx.cfg_group
        return ctx

    def __repr__(self) -> str:
        return (f"ParallelContext(rank={self.rank}, {self.config}, cfg_rank={self.cfg_rank}, "
                f"ring_rank={self.ring_rank}, ulysses_rank={self.ulysses_rank})")
