"""Sequence-parallel attention: Ulysses all-to-all, Ring attention with a log-sum-exp merge, and the two combined.

Not the sharding of model inputs (gen/distributed/apply.py). The joint layout is [prefix, sequence]: `prefix`
tokens (the text of FLUX / Qwen-Image joint attention) are held whole by every rank and are never sent around;
the sequence is sharded, shard s on sp rank s, padded at its end (padding keys are cut off, never attended). Keys
may lead with more replicated tokens than the queries hold: context attended to without being computed (the cached
prompt and condition of Qwen-Image 2.1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from gen.distributed.groups import ParallelContext
from gen.models.attention import AttentionFn

# Device types where the log-sum-exp comes from the small reference attention below; elsewhere from an SDPA kernel.
REFERENCE_DEVICE_TYPES = ("cpu",)
_NEG_INF = float("-inf")


# ---------------------------------------------------------------- attention that also returns log-sum-exp


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Lq, H, D), k/v (B, Lk, H, D), mask (B, Lk) bool (True = attend) -> out (B, Lq, H, D) in q's dtype,
    lse (B, Lq, H) fp32. A query with no key to attend gets out 0 and lse -inf."""
    if q.device.type in REFERENCE_DEVICE_TYPES:
        return reference_attention_lse(q, k, v, mask)
    return kernel_attention_lse(q, k, v, mask)


def reference_attention_lse(q, k, v, mask=None):
    """Plain fp32 math, the definition the merge relies on."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5  # (B, H, Lq, Lk)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :].bool(), _NEG_INF)
    m = s.amax(dim=-1, keepdim=True)
    m = m.masked_fill(m == _NEG_INF, 0.0)  # rows with no key: keep exp() finite
    p = torch.exp(s - m)
    total = p.sum(dim=-1, keepdim=True)  # (B, H, Lq, 1)
    out = torch.einsum("bhqk,bkhd->bqhd", p / total.clamp_min(1e-30), v.float())
    lse = (m + total.log()).squeeze(-1).transpose(1, 2)  # (B, Lq, H)
    return out.to(q.dtype), lse.contiguous()


def kernel_attention_lse(q, k, v, mask=None):
    """An accelerator SDPA kernel that returns the log-sum-exp: flash (fp16/bf16, no mask) or memory-efficient."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
    lq = q.shape[1]
    if mask is None and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False)[:2]
    else:
        bias = None
        if mask is not None:
            b, lk = mask.shape
            padded = -(-lk // 16) * 16  # the kernel wants the bias rows 16-aligned: allocate padded, use a view
            bias = torch.zeros(b, 1, 1, padded, dtype=q.dtype, device=q.device)[..., :lk]
            bias.masked_fill_(~mask[:, None, None, :].bool(), _NEG_INF)
            bias = bias.expand(b, q.shape[2], lq, lk)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, bias, True)[:2]
        lse = lse[..., :lq]
        if mask is not None:  # a sample with no key to attend: the kernel's lse is finite, make it -inf, out 0
            empty = ~mask.bool().any(dim=-1)[:, None, None]  # (B, 1, 1)
            lse = lse.masked_fill(empty, _NEG_INF)
            out = out.nan_to_num(0.0).masked_fill(empty[..., None], 0.0)
    return out.transpose(1, 2), lse[..., :lq].transpose(1, 2).float().contiguous()


def merge(acc: tuple[torch.Tensor, torch.Tensor] | None, part: tuple[torch.Tensor, torch.Tensor]):
    """Online-softmax merge of two partial attentions over disjoint key sets: (out fp32, lse) pairs."""
    out, lse = part[0].float(), part[1]
    if acc is None:
        return out, lse
    a_out, a_lse = acc
    m = torch.maximum(a_lse, lse)
    m = m.masked_fill(m == _NEG_INF, 0.0)
    wa, wb = torch.exp(a_lse - m), torch.exp(lse - m)  # (B, Lq, H)
    total = wa + wb
    merged = (a_out * wa[..., None] + out * wb[..., None]) / total.clamp_min(1e-30)[..., None]
    return merged, m + total.log()


