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


def test_faster_backend_times_both_and_keeps_the_first_on_a_tie(monkeypatch):
    import time

    monkeypatch.setitem(A.BACKENDS, "slow", lambda q, k, v, m: time.sleep(0.002) or A.math_attention(q, k, v))
    cpu = torch.device("cpu")
    assert A.faster_backend("slow", "math", cpu, torch.float32, shape=(1, 8, 2, 8), iters=3) == "math"
    assert A.faster_backend("math", "slow", cpu, torch.float32, shape=(1, 8, 2, 8), iters=3) == "math"
