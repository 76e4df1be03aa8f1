"""Joined q/k/v (+MLP) projections (gen/transforms/join.py): same outputs, same parameter names, values and memory."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from torch import nn

from benchmarks.dit_step import build
from gen.transforms.join import join_linears, join_projections
from gen.models.layers import project

GROUPS = {"flux": 2 * 1 + 1, "wan": 2, "qwen": 2}  # tiny configs: one double + one single FLUX block, one block else


@pytest.mark.parametrize("name", ["flux", "wan", "qwen"])
def test_joined_model_matches_diffusers_and_keeps_its_state(name):
    torch.manual_seed(0)
    ref, ours, inputs, _ = build(name, tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        for p in ref.parameters():  # no trivial init left (norm weights start at 1)
            p.add_(0.02 * torch.randn_like(p))
        expected = ref(**inputs, return_dict=False)[0]
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        n_params = sum(p.numel() for p in ours.parameters())

        assert join_projections(ours) == GROUPS[name]
        assert join_projections(ours) == 0  # joining twice changes nothing
        out = ours(**inputs)

    assert rel_err(out, expected) <= 1e-5
    after = ours.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert sum(p.numel() for p in ours.parameters()) == n_params
    for module in ours.modules():
        if hasattr(module, "joined_sizes"):
            storage = module.joined_weight.untyped_storage().data_ptr()
            assert module.weight.untyped_storage().data_ptr() == storage  # a view, not a copy


def test_join_linears_shares_memory_and_updates():
    torch.manual_seed(0)
    layers = [nn.Linear(8, 4), nn.Linear(8, 6), nn.Linear(8, 2)]
    x = torch.randn(3, 8)
    expected = [layer(x) for layer in layers]
    join_linears(layers)
    joined = project(x, *layers)
    assert [t.shape[-1] for t in joined] == [4, 6, 2]
    for got, want in zip(joined, expected):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # an in-place update of a layer's weight reaches the joined matmul
        layers[1].weight.mul_(2)
    torch.testing.assert_close(project(x, *layers)[1], 2 * (expected[1] - layers[1].bias) + layers[1].bias)


def test_join_errors_name_the_problem():
    with pytest.raises(ValueError, match="different input sizes"):
        join_linears([nn.Linear(8, 4), nn.Linear(6, 4)])
    with pytest.raises(ValueError, match="only some have a bias"):
        join_linears([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)])
    layers = [nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4)]
    join_linears(layers)
    with pytest.raises(RuntimeError, match="group of 3 called as a group of 2"):
        project(torch.randn(1, 8), *layers[:2])
