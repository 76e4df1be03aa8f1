"""One GEMM for a linear layer with LoRAs: y = x W^T + h U^T + bias, the low-rank update added inside the base
matmul's K loop (a Triton kernel; gen/transforms/lora.py's "kernel" layout).

`h` = x A^T is the set's down product (the scales already in A's rows), `U` the up bank. For a joined group
(gen/transforms/join.py: q, k, v (+ MLP) as one weight) the members' ups are stacked along N and each member reads
its own R columns of h: rows [bounds[i-1], bounds[i]) of the output read h[:, i R:(i + 1) R]. So the update costs
R more K steps per output tile, with none of the zero blocks that a block-diagonal up matrix (the "wide" layout)
multiplies, and no copy of x beside h. A tile never straddles two members: the configs whose BLOCK_N does not
divide every bound are pruned.

`lora_linear` is a torch custom op (`gen::lora_linear`), opaque to torch.compile; it runs on tensors of a device
Triton compiles for. `supported(...)` says whether a call can take it (else the caller keeps its cuBLAS path).
Under TRITON_INTERPRET=1 the kernel runs on CPU tensors too, which is how tests/test_lora_gemm.py checks its logic.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is optional: without Triton every LoRA layer keeps the cuBLAS layouts
    triton = None

MAX_MEMBERS = 4  # a joined group of up to four members (FLUX's single blocks: q, k, v and the MLP's first linear)
TMA = os.environ.get("GEN_LORA_GEMM_TMA") == "1"  # the TMA variant (being measured: benchmarks/lora_gemm.py)
MIN_BLOCK_N = 64  # the smallest BLOCK_N of the GPU configs: every member bound must be a multiple of it
INTERPRETED_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}  # TRITON_INTERPRET=1 (tests)


def available() -> bool:
    return triton is not None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supported(weight: torch.Tensor, bounds: tuple[int, ...] = ()) -> bool:
    """Whether `lora_linear` can run a layer with this weight (and a joined group's member bounds): Triton present
    and compiling for the weight's device (or interpreting), a 16-bit dtype, K and every bound a multiple of the
    smallest tile, at most MAX_MEMBERS members."""
    if triton is None or len(bounds) > MAX_MEMBERS - 1 or weight.ndim != 2:
        return False
    if weight.dtype not in (torch.bfloat16, torch.float16):
        return False
    if weight.device.type == "cpu" and not interpreted():
        return False
    tile = INTERPRETED_CONFIG["BLOCK_N"] if interpreted() else MIN_BLOCK_N
    return weight.shape[1] % 16 == 0 and all(b % tile == 0 for b in bounds)


if triton is not None:

    @triton.jit
    def _lora_gemm_kernel(
        x_ptr, w_ptr, h_ptr, u_ptr, b_ptr, o_ptr,
        M, N, K, R, b1, b2, b3,
        sxm, sxk, swn, swk, shm, shr, sun, sur, som, son,
        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # tiles in groups of GROUP_M rows of tiles, so that neighbouring programs share W tiles in L2
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm_in = rm % M  # rows and columns past the edge read a valid row; their results are not stored
        rn_in = rn % N
        rk = tl.arange(0, BLOCK_K)

        # the base product x W^T
        xp = x_ptr + rm_in[:, None] * sxm + rk[None, :] * sxk
        wp = w_ptr + rn_in[None, :] * swn + rk[:, None] * swk  # a (BLOCK_K, BLOCK_N) tile of W^T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(xp)
                b = tl.load(wp)
            else:
                left = K - k0
                a = tl.load(xp, mask=rk[None, :] < left, other=0.0)
                b = tl.load(wp, mask=rk[:, None] < left, other=0.0)
            acc = tl.dot(a, b, acc)
            xp += BLOCK_K * sxk
            wp += BLOCK_K * swk

        # the LoRA update h[:, member's R columns] U^T, in the same accumulator
        n0 = pid_n * BLOCK_N
        member = (n0 >= b1).to(tl.int32) + (n0 >= b2).to(tl.int32) + (n0 >= b3).to(tl.int32)
        rr = tl.arange(0, BLOCK_R)
        hp = h_ptr + rm_in[:, None] * shm + (member * R + rr)[None, :] * shr
        up = u_ptr + rn_in[None, :] * sun + rr[:, None] * sur
        for r0 in range(0, R, BLOCK_R):
            left = R - r0
            a = tl.load(hp, mask=rr[None, :] < left, other=0.0)
            b = tl.load(up, mask=rr[:, None] < left, other=0.0)
            acc = tl.dot(a, b, acc)
            hp += BLOCK_R * shr
            up += BLOCK_R * sur

        if HAS_BIAS:
            acc += tl.load(b_ptr + rn_in).to(tl.float32)[None, :]
        op = o_ptr + rm[:, None] * som + rn[None, :] * son
        tl.store(op, acc.to(o_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])

    @triton.jit
    def _lora_gemm_tma_kernel(
        x_ptr, w_ptr, h_ptr, u_ptr, b_ptr, o_ptr,
        M, N, K, R, HR, b1, b2, b3,
        HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """The same GEMM with TMA tensor descriptors (Hopper and later; contiguous rows, R a multiple of BLOCK_R)."""
        x_d = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_d = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        o_d = tl.make_tensor_descriptor(o_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        off_m = (first_m + (pid % per_group) % group_m) * BLOCK_M
        off_n = ((pid % per_group) // group_m) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            acc = tl.dot(x_d.load([off_m, k0]), w_d.load([off_n, k0]).T, acc)
        if HAS_LORA:
            h_d = tl.make_tensor_descriptor(h_ptr, shape=[M, HR], strides=[HR, 1], block_shape=[BLOCK_M, BLOCK_R])
            u_d = tl.make_tensor_descriptor(u_ptr, shape=[N, R], strides=[R, 1], block_shape=[BLOCK_N, BLOCK_R])
            member = (off_n >= b1).to(tl.int32) + (off_n >= b2).to(tl.int32) + (off_n >= b3).to(tl.int32)
            for r0 in range(0, R, BLOCK_R):
                acc = tl.dot(h_d.load([off_m, member * R + r0]), u_d.load([off_n, r0]).T, acc)
        if HAS_BIAS:
            rn = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        o_d.store([off_m, off_n], acc.to(o_ptr.dtype.element_ty))

    # Hopper-class configs (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps); the autotuner picks per (M, N, K, R)
    _CONFIGS = [
        (128, 256, 64, 3, 8),
        (128, 256, 64, 4, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 128, 64, 4, 8),
        (64, 256, 64, 4, 4),
        (128, 64, 64, 4, 4),
    ]

    def _prune(configs, named_args, **kwargs):
        """Drop the configs whose BLOCK_N would put a tile across a member bound."""
        bounds = [named_args[b] for b in ("b1", "b2", "b3") if named_args[b] < named_args["N"]]
        return [c for c in configs if all(b % c.kwargs["BLOCK_N"] == 0 for b in bounds)]

    _autotuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
                 for m, n, k, s, w in _CONFIGS],
        key=["M", "N", "K", "R", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune},
    )(_lora_gemm_kernel)

    _autotuned_tma = triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
                 for m, n, k, s, w in _CONFIGS],
        key=["M", "N", "K", "R", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune},
    )(_lora_gemm_tma_kernel)

    _allocator_set = False


def _launch_tma(x2, weight, h2, up, bias, bounds, out):
    """The TMA variant (benchmarks/lora_gemm.py compares it): descriptors made in the kernel, whose scratch memory
    Triton takes from an allocator on the tensors' device."""
    global _allocator_set
    if not _allocator_set:
        device = x2.device
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))
        _allocator_set = True
    M, K = x2.shape
    N, R = weight.shape[0], up.shape[1]
    b = list(bounds) + [N] * (MAX_MEMBERS - 1 - len(bounds))
    x2, h2, up = x2.contiguous(), h2.contiguous(), up.contiguous()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _autotuned_tma[grid](x2, weight, h2, up, bias if bias is not None else weight, out, M, N, K, R, h2.shape[1], *b,
                         HAS_BIAS=bias is not None, HAS_LORA=R > 0, BLOCK_R=max(16, min(64, R)))


