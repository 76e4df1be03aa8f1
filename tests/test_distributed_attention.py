"""Sequence-parallel attention (Ulysses, Ring, both; with replicated text and padding) equals plain attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gen.distributed.attention import CallState, SequenceParallelAttention, merge, reference_attention_lse
from gen.distributed.groups import ParallelConfig, ParallelContext
from gen.distributed.ranks import run_on_ranks
from gen.models.attention import ByShape, sdpa_attention
from gen.types import GenError

# (ulysses, ring, cfg[, ulysses_chunks])
LAYOUTS = [(2, 1, 1), (1, 2, 1), (4, 1, 1), (1, 4, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2),
           (2, 1, 1, 2), (2, 1, 1, 4), (4, 1, 1, 2), (2, 1, 2, 2)]


def test_reference_lse_matches_sdpa_and_logsumexp():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out, lse = reference_attention_lse(q, k, v, mask)
    assert (out - sdpa_attention(q, k, v, mask)).abs().max() < 1e-6
    s = torch.einsum("bqhd,bkhd->bqhk", q, k) / 8**0.5
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    assert (lse - s.logsumexp(-1)).abs().max() < 1e-5


def test_merge_of_key_halves_equals_whole():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    whole = sdpa_attention(q, k, v)
    acc = merge(None, reference_attention_lse(q, k[:, :3], v[:, :3]))
    acc = merge(acc, reference_attention_lse(q, k[:, 3:], v[:, 3:]))
    assert (acc[0] - whole).abs().max() < 1e-6


def test_fully_masked_block_is_neutral():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    empty = reference_attention_lse(q, k, v, torch.zeros(1, 4, dtype=torch.bool))
    assert torch.isneginf(empty[1]).all() and (empty[0] == 0).all()
    merged = merge(merge(None, empty), reference_attention_lse(q, k, v))
    assert (merged[0] - sdpa_attention(q, k, v)).abs().max() < 1e-6
    both_empty = merge(merge(None, empty), empty)
    assert torch.isfinite(both_empty[0]).all()


@pytest.mark.parametrize("flags, expected", [
    ((4, None, None, False), (4, 1, 1)),
    ((4, 2, None, False), (2, 2, 1)),
    ((4, None, 4, False), (1, 4, 1)),
    ((4, None, None, True), (2, 1, 2)),
    ((8, 2, 2, True), (2, 2, 2)),
    ((1, None, None, False), (1, 1, 1)),
])
def test_config_from_flags(flags, expected):
    c = ParallelConfig.from_flags(*flags)
    assert (c.ulysses_degree, c.ring_degree, c.cfg_degree) == expected


@pytest.mark.parametrize("flags, bad", [
    ((3, None, None, True), "num_gpus"), ((4, 3, None, False), "ulysses_degree"), ((4, 2, 4, False), "ulysses_degree"),
    ((0, None, None, False), "num_gpus"),
])
def test_config_rejects_bad_flags(flags, bad):
    with pytest.raises(GenError) as e:
        ParallelConfig.from_flags(*flags)
    assert e.value.param == bad


def test_heads_not_divisible_is_a_clear_error():
    with pytest.raises(GenError, match="2 attention heads.*ulysses_degree=4"):
        ParallelConfig(ulysses_degree=4).check_heads(2)
    with pytest.raises(GenError, match="24 attention heads.*ulysses_chunks=5") as e:
        ParallelConfig(ulysses_degree=2, ulysses_chunks=5).check_heads(24)
    assert e.value.param == "ulysses_chunks"
    ParallelConfig(ulysses_degree=2, ulysses_chunks=4).check_heads(24)  # FLUX's 24 heads: 2 x 4 divides
    ParallelConfig(ulysses_degree=2, ring_degree=2, ulysses_chunks=5).check_heads(24)  # not pipelined with Ring
    with pytest.raises(GenError, match="ulysses_chunks must be a positive integer"):
        ParallelConfig(ulysses_chunks=0)
    assert ParallelConfig.from_flags(2, ulysses_chunks=3).ulysses_chunks == 3


def _shard(x: torch.Tensor, n: int, i: int) -> torch.Tensor:
    pad = -(-x.shape[1] // n) * n - x.shape[1]
    x = F.pad(x, (0, 0, 0, 0, 0, pad))
    size = x.shape[1] // n
    return x[:, i * size:(i + 1) * size]


def _attention_cases(rank: int, device: torch.device) -> dict:
    """On every rank: each layout's sequence-parallel attention against the whole attention; worst errors."""
    torch.manual_seed(0)
    b, h, d, length = 2, 8, 8, 13  # 13 tokens: padded for 2 and 4 shards
    errors = {}
    for layout in [lo for lo in LAYOUTS if ParallelConfig(*lo).world_size <= torch.distributed.get_world_size()]:
        ctx = ParallelContext.build(ParallelConfig(*layout), device, timeout_s=60)
        for prefix in (0, 3):
            q, k, v = (torch.randn(b, prefix + length, h, d).to(device) for _ in range(3))  # same on every rank
            mask = None
            if prefix:
                mask = torch.ones(b, prefix + length, dtype=torch.bool, device=device)
                mask[0, 1] = False  # one padded text token
            ref = sdpa_attention(q, k, v, mask)
            if not ctx.member:
                continue
            sp = ctx.config.sp_degree
            attn = SequenceParallelAttention(ctx, sdpa_attention)
            attn.state = CallState(prefix_len=prefix, full_len=length)
            local = [torch.cat([x[:, :prefix], _shard(x[:, prefix:], sp, ctx.sp_rank)], dim=1) for x in (q, k, v)]
            lmask = None if mask is None else mask[:, : local[0].shape[1]]
            out = attn(*local, lmask)
            want = torch.cat([ref[:, :prefix], _shard(ref[:, prefix:], sp, ctx.sp_rank)], dim=1)
            valid = prefix + max(0, min(length - ctx.sp_rank * (want.shape[1] - prefix), want.shape[1] - prefix))
            errors[(layout, prefix)] = (out[:, :valid] - want[:, :valid]).abs().max().item()
        # text sharded with the sequence (FLUX): each rank holds [its text piece, its sequence piece], no mask
        text = 4  # divides by 2 and 4
        q, k, v = (torch.randn(b, text + length, h, d).to(device) for _ in range(3))
        ref = sdpa_attention(q, k, v)
        if not ctx.member:
            continue
        sp = ctx.config.sp_degree
        attn = SequenceParallelAttention(ctx, sdpa_attention)
        attn.state = CallState(full_len=length, sharded_text=text)
        piece = text // sp

        def local_of(x):
            return torch.cat([x[:, ctx.sp_rank * piece:(ctx.sp_rank + 1) * piece],
                              _shard(x[:, text:], sp, ctx.sp_rank)], dim=1)

        out, want = attn(*(local_of(x) for x in (q, k, v))), local_of(ref)
        shard = want.shape[1] - piece
        valid = piece + max(0, min(length - ctx.sp_rank * shard, shard))
        errors[(layout, "sharded text")] = (out[:, :valid] - want[:, :valid]).abs().max().item()
    # Ulysses over a per-shape race of two kernels (gen.models.attention.ByShape, as installed with FlashAttention-4)
    ctx = ParallelContext.build(ParallelConfig(2, 1, 1), device, timeout_s=60)
    q, k, v = (torch.randn(b, length, h, d).to(device) for _ in range(3))
    ref = sdpa_attention(q, k, v)
    if ctx.member:
        attn = SequenceParallelAttention(ctx, ByShape(("math", "sdpa")))
        attn.state = CallState(full_len=length)
        out, want = attn(*(_shard(x, 2, ctx.sp_rank) for x in (q, k, v))), _shard(ref, 2, ctx.sp_rank)
        valid = max(0, min(length - ctx.sp_rank * want.shape[1], want.shape[1]))
        errors["ulysses over ByShape"] = (out[:, :valid] - want[:, :valid]).abs().max().item()
        errors["ByShape shapes raced"] = len(attn.inner.choices())
    return errors


