"""Rank processes: start a group (spawned here, or launched by torchrun with env:// rendezvous), load the model on
every rank, and let rank 0 drive: it broadcasts each request, all ranks run the pipeline, rank 0 returns the result.

Not the parallel math (attention.py, apply.py). Collectives have timeouts; a dead rank makes rank 0 raise
`RankGroupError` and report not ready instead of hanging.
"""
from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import pickle
import socket
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gen.distributed.groups import DEFAULT_TIMEOUT_S, ParallelConfig, ParallelContext, backend_for, timeout
from gen.loading import load_pipeline
from gen.transforms import TransformOptions
from gen.types import GenError

log = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 900.0  # rendezvous: every rank must have started (imports, device set-up) within this
IDLE_TIMEOUT = datetime.timedelta(days=365)  # ranks wait this long for the next request (rank 0 dying ends it)
CONTROL_BACKEND = "gloo"  # requests, statuses and cancel flags are small CPU messages, whatever the device


class RankGroupError(RuntimeError):
    """A rank died or failed: the group can serve no more requests (restart it)."""


@dataclass(frozen=True)
class RankSpec:
    """What every rank needs to load the same model in the same layout."""

    path: str
    device_type: str
    dtype: torch.dtype
    variant: str | None
    config: ParallelConfig
    timeout_s: float = DEFAULT_TIMEOUT_S
    options: TransformOptions = field(default_factory=TransformOptions)
    transformer: str | None = None  # a single-file checkpoint replacing the folder's transformer


# ---------------------------------------------------------------- process group set-up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device_type: str, local_rank: int) -> torch.device:
    """One device per rank: the CPU for every rank, or accelerator `local_rank`."""
    if device_type == "cpu":
        return torch.device("cpu")
    device = torch.device(device_type, local_rank)
    torch.accelerator.set_device_index(local_rank)
    return device


def init_ranks(rank: int, world: int, init_method: str, device: torch.device) -> None:
    """Join the world; the default group is only for rendezvous: work runs on groups with their own timeouts."""
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world,
                            timeout=timeout(STARTUP_TIMEOUT_S), device_id=None if device.type == "cpu" else device)


def _control_groups(timeout_s: float):
    """(dispatch, control): requests wait on `dispatch` for as long as the service idles; `control` (statuses,
    cancel flags) times out like any collective."""
    dispatch = dist.new_group(backend=CONTROL_BACKEND, timeout=IDLE_TIMEOUT)
    control = dist.new_group(backend=CONTROL_BACKEND, timeout=timeout(timeout_s))
    return dispatch, control


def _load(spec: RankSpec, device: torch.device):
    ctx = ParallelContext.build(spec.config, device, spec.timeout_s)
    return load_pipeline(spec.path, device, spec.dtype, spec.variant, spec.options, parallel=ctx,
                         transformer=spec.transformer)


def _setup(rank: int, spec: RankSpec, device: torch.device):
    """Collective: load on every rank, then agree that all loaded. Returns (pipeline, dispatch, control)."""
    dispatch, control = _control_groups(spec.timeout_s)
    pipeline, own = None, None
    try:
        pipeline = _load(spec, device)
    except Exception as e:  # every rank reports, then all raise
        own = e
        if not isinstance(e, GenError):
            log.error("rank %d failed to load:\n%s", rank, traceback.format_exc())
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if own is None else f"{type(own).__name__}: {own}", group=dispatch)
    if isinstance(own, GenError):
        raise own
    if any(errors):
        raise RankGroupError("; ".join(f"rank {i} failed to load: {e}" for i, e in enumerate(errors) if e))
    return pipeline, dispatch, control