# ---------------------------------------------------------------- Ulysses


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, Ls, H, D) sequence shard -> (B, n * Ls, H / n, D): the group's whole sequence for this rank's heads."""
    n = dist.get_world_size(group)
    b, ls, h, d = x.shape
    send = x.reshape(b, ls, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()  # (n, B, Ls, H/n, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i] = rank i's shard, our heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, n * ls, h // n, d)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, n * Ls, H / n, D) -> (B, Ls, H, D): the inverse of `seq_to_heads`."""
    n = dist.get_world_size(group)
    b, l, h, d = x.shape
    send = x.reshape(b, n, l // n, h, d).transpose(0, 1).contiguous()  # (n, B, Ls, H/n, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i] = our shard, rank i's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, l // n, n * h, d)


def seq_to_heads_async(x: torch.Tensor, group) -> Callable[[], torch.Tensor]:
    """`seq_to_heads` started now (a functional all-to-all, in flight while other work runs); the returned function
    finishes it (waits only when its result is first used)."""
    n = dist.get_world_size(group)
    b, ls, h, d = x.shape
    send = x.reshape(b, ls, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = funcol.all_to_all_single(send.flatten(0, 1), None, None, group).view_as(send)
    return lambda: recv.permute(1, 0, 2, 3, 4).reshape(b, n * ls, h // n, d)


def heads_to_seq_async(x: torch.Tensor, group) -> Callable[[], torch.Tensor]:
    """`heads_to_seq` started now; the returned function finishes it."""
    n = dist.get_world_size(group)
    b, l, h, d = x.shape
    send = x.reshape(b, n, l // n, h, d).transpose(0, 1).contiguous()
    recv = funcol.all_to_all_single(send.flatten(0, 1), None, None, group).view_as(send)
    return lambda: recv.permute(1, 2, 0, 3, 4).reshape(b, l // n, n * h, d)


def gather_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, L, H / n, D) on each rank -> (B, L, H, D) on every rank (heads in group-rank order)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=2)


def _leading(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[t, x] along the sequence; x itself when there is no replicated text t (no copy of the whole sequence)."""
    return x if t.shape[1] == 0 else torch.cat([t, x], dim=1)


def _joint_keys(tk, tv, tmask, xk, xv, n_valid: int):
    """Keys, values and key mask of a joint attention: the replicated text's (tk, tv, its mask) and the gathered
    sequence's first `n_valid` (the rest is padding). Without replicated text: views of xk, xv and no mask."""
    if tk.shape[1] == 0:
        return xk[:, :n_valid], xv[:, :n_valid], None
    kmask = None
    if tmask is not None:
        kmask = torch.cat([tmask, tmask.new_ones(tmask.shape[0], n_valid)], dim=1)
    return torch.cat([tk, xk[:, :n_valid]], dim=1), torch.cat([tv, xv[:, :n_valid]], dim=1), kmask


# ---------------------------------------------------------------- Ring


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ParallelContext, valid_len: int,
                   prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
                   n_prefix_q: int = 0) -> torch.Tensor:
    """Attention of local queries q (B, Lq, h, D) over every ring rank's key block k/v (B, Lb, h, D).

    Block j covers sequence positions [j * Lb, (j + 1) * Lb); keys at or past `valid_len` are padding and cut off.
    `prefix` = (k, v, mask) keys every ring rank holds, attended once. The first `n_prefix_q` query rows are
    replicated on every ring rank: their partial results are merged in block order, so all ranks agree bit for bit.
    """
    group, ranks, me = ctx.ring_group, ctx.ring_ranks, ctx.ring_rank
    n, lb, p = len(ranks), k.shape[1], n_prefix_q
    rows_acc = None  # the sharded query rows [p:], merged online
    prefix_part = attention_lse(q, *prefix) if prefix is not None and prefix[0].shape[1] else None
    if prefix_part is not None:
        rows_acc = merge(None, (prefix_part[0][:, p:], prefix_part[1][:, p:]))
    replicated = {}  # block index -> partial result of the replicated rows [:p]
    kv = torch.cat([k, v], dim=0).contiguous()  # (2B, Lb, h, D): one message per step
    for step in range(n):
        j = (me - step) % n
        pending = None
        if step < n - 1:
            incoming = torch.empty_like(kv)
            pending = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, kv, ranks[(me + 1) % n], group),
                dist.P2POp(dist.irecv, incoming, ranks[(me - 1) % n], group),
            ])
        n_valid = min(max(valid_len - j * lb, 0), lb)
        if n_valid:
            kb, vb = kv[:, :n_valid].chunk(2, dim=0)
            out, lse = attention_lse(q, kb, vb)
            rows_acc = merge(rows_acc, (out[:, p:], lse[:, p:]))
            if p:
                replicated[j] = (out[:, :p], lse[:, :p])
        if pending is not None:
            for req in pending:
                req.wait()
            kv = incoming
    assert rows_acc is not None, "no key to attend: valid_len is 0"
    out = rows_acc[0]
    if p:
        acc = None if prefix_part is None else merge(None, (prefix_part[0][:, :p], prefix_part[1][:, :p]))
        for j in sorted(replicated):
            acc = merge(acc, replicated[j])
        out = torch.cat([acc[0], out], dim=1)
    return out.to(q.dtype)


# ---------------------------------------------------------------- the backend models call


@dataclass
class CallState:
    """What the attention backend must know about the model call in progress (set by apply.py's wrapper)."""

    prefix_len: int = 0  # replicated tokens leading the joint sequence (text in FLUX / Qwen-Image)
    full_len: int | None = None  # the sharded sequence's true length (set by the first split)
    local_depth: int = 0  # > 0 inside modules whose attention stays on the rank (cross-attention to full text)
    # text tokens sharded with the sequence (ShardPlan.text_inputs): each rank's shard leads with its piece of them, so
    # the sequence the group holds is this much longer than full_len (its padding still only at the very end)
    sharded_text: int = 0