def _launch(x2, weight, h2, up, bias, bounds, out, config):
    M, K = x2.shape
    N, R = weight.shape[0], up.shape[1]
    b = list(bounds) + [N] * (MAX_MEMBERS - 1 - len(bounds))
    args = (x2, weight, h2, up, bias if bias is not None else weight, out, M, N, K, R, *b,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), h2.stride(0), h2.stride(1),
            up.stride(0), up.stride(1), out.stride(0), out.stride(1))
    flags = dict(HAS_BIAS=bias is not None, EVEN_K=K % 64 == 0 if config is None else K % config["BLOCK_K"] == 0,
                 BLOCK_R=max(16, min(64, triton.next_power_of_2(R))))
    if config is None:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _autotuned[grid](*args, **flags)
    else:
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
        _lora_gemm_kernel[grid](*args, **flags, GROUP_M=config.get("GROUP_M", 8), BLOCK_M=config["BLOCK_M"],
                                BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
                                num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))


def lora_linear_reference(x, weight, h, up, bias=None, bounds: tuple[int, ...] = ()) -> torch.Tensor:
    """The same function from torch ops (fp32 accumulate): what the kernel is checked against."""
    n, r = weight.shape[0], up.shape[1]
    edges = [0, *bounds, n]
    upd = torch.cat([h[..., i * r:(i + 1) * r].float() @ up[edges[i]:edges[i + 1]].float().t()
                     for i in range(len(edges) - 1)], dim=-1)
    y = x.float() @ weight.float().t() + upd
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@torch.library.custom_op("gen::lora_linear", mutates_args=())
def _lora_linear_op(x: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, up: torch.Tensor,
                    bias: torch.Tensor | None, bounds: list[int]) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    h2 = h.reshape(x2.shape[0], h.shape[-1])
    out = torch.empty(x2.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
    if x2.shape[0] and TMA and up.shape[1] % 16 == 0 and not interpreted():
        _launch_tma(x2, weight, h2, up, bias, tuple(bounds), out)
    elif x2.shape[0]:
        _launch(x2, weight, h2, up, bias, tuple(bounds), out, _fixed_config())
    return out.reshape(*x.shape[:-1], weight.shape[0])


@_lora_linear_op.register_fake
def _(x, weight, h, up, bias, bounds):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@functools.cache
def _fixed_config() -> dict | None:
    """Interpreting: one small config (the autotuner would time every config in Python). Else None (autotuned)."""
    return dict(INTERPRETED_CONFIG) if interpreted() else None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, up: torch.Tensor,
                bias: torch.Tensor | None = None, bounds: tuple[int, ...] = ()) -> torch.Tensor:
    """x (..., K) W (N, K)^T + h (..., G R) @ up (N, R)^T per member + bias: one kernel. `bounds`: a joined group's
    member starts along N after the first (empty for one layer); member i reads h's columns [i R, (i + 1) R)."""
    return _lora_linear_op(x, weight, h, up, bias, list(bounds))
