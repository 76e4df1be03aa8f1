"""Sequence (Ulysses, Ring) and CFG parallelism over torch.distributed ranks, applied to pipelines from outside:
groups.py (process groups), attention.py (the parallel attention), plans.py (ShardPlan), apply.py (the transform),
ranks.py (starting and driving a group of ranks)."""