class SequenceParallelAttention:
    """An `AttentionFn` that runs each attention over the whole sequence held across the sp group.

    Inside a sharded model call: Ulysses all-to-all (heads split over the Ulysses group), then Ring over the Ring
    group (or, with ring_degree 1, one call to `inner`, the backend that was active before). Elsewhere (no call in
    progress, or a local module such as cross-attention) it is just `inner`.
    """

    shards_sequence = True  # gen.models.attention: masked calls are not split by rows around it

    def __init__(self, ctx: ParallelContext, inner: AttentionFn):
        self.ctx, self.inner = ctx, inner
        self.state: CallState | None = None

    def __call__(self, q, k, v, mask=None):
        st = self.state
        if st is None or st.local_depth or st.full_len is None:
            return self.inner(q, k, v, mask)
        cfg, p = self.ctx.config, st.prefix_len
        # keys beyond the queries lead the keys: replicated context no query stands for (Qwen-Image 2.1's prefix)
        pk = p + k.shape[1] - q.shape[1]
        assert pk >= p, f"joint self-attention (plus leading keys) expected, got Lq={q.shape[1]} Lk={k.shape[1]}"
        tq, tk, tv = q[:, :p], k[:, :pk], v[:, :pk]  # (B, P, H, D), (B, Pk, H, D), replicated
        xq, xk, xv = q[:, p:], k[:, pk:], v[:, pk:]  # (B, Ls, H, D), this rank's shard
        tmask = None if mask is None else mask[:, :pk].bool()
        u = cfg.ulysses_degree
        if u > 1 and cfg.ring_degree == 1 and cfg.ulysses_chunks > 1:
            return self._ulysses_chunked(tq, tk, tv, tmask, xq, xk, xv, p)
        if u > 1:
            heads = q.shape[2]
            cfg.check_heads(heads)
            b = q.shape[0]
            xq, xk, xv = seq_to_heads(torch.cat([xq, xk, xv], dim=0), self.ctx.ulysses_group).split(b, dim=0)
            hs = slice(self.ctx.ulysses_rank * heads // u, (self.ctx.ulysses_rank + 1) * heads // u)
            tq, tk, tv = tq[:, :, hs], tk[:, :, hs], tv[:, :, hs]
        block = xq.shape[1]  # (B, Lb, h, D): ring block of sequence positions [ring_rank * Lb, ...)
        if cfg.ring_degree == 1:
            n_valid = min(st.full_len + st.sharded_text, block)
            keys, values, kmask = _joint_keys(tk, tv, tmask, xk, xv, n_valid)
            out = self.inner(_leading(tq, xq), keys, values, kmask)
        else:
            prefix = (tk, tv, tmask) if pk else None
            out = ring_attention(torch.cat([tq, xq], dim=1), xk, xv, self.ctx, st.full_len + st.sharded_text, prefix,
                                 n_prefix_q=p)
        t_out, x_out = out[:, :p], out[:, p:]
        if u > 1:
            x_out = heads_to_seq(x_out, self.ctx.ulysses_group)
            if p:
                t_out = gather_heads(t_out, self.ctx.ulysses_group)
        return torch.cat([t_out, x_out], dim=1) if p else x_out

    def _ulysses_chunked(self, tq, tk, tv, tmask, xq, xk, xv, p: int) -> torch.Tensor:
        """Ulysses with the heads in `ulysses_chunks` groups, pipelined: every group's all-to-all of q/k/v starts at
        once; each group's attention runs when its own has arrived (the later groups' still in flight), and its
        output's all-to-all starts as soon as it is done, behind the next group's attention. The same result as one
        group: heads are independent."""
        cfg, group, me = self.ctx.config, self.ctx.ulysses_group, self.ctx.ulysses_rank
        u, chunks, st = cfg.ulysses_degree, cfg.ulysses_chunks, self.state
        heads, b = xq.shape[2], xq.shape[0]
        cfg.check_heads(heads)
        hc = heads // chunks  # heads a group; this rank attends hc / u of each
        xs = torch.cat([xq, xk, xv], dim=0)
        arriving = [seq_to_heads_async(xs[:, :, i * hc:(i + 1) * hc], group) for i in range(chunks)]
        leaving, texts = [], []
        for i in range(chunks):
            gq, gk, gv = arriving[i]().split(b, dim=0)
            hs = slice(i * hc + me * hc // u, i * hc + (me + 1) * hc // u)  # this rank's heads of group i
            n_valid = min(st.full_len + st.sharded_text, gq.shape[1])
            keys, values, kmask = _joint_keys(tk[:, :, hs], tv[:, :, hs], tmask, gk, gv, n_valid)
            out = self.inner(_leading(tq[:, :, hs], gq), keys, values, kmask)
            leaving.append(heads_to_seq_async(out[:, p:], group))
            if p:
                texts.append(gather_heads(out[:, :p], group))
        x_out = torch.cat([finish() for finish in leaving], dim=2)  # head groups back in order
        return torch.cat([torch.cat(texts, dim=2), x_out], dim=1) if p else x_out

