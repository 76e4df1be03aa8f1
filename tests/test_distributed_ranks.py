"""Rank groups: Generator.from_pretrained(num_gpus=2) equals one process; a dead or stuck rank raises, never hangs."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import psnr

from gen.cli import build_parser, main as gen_main
from gen.distributed.groups import ParallelConfig
from gen.distributed.ranks import RankGroupError, start_ranks
from gen.generator import Generator
from gen.types import GenError

FLUX = Path(__file__).resolve().parents[1] / "assets" / "flux-tiny"
ARGS = dict(prompt="a red cat", negative_prompt="blue", true_cfg_scale=3.0, height=48, width=32,
            num_inference_steps=2, seed=5)


@pytest.fixture(scope="module")
def single() -> np.ndarray:
    return np.asarray(Generator.from_pretrained(FLUX, device="cpu").generate(**ARGS).images[0])


def test_two_ranks_equal_one(single):
    gen = Generator.from_pretrained(FLUX, device="cpu", num_gpus=2, ring_degree=2)
    try:
        assert gen.ready and gen.alive and gen.family == "flux"
        for _ in range(2):  # the group serves request after request
            assert psnr(np.asarray(gen.generate(**ARGS).images[0]), single) >= 50
        with pytest.raises(GenError, match="height"):  # a bad request fails on every rank; the group stays usable
            gen.generate(**{**ARGS, "height": 50})
        assert gen.ready
    finally:
        gen.close()
    assert not gen.ready


def test_killed_rank_makes_the_group_not_ready():
    gen = Generator.from_pretrained(FLUX, device="cpu", num_gpus=2, cfg_parallel=True)
    try:
        worker = gen.pipeline.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        assert not gen.alive and not gen.ready
        start = time.monotonic()
        with pytest.raises(RankGroupError, match="rank 1 .* exited"):
            gen.generate(**ARGS)
        assert time.monotonic() - start < 10
    finally:
        gen.close()


def test_stuck_rank_times_out_instead_of_hanging():
    group = start_ranks(FLUX, torch.device("cpu"), torch.float32, None, ParallelConfig(ulysses_degree=2), timeout_s=5)
    worker = group.processes[0]
    try:
        os.kill(worker.pid, signal.SIGSTOP)  # alive but never answers
        start = time.monotonic()
        with pytest.raises(RankGroupError):
            group(_request())
        assert time.monotonic() - start < 60
        assert not group.ready
    finally:
        group.close()
    assert not worker.is_alive()


def _request():
    from gen.types import GenerationRequest

    return GenerationRequest(**ARGS)


def test_heads_not_divisible_fails_before_starting_ranks():
    with pytest.raises(GenError, match="2 attention heads.*ulysses_degree=4"):
        Generator.from_pretrained(FLUX, device="cpu", num_gpus=4, ulysses_degree=4)


def test_cli_parallel_flags(tmp_path):
    args = build_parser().parse_args(["generate", "--prompt", "x", "--num-gpus", "4", "--ulysses-degree", "2",
                                      "--ring-degree", "2", "--cfg-parallel"])
    assert (args.num_gpus, args.ulysses_degree, args.ring_degree, args.cfg_parallel) == (4, 2, 2, True)
    out = tmp_path / "o.png"
    code = gen_main(["generate", "--model-path", str(FLUX), "--device", "cpu", "--prompt", "a red cat",
                     "--height", "48", "--width", "32", "--num-inference-steps", "2", "--seed", "5",
                     "--num-gpus", "2", "--output", str(out)])
    assert code == 0 and out.is_file()
