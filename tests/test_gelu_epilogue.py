"""The GELU epilogue (gen/transforms/epilogue.py): which layers it marks, that it changes nothing off CUDA or for
LoRA layers, FLUX's single-block split path against the concatenated one, and on a CUDA device (skipped elsewhere)
that the fused calls equal the separate ones in fp32."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gen.models.layers import FeedForward, GeluProj
from gen.transforms.epilogue import fuse_gelu_epilogues, unfuse_gelu_epilogues


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"tanh": FeedForward(8, 32), "erf": FeedForward(8, 32, approximate="none"),
                          "plain": nn.Linear(8, 8)})


def test_marks_only_tanh_feed_forwards_and_undo_clears():
    m = model()
    assert fuse_gelu_epilogues(m) == 1
    assert m["tanh"].net[0].gelu_epilogue and not m["erf"].net[0].gelu_epilogue
    unfuse_gelu_epilogues(m)
    assert not any("gelu_epilogue" in x.__dict__ for x in m.modules())


def test_cpu_output_unchanged():
    m, x = model(), torch.randn(2, 5, 8)
    before = m["tanh"](x)
    fuse_gelu_epilogues(m)
    assert torch.equal(m["tanh"](x), before)


def test_falls_back_when_the_linear_is_not_plain():
    """A LoRA (or FP8) layer is a subclass / another class: the fused call would skip its forward."""
    class Adapted(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    g = GeluProj(8, 16)
    fuse_gelu_epilogues(g)
    g.proj.__class__ = Adapted
    x = torch.randn(3, 8)
    assert torch.equal(g(x), F.gelu(F.linear(x, g.proj.weight, g.proj.bias) + 1.0, approximate="tanh"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused call is CUDA's")
def test_cuda_fused_equals_separate_in_fp32():
    from gen.models.flux import FluxSingleBlock, rope_from_ids

    g = GeluProj(64, 256).cuda()
    x = torch.randn(4, 33, 64, device="cuda")
    ref = F.gelu(g.proj(x), approximate="tanh")
    fuse_gelu_epilogues(g)
    assert (g(x) - ref).norm() / ref.norm() < 1e-5
    blk = FluxSingleBlock(dim=64, heads=2, head_dim=32).cuda()
    x, temb = torch.randn(2, 10, 64, device="cuda"), torch.randn(2, 64, device="cuda")
    ids = torch.stack([torch.zeros(10), torch.arange(10.0), torch.zeros(10)], dim=-1).cuda()
    rope = rope_from_ids(ids, (8, 12, 12))
    ref = blk(x, temb, rope)
    fuse_gelu_epilogues(blk)
    assert (blk(x, temb, rope) - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("joined", [False, True])
def test_flux_single_block_split_path_equals_the_concatenated_one(joined):
    """FluxSingleBlock.mlp_in_epilogue (taken on CUDA) against the concatenated path, fp32 on the CPU."""
    from gen.models.flux import FluxSingleBlock, modulate, rope_from_ids
    from gen.transforms.join import join_projections

    torch.manual_seed(0)
    blk = FluxSingleBlock(dim=32, heads=2, head_dim=16)
    for p in blk.parameters():
        p.data.normal_(0, 0.2)
    if joined:
        join_projections(blk)
    x, temb = torch.randn(2, 10, 32), torch.randn(2, 32)
    ids = torch.stack([torch.zeros(10), torch.arange(10.0), torch.zeros(10)], dim=-1)
    rope = rope_from_ids(ids, (4, 6, 6))
    ref = blk(x, temb, rope)
    shift, scale, gate = blk.norm(temb)
    out = x + gate[:, None] * blk.mlp_in_epilogue(modulate(x, shift, scale), rope)
    assert (out - ref).norm() / ref.norm() < 1e-6
    assert fuse_gelu_epilogues(blk) == 1 and blk.gelu_epilogue
