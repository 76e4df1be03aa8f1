"""Every attention backend that runs on this machine agrees with the math reference."""
from __future__ import annotations

import pytest
import torch

from gen.models import attention as A


@pytest.mark.parametrize("name", sorted(A.BACKENDS))
def test_backends_agree_or_are_unavailable(name):
    device = torch.device("cpu")
    ok = A.backend_agrees(name, device, torch.float32, head_dim=32)
    if name in {"sdpa", "math"}:  # these always have CPU kernels (with masks too)
        assert ok


def test_masked_keys_are_ignored():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 8, generator=g) for _ in range(3))
    mask = torch.tensor([[True] * 4 + [False] * 2])
    full = A.attention(q, k[:, :4], v[:, :4])
    masked = A.attention(q, k, v, mask)
    assert torch.allclose(full, masked, atol=1e-6)


def test_selection_and_restore():
    cpu = torch.device("cpu")
    before = A.get_attention_backend()
    assert A.select_attention_backend(cpu, torch.float32) == "sdpa"
    assert A.select_attention_backend(cpu, torch.float32, "math") == "math"
    assert A.get_attention_backend() is A.math_attention
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        A.select_attention_backend(cpu, torch.float32, "nope")
    A.set_attention_backend(before)


def test_fa4_is_optional_and_never_chosen_where_it_cannot_run():
    """Without flash-attn-4 (CI) or on the CPU, fa4 reports itself unavailable and auto-selection skips it."""
    assert not A.backend_agrees("fa4", torch.device("cpu"), torch.float32, head_dim=32)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="CUDA devices only"):
        A.fa4_attention(q, q, q)


def test_fa4_wrapper_is_one_opaque_op_and_masks_go_to_cudnn(monkeypatch):
    """The custom-op wrapper around FA4's flash_attn_func (a stand-in here: the real one needs a Hopper GPU) returns
    its output, is traced by torch.compile as one op (fake kernel), and a key mask never reaches FA4."""
    import sys
    import types

    calls = []

    def flash_attn_func(q, k, v):
        calls.append(q.shape)
        return A.math_attention(q, k, v), None

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setattr(A, "_FA4_OP", None)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 8, generator=g) for _ in range(3))
    op = A._fa4_op()
    assert torch.allclose(op(q, k, v), A.math_attention(q, k, v), atol=1e-6)
    compiled = torch.compile(lambda a, b, c: op(a, b, c) * 2, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(q, k, v), 2 * A.math_attention(q, k, v), atol=1e-6)
    n = len(calls)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    out = A.fa4_attention(q, k, v, mask)
    assert len(calls) == n  # the masked call went to cuDNN / SDPA
    assert torch.allclose(out, A.attention(q, k[:, :4], v[:, :4]), atol=1e-6)


