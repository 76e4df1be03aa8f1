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