def send_object(obj, group, timeout_s: float) -> None:
    """Rank 0: broadcast a picklable object; raises if a rank does not take it within `timeout_s`."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    for t in (torch.tensor([data.numel()]), data):
        dist.broadcast(t, src=0, group=group, async_op=True).wait(timeout(timeout_s))


def recv_object(group):
    """Ranks 1..N-1: wait (as long as the group's timeout) for rank 0's next object."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=group)
    return pickle.loads(data.numpy().tobytes())


def _synced_cancel(cancel, control):
    """A cancel check every rank calls once per step; rank 0's answer is the group's."""
    def check() -> bool:
        flag = torch.tensor([1 if cancel is not None and cancel() else 0])
        dist.broadcast(flag, src=0, group=control)
        return bool(flag.item())
    return check


def _run_one(pipeline, req, control, progress=None, cancel=None):
    """Run one request on this rank; returns (result, own exception or None, every rank's error text)."""
    result, exc = None, None
    try:
        result = pipeline(req, progress=progress, cancel=_synced_cancel(cancel, control))
    except Exception as e:  # every rank reports, then rank 0 decides
        exc = e
    statuses = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, None if exc is None else f"{type(exc).__name__}: {exc}", group=control)
    return result, exc, statuses


# ---------------------------------------------------------------- ranks 1..N-1


def serve_requests(pipeline, dispatch, control) -> None:
    """The loop of every rank but 0: take each request rank 0 broadcasts and run it, until it sends None."""
    while True:
        req = recv_object(dispatch)
        if req is None:
            return
        _, exc, _ = _run_one(pipeline, req, control)
        if exc is not None and not isinstance(exc, GenError):
            log.warning("rank %d: request failed: %s", dist.get_rank(), exc)


def _worker_main(rank: int, world: int, init_method: str, spec: RankSpec) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = rank_device(spec.device_type, rank)
    init_ranks(rank, world, init_method, device)
    try:
        pipeline, dispatch, control = _setup(rank, spec, device)
        serve_requests(pipeline, dispatch, control)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- rank 0