def test_by_shape_races_once_per_shape_and_keeps_the_first_on_a_tie(monkeypatch):
    """ByShape times its candidates on a shape's first call and then calls only the winner there; another shape is
    raced on its own; a masked call goes to the first candidate; under torch.compile it is one op (fake kernel)."""
    import time

    calls = {"slow": 0, "long-slow": 0}

    def slow(q, k, v, m):  # slow everywhere
        calls["slow"] += 1
        time.sleep(0.003)
        return A.math_attention(q, k, v, m)

    def long_slow(q, k, v, m):  # slow only on long sequences
        calls["long-slow"] += 1
        if q.shape[1] > 8:
            time.sleep(0.009)
        return A.math_attention(q, k, v, m)

    monkeypatch.setitem(A.BACKENDS, "slow", slow)
    monkeypatch.setitem(A.BACKENDS, "long-slow", long_slow)
    monkeypatch.setattr(A, "_SHAPE_CHOICE", {})
    g = torch.Generator().manual_seed(0)
    short = [torch.randn(1, 8, 2, 16, generator=g) for _ in range(3)]
    long = [torch.randn(1, 24, 2, 16, generator=g) for _ in range(3)]

    backend = A.ByShape(("slow", "long-slow"))
    assert backend.name == "slow|long-slow by shape"
    out = backend(*short)
    assert torch.allclose(out, A.math_attention(*short), atol=1e-6) and out.is_contiguous()
    assert backend(*long).shape == (1, 24, 2, 16)
    assert backend.choices() == {((1, 8, 2, 16),) * 3: "long-slow", ((1, 24, 2, 16),) * 3: "slow"}
    before = dict(calls)
    backend(*short)
    backend(*long)
    assert calls == {"slow": before["slow"] + 1, "long-slow": before["long-slow"] + 1}  # no new race

    mask = torch.tensor([[True] * 6 + [False] * 2])
    n = calls["slow"]
    assert torch.allclose(backend(*short, mask), A.math_attention(*short, mask), atol=1e-6)
    assert calls["slow"] == n + 1  # the first candidate takes the mask

    compiled = torch.compile(lambda a, b, c: backend(a, b, c) * 2, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(*long), 2 * A.math_attention(*long), atol=1e-6)

    def no_small_heads(q, k, v, m):  # as FA4 on SM90: head dims it has no kernel for are refused
        assert q.shape[-1] % 8 == 0, f"head_dim {q.shape[-1]} is not supported"
        return A.math_attention(q, k, v, m)

    monkeypatch.setitem(A.BACKENDS, "picky", no_small_heads)
    odd = [torch.randn(1, 8, 2, 12, generator=g) for _ in range(3)]
    picky = A.ByShape(("slow", "picky"))
    assert torch.allclose(picky(*odd), A.math_attention(*odd), atol=1e-6)
    assert picky.choices()[((1, 8, 2, 12),) * 3] == "slow"  # left out where it cannot run, not an error
    assert picky(*short).shape == short[0].shape and picky.choices()[((1, 8, 2, 16),) * 3] == "picky"
    with pytest.raises(AssertionError):  # the first candidate is the installed backend: its failure is not hidden
        A.ByShape(("picky", "slow"))(*[torch.randn(1, 4, 2, 12, generator=g) for _ in range(3)])

    tie = A.ByShape(("math", "sdpa"))
    monkeypatch.setattr(time, "perf_counter", lambda: 0.0)
    assert A.fastest_for_shape(tie.names, *short) == "math"  # equal times: the first name
    with pytest.raises(ValueError, match="two or more known backends"):
        A.ByShape(("math", "nope"))


def test_auto_races_fa4_with_the_preferred_kernel_where_it_agrees(monkeypatch):
    """On an accelerator with flash-attn-4 installed and agreeing, auto installs the per-shape race between the
    preferred SDPA kernel and FA4 (the agreement checks are stood in for: no GPU here)."""
    monkeypatch.setattr(A, "backend_agrees", lambda name, device, dtype: name in {"cudnn", "fa4"})
    before = A.get_attention_backend()
    try:
        name = A.select_attention_backend(torch.device("cuda"), torch.bfloat16)
        assert name == "cudnn|fa4 by shape"
        assert A.get_attention_backend().names == ("cudnn", "fa4")
        monkeypatch.setattr(A, "backend_agrees", lambda name, device, dtype: name == "cudnn")
        assert A.select_attention_backend(torch.device("cuda"), torch.bfloat16) == "cudnn"
        assert A.get_attention_backend() is A.cudnn_attention
    finally:
        A.set_attention_backend(before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_by_shape_on_the_gpu_agrees_with_math_for_each_choice():
    """On a GPU with flash-attn-4 installed: the race between cuDNN and FA4 gives math attention's output (bf16
    tolerance) at two shapes, whichever kernel won each, and compiled the same as eager."""
    pytest.importorskip("flash_attn.cute")
    device = torch.device("cuda")
    backend = A.ByShape(("cudnn", "fa4"))
    g = torch.Generator("cpu").manual_seed(0)
    for shape in ((1, 1024, 8, 128), (2, 4128, 24, 128)):
        q, k, v = (torch.randn(*shape, generator=g).to(device, torch.bfloat16) for _ in range(3))
        ref = A.math_attention(q.float(), k.float(), v.float())
        out = backend(q, k, v)
        assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2
        compiled = torch.compile(lambda a, b, c: backend(a, b, c), fullgraph=True)
        assert torch.equal(compiled(q, k, v), out)
    assert set(backend.choices().values()) <= {"cudnn", "fa4"} and len(backend.choices()) == 2
