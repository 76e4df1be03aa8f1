"""q/k RMSNorm + RoPE as one op (gen/transforms/norm_rope.py): its plain-ops path is the models' own arithmetic for
both RMSNorm kinds, bit for bit; the op's shapes under torch.compile; which norms the transform marks; and on a CUDA
device (skipped elsewhere) the Triton kernel against the plain ops, on strided views, several parts and both kinds."""
import pytest
import torch
from torch import nn

from gen.models.flux import JointAttention as FluxJoint, SelfAttention, rope_from_ids
from gen.models.layers import RMSNorm, apply_rope, norm_rope
from gen.models.qwen_image import JointAttention as QwenJoint
from gen.transforms.norm_rope import fuse_norm_rope, reference, unfuse_norm_rope


def parts(device="cpu", dtype=torch.bfloat16, lengths=(5, 11), heads=3, d=32, batch=2):
    """Views of a joined q/k/v output, as the attentions read them, with their norms and angle tables."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate(lengths):
        qkv = torch.randn(batch, n, 3 * heads * d, generator=g).to(device, dtype)
        x = qkv[..., heads * d:2 * heads * d].unflatten(-1, (heads, d))  # the k slice: strided rows
        norm = (nn.RMSNorm(d, eps=1e-6) if i % 2 == 0 else RMSNorm(d)).to(device, dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(d, generator=g) + 0.5)
        angle = torch.rand(n, d // 2, generator=g) * 6
        out.append((norm, x, angle.cos().to(device), angle.sin().to(device)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_path_is_the_models_arithmetic(dtype):
    for norm, x, cos, sin in parts(dtype=dtype):
        want = apply_rope(norm(x), cos[None, :, None], sin[None, :, None])
        got = reference([x], [norm.weight], [cos], [sin], 1e-6, isinstance(norm, nn.RMSNorm))
        assert torch.equal(got, want)


def test_norm_rope_concatenates_the_parts_and_the_op_traces():
    (n1, x1, c1, s1), (n2, x2, c2, s2) = parts(dtype=torch.float32)
    want = torch.cat([apply_rope(n1(x1), c1[None, :, None], s1[None, :, None]),
                      apply_rope(n2(x2), c2[None, :, None], s2[None, :, None])], dim=1)
    assert torch.equal(norm_rope((n1, x1, c1, s1), (n2, x2, c2, s2)), want)
    op = torch.compile(lambda x, y: torch.ops.gen.rms_norm_rope([x, y], [n1.weight, n1.weight], [c1, c2], [s1, s2],
                                                                 1e-6, True), fullgraph=True)
    with torch.no_grad():  # the op has no backward: generation runs without autograd
        out = op(x1, x2)
    assert out.shape == (2, 16, 3, 32)
    ref = reference([x1, x2], [n1.weight, n1.weight], [c1, c2], [s1, s2], 1e-6, True)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_marks_the_declared_norms_and_undo_clears():
    m = nn.ModuleList([FluxJoint(32, 2, 16), SelfAttention(32, 2, 16), QwenJoint(32, 2, 16), nn.RMSNorm(16)])
    assert fuse_norm_rope(m) == 4 + 2 + 4
    assert m[0].norm_added_q.fused_rope and m[2].norm_k.fused_rope and "fused_rope" not in m[3].__dict__
    unfuse_norm_rope(m)
    assert not any("fused_rope" in x.__dict__ for x in m.modules())


def test_cpu_attention_unchanged_when_marked():
    torch.manual_seed(0)
    attn = FluxJoint(32, 2, 16)
    img, txt = torch.randn(1, 6, 32), torch.randn(1, 4, 32)
    ids = torch.stack([torch.zeros(10), torch.arange(10.0), torch.zeros(10)], dim=-1)
    rope = rope_from_ids(ids, (4, 6, 6))
    before = attn(img, txt, rope)
    fuse_norm_rope(attn)
    after = attn(img, txt, rope)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel is CUDA's")
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_kernel_matches_the_plain_ops(d):
    for dtype in (torch.float32, torch.bfloat16):
        ps = parts("cuda", dtype, lengths=(7, 300), heads=4, d=d)
        for n, *_ in ps:
            n.fused_rope = True
        for group in (ps[:1], ps[1:], ps):
            for kind in (True, False):
                xs, ws = [p[1] for p in group], [p[0].weight for p in group]
                cs, ss = [p[2] for p in group], [p[3] for p in group]
                want = reference(xs, ws, cs, ss, 1e-6, kind)
                got = torch.ops.gen.rms_norm_rope(xs, ws, cs, ss, 1e-6, kind)
                err = (got.float() - want.float()).norm() / want.float().norm()
                assert got.shape == want.shape and err < (1e-6 if dtype == torch.float32 else 4e-3), (dtype, kind, err)
                if dtype == torch.bfloat16:  # at most a last-bit difference, rarely
                    ulp = (got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-3)
                    assert (ulp > 2 ** -7).float().mean() < 1e-3
