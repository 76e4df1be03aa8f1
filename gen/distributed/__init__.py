"""Sequence (Ulysses, Ring) and CFG parallelism over torch.distributed ranks, applied to pipelines from outside."""
from gen.distributed.apply import ParallelPipeline, parallelize
from gen.distributed.groups import ParallelConfig, ParallelContext
from gen.distributed.ranks import RankGroup, RankGroupError, run_on_ranks, start_ranks

__all__ = ["ParallelConfig", "ParallelContext", "ParallelPipeline", "RankGroup", "RankGroupError", "parallelize",
           "run_on_ranks", "start_ranks"]