@pytest.fixture(scope="module")
def four_rank_errors() -> list[dict]:
    return run_on_ranks(_attention_cases, 4, timeout_s=120)


@pytest.mark.parametrize("prefix", [0, 3, "sharded text"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sequence_parallel_attention_equals_whole(four_rank_errors, layout, prefix):
    ranks = ParallelConfig(*layout).world_size
    for rank in range(ranks):
        assert four_rank_errors[rank][(layout, prefix)] < 1e-5, (rank, four_rank_errors[rank])


def test_ulysses_over_a_per_shape_race_equals_whole(four_rank_errors):
    for rank in range(2):
        assert four_rank_errors[rank]["ulysses over ByShape"] < 1e-5, four_rank_errors[rank]
        assert four_rank_errors[rank]["ByShape shapes raced"] >= 1  # the local heads' shape was raced on each rank


@pytest.mark.skipif(not torch.accelerator.is_available(), reason="needs an accelerator (GPU kernels with LSE)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_lse_matches_reference(dtype, masked):
    from gen.distributed.attention import kernel_attention_lse

    device = torch.accelerator.current_accelerator()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 77, 4, 64, device=device, dtype=dtype) for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones(2, 77, dtype=torch.bool, device=device)
        mask[0, 5:] = False
        mask[1, :] = False  # a sample with no key at all: out 0, lse -inf
    out, lse = kernel_attention_lse(q, k, v, mask)
    ref_out, ref_lse = reference_attention_lse(q, k, v, mask)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert (out.float() - ref_out.float()).abs().max() < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - ref_lse[finite]).abs().max() < tol
    assert (out.float()[~finite.any(-1)] == 0).all()