class RankGroup:
    """Rank 0's handle on the group; called like a pipeline (`family`, `modality`, `defaults` are the model's).

    `alive`: every spawned rank process is running. `ready`: alive and no collective has failed.
    """

    def __init__(self, pipeline, dispatch, control, processes=(),
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.pipeline, self.dispatch, self.control = pipeline, dispatch, control
        self.timeout_s = timeout_s
        self.processes = list(processes)
        self.error: str | None = None
        self.closed = False
        atexit.register(self.close)

    def __getattr__(self, name):
        if name in ("pipeline", "processes", "error", "closed", "timeout_s"):
            raise AttributeError(name)
        return getattr(self.pipeline, name)

    @property
    def world_size(self) -> int:
        return self.pipeline.transforms.get("parallel").detail.ctx.config.world_size

    @property
    def alive(self) -> bool:
        return not self.closed and all(p.is_alive() for p in self.processes)

    @property
    def ready(self) -> bool:
        return self.alive and self.error is None

    def _dead(self) -> str | None:
        dead = [f"rank {i + 1} (pid {p.pid}) exited with code {p.exitcode}"
                for i, p in enumerate(self.processes) if not p.is_alive()]
        return "; ".join(dead) or None

    def __call__(self, req, progress=None, cancel=None):
        if self.closed:
            raise RankGroupError("the rank group is closed")
        if self.error is None and self._dead():
            self.error = self._dead()
        if self.error is not None:
            raise RankGroupError(f"the rank group is not ready: {self.error}; restart it")
        try:
            send_object(req, self.dispatch, self.timeout_s)
            result, exc, statuses = _run_one(self.pipeline, req, self.control, progress, cancel)
        except RuntimeError as e:  # a collective failed or timed out: a rank is gone or stuck
            self.error = self._dead() or f"a collective failed (a rank is stuck or gone): {e}"
            raise RankGroupError(f"the rank group failed during a request: {self.error}") from e
        own = statuses[0]
        others = [f"rank {i}: {s}" for i, s in enumerate(statuses) if s and s != own]
        if others:
            self.error = "; ".join(others)
            raise RankGroupError(f"ranks disagree about the request: {self.error}") from exc
        if exc is not None:
            raise exc
        return result

    def close(self) -> None:
        """Tell the other ranks to exit and wait for them (terminating stragglers)."""
        if self.closed:
            return
        self.closed = True
        if self.error is None:
            try:
                send_object(None, self.dispatch, self.timeout_s)
            except RuntimeError as e:
                log.warning("could not stop the ranks cleanly: %s", e)
        for p in self.processes:
            p.join(timeout=30 if self.error is None else 2)
            if p.is_alive():
                p.kill()  # SIGKILL: also ends a stopped or stuck rank
                p.join(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def check_heads(path: Path, config: ParallelConfig) -> None:
    """Fail before starting any process when Ulysses cannot split the model's heads."""
    cfg_file = Path(path) / "transformer" / "config.json"
    if cfg_file.is_file():
        heads = json.loads(cfg_file.read_text()).get("num_attention_heads")
        if isinstance(heads, int):
            config.check_heads(heads)


def start_ranks(path, device: torch.device, dtype: torch.dtype, variant: str | None, config: ParallelConfig,
                timeout_s: float = DEFAULT_TIMEOUT_S, options: TransformOptions = TransformOptions(),
                transformer: str | None = None) -> RankGroup:
    """Start `config.world_size` ranks and return rank 0's RankGroup.

    Under torchrun (RANK / WORLD_SIZE / MASTER_ADDR set) the ranks already exist: rendezvous through env://;
    ranks other than 0 serve requests until rank 0 closes the group, then exit the process.
    Otherwise spawn ranks 1..N-1 (one per accelerator, or N CPU processes with gloo); this process is rank 0.
    """
    check_heads(path, config)
    spec = RankSpec(str(path), device.type, dtype, variant, config, timeout_s, options,
                    None if transformer is None else str(transformer))
    world = config.world_size
    if launched_by_torchrun():
        env_world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if env_world != world:
            raise GenError(f"num_gpus={world} but torchrun started WORLD_SIZE={env_world} ranks", param="num_gpus")
        rank_dev = rank_device(device.type, int(os.environ.get("LOCAL_RANK", 0)))
        init_ranks(rank, world, "env://", rank_dev)
        pipeline, dispatch, control = _setup(rank, spec, rank_dev)
        if rank != 0:
            serve_requests(pipeline, dispatch, control)
            dist.destroy_process_group()
            raise SystemExit(0)
        return RankGroup(pipeline, dispatch, control, timeout_s=timeout_s)
    if device.type != "cpu" and torch.accelerator.device_count() < world:
        raise GenError(f"num_gpus={world} but this machine has {torch.accelerator.device_count()} "
                       f"{device.type} devices", param="num_gpus")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    context = mp.get_context("spawn")
    processes = [context.Process(target=_worker_main, args=(r, world, init_method, spec), daemon=True)
                 for r in range(1, world)]
    for p in processes:
        p.start()
    try:
        rank_dev = rank_device(device.type, 0)
        init_ranks(0, world, init_method, rank_dev)
        pipeline, dispatch, control = _setup(0, spec, rank_dev)
    except BaseException:
        for p in processes:
            p.terminate()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    return RankGroup(pipeline, dispatch, control, processes, timeout_s)


# ---------------------------------------------------------------- run a function on N fresh ranks (tests, benchmarks)


def _run_fn(rank: int, world: int, init_method: str, device_type: str, timeout_s: float, fn, args, results) -> None:
    device = rank_device(device_type, rank)
    init_ranks(rank, world, init_method, device)
    try:
        results.put((rank, "ok", fn(rank, device, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world: int, *args, device_type: str = "cpu", timeout_s: float = 120.0) -> list:
    """Run `fn(rank, device, *args)` on `world` spawned ranks with a process group; returns each rank's result.
    `fn` must be importable (module level); a rank's exception is re-raised here with its traceback."""
    context = mp.get_context("spawn")
    results = context.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [context.Process(target=_run_fn, args=(r, world, init_method, device_type, timeout_s, fn, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    out, errors = {}, []
    try:
        while len(out) + len(errors) < world:
            try:
                rank, status, value = results.get(timeout=timeout_s)
            except Exception:  # queue.Empty: some rank is stuck or died without reporting
                raise RankGroupError(f"ranks did not finish within {timeout_s}s: "
                                     f"{[p.exitcode for p in procs]}") from None
            (out.__setitem__(rank, value) if status == "ok" else errors.append(f"rank {rank}:\n{value}"))
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.terminate()
    if errors:
        raise RankGroupError("\n".join(errors))
    return [out[r] for r in range(world)]
