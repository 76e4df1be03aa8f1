"""LoRA application (gen/transforms/lora.py) on our DiTs: unfused = the LoRA math, on joined q/k/v slices too; fused ==
unfused and unfusing gives the weights back bit for bit; switching sets copies in place (no recompile under
torch.compile, counted with dynamo's counters); FP8 layers take unfused LoRAs; full deltas merge and restore; bad
input refused; concurrent generations with different sets; the CLI flags."""
from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gen import GenError, Generator
from gen.cli import main
from gen.loading import load_dit
from gen.lora import read_lora
from gen.lora.formats import FLUX, WAN
from gen.transforms import TransformOptions, check_options
from gen.transforms.compile import compile_blocks
from gen.transforms.join import join_projections
from gen.transforms.lora import LoraAdapters, LoraLayer, WideLoraLayer
from gen.types import GenerationRequest, LoraSpec
from helpers import psnr, rel_err, run_together
from pipelines.flux import FLUX_DIT
from pipelines.wan import WAN_DIT

ASSETS = Path(__file__).resolve().parents[1] / "assets"
LORAS = ASSETS / "loras"
CPU = torch.device("cpu")
KOHYA, DIFFUSERS, BFL, XLABS = (str(LORAS / "flux-tiny" / f"{n}.safetensors")
                                for n in ("kohya", "diffusers", "bfl", "xlabs"))


def flux_model(join: bool = False):
    model = load_dit(ASSETS / "flux-tiny" / "transformer", CPU, torch.float32)
    if join:
        join_projections(model)
    return model


def adapters(model, dit=FLUX_DIT, slot="transformer", **kw) -> LoraAdapters:
    pipeline = types.SimpleNamespace(dits=lambda: [(slot, model, dit)], device=CPU, dtype=torch.float32)
    return LoraAdapters(pipeline, **kw)


def flux_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 6, 32), pooled_projections=r(1, 32),
                timestep=torch.tensor([0.6]), img_ids=ids, txt_ids=torch.zeros(6, 3), guidance=torch.tensor([3.5]))


@torch.no_grad()
def merged(model, loras):
    """A copy of `model` with `loras` [(file, scale)] merged by hand: W + scale * up @ down (alpha folded in)."""
    import copy

    out = copy.deepcopy(model)
    for file, scale in loras:
        w = read_lora(file, FLUX)
        for path, pair in w.pairs.items():
            out.get_submodule(path).weight += scale * (pair.up @ pair.down)
    return out


def test_unfused_adapters_are_the_lora_math_and_leave_the_weights_alone():
    model, x = flux_model(), flux_inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = merged(model, [(KOHYA, 0.7), (DIFFUSERS, -0.4), (BFL, 1.2)])
    a = adapters(model)
    a.set([(KOHYA, 0.7), (DIFFUSERS, -0.4), (BFL, 1.2)])
    with torch.no_grad():
        got, want = model(**x), reference(**x)
    assert rel_err(got, want) < 1e-5
    assert isinstance(model.x_embedder, LoraLayer) and model.x_embedder.lora_down.shape == (8, 16)  # 2 LoRAs x rank 4
    after = model.state_dict()  # same keys (banks are not saved), same values
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    a.set([])
    assert type(model.x_embedder) is torch.nn.Linear and not hasattr(model.x_embedder, "lora_down")


def test_joined_projections_take_the_lora_on_their_slice(tmp_path):
    """A LoRA on k alone (or on BFL's fused qkv / linear1) lands on its rows of the joined q/k/v(/mlp) matmul."""
    g = torch.Generator().manual_seed(1)
    only_k = tmp_path / "only_k.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(4, 32, generator=g),
               "transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight": torch.randn(32, 4, generator=g),
               "transformer.transformer_blocks.1.attn.add_v_proj.lora_A.weight": torch.randn(4, 32, generator=g),
               "transformer.transformer_blocks.1.attn.add_v_proj.lora_B.weight": torch.randn(32, 4, generator=g)},
              only_k)
    x = flux_inputs(2)
    for loras in ([(str(only_k), 1.0)], [(BFL, 0.8), (XLABS, 1.5)]):
        joined, reference = flux_model(join=True), merged(flux_model(), loras)
        adapters(joined).set(loras)
        first = joined.single_transformer_blocks[0].attn.to_q
        assert first.joined_lora_down.shape == (4 * 8, 32) and first.joined_lora_ranks == [8, 8, 8, 8]
        with torch.no_grad():
            assert rel_err(joined(**x), reference(**x)) < 1e-5


def test_wide_layout_equals_the_up_products_and_compacts_back():
    """Widening layers (out >= 2 x in: the joined q/k/v(+MLP) groups, the MLP's first linear) run one GEMM over
    [x | x A^T] against [W | ups]: the same output as adding each up product. While adapted, their weights are
    views of that buffer; once the set is off they are contiguous tensors of their own again (a group's still views
    of one joined tensor), bit for bit the originals, and the model computes what it did before."""
    x = flux_inputs(5)
    loras = [(KOHYA, 0.7), (DIFFUSERS, -0.4), (BFL, 1.2)]
    model, separate, plain = flux_model(join=True), flux_model(join=True), flux_model(join=True)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    a = adapters(model)
    a.set(loras)
    adapters(separate, wide=False).set(loras)
    block, single = model.transformer_blocks[0], model.single_transformer_blocks[0]
    fc1, out = block.ff.net[0].proj, block.attn.to_out[0]
    assert isinstance(fc1, WideLoraLayer) and fc1.lora_wide.shape == (128, 32 + 16)  # 3 LoRAs x rank 4 -> 16
    assert fc1.weight.data_ptr() == fc1.lora_wide.data_ptr() and fc1.lora_up.data_ptr() != fc1.lora_wide.data_ptr()
    assert type(out).__name__ == "LoraLinear" and out.weight.is_contiguous()  # 32 -> 32: adds its up product
    first = single.attn.to_q
    # q, k, v (32 rows each) in one buffer [their ups | W], the MLP (128 rows, as wide as the rest) in its own
    group, last, cap = first.joined_lora_wide, first.joined_lora_wide_last, first.joined_lora_ranks[0]
    assert group.shape == (96, 3 * cap + 32) and last.shape == (128, 32 + cap) and first.joined_weight is None
    assert single.proj_mlp.weight.data_ptr() == last.data_ptr() and single.attn.to_k.weight.data_ptr() == \
        group[32:, 3 * cap:].data_ptr()
    assert torch.count_nonzero(group[:32, cap:3 * cap]) == 0  # q's rows: only q's up columns
    qkv = block.attn.to_q  # q/k/v alone: one buffer [W | their ups]
    assert torch.count_nonzero(qkv.joined_lora_wide[:32, 32 + qkv.joined_lora_ranks[0]:]) == 0
    with torch.no_grad():
        assert rel_err(model(**x), separate(**x)) < 1e-5
        a.set([])
        after = model.state_dict()
        assert all(torch.equal(after[k], original[k]) for k in original)
        assert all(p.is_contiguous() for p in model.parameters())
        assert not any(n.startswith(("lora_", "joined_lora_")) for m in model.modules() for n in m._buffers)
        assert type(fc1) is torch.nn.Linear and first.joined_weight.is_contiguous()
        assert single.attn.to_v.weight.untyped_storage().data_ptr() == first.joined_weight.untyped_storage().data_ptr()
        # same values; the output may differ in the last bit only because the CPU's GEMM picks its kernel by the
        # weight's address alignment (the loaded weights sit in the file's buffer, the compacted ones are aligned)
        assert rel_err(model(**x), plain(**x)) < 1e-6


def test_the_single_blocks_lora_paths_without_concatenations_compute_the_same():
    """What the single FLUX block runs on CUDA with LoRAs (the GELU epilogue transform on): project with the GELU on
    its last output, and proj_out over [attention | MLP] as GEMMs over the parts (linear_of_cat); on the CPU their
    arithmetic is checked against the concatenated path, with and without a LoRA on the layer."""
    import torch.nn.functional as F

    from gen.models.layers import linear_of_cat, project

    model = flux_model(join=True)
    adapters(model).set([(KOHYA, 0.7), (DIFFUSERS, -0.4)])
    single = model.single_transformer_blocks[0]
    a, g = single.attn, torch.Generator().manual_seed(3)
    h = torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        *qkv, mlp = project(h, a.to_q, a.to_k, a.to_v, single.proj_mlp)
        *qkv2, mlp2 = project(h, a.to_q, a.to_k, a.to_v, single.proj_mlp, gelu_last=True, epilogue=True)
        assert all(torch.equal(x, y) for x, y in zip(qkv, qkv2))
        assert torch.equal(mlp2, F.gelu(mlp, approximate="tanh"))
        parts = [torch.randn(2, 7, n, generator=g) for n in (32, 128)]
        plain = torch.nn.Linear(160, 32)
        for layer in (single.proj_out, plain):  # LoraLinear, nn.Linear
            assert rel_err(linear_of_cat(parts, layer), layer(torch.cat(parts, -1))) < 1e-6
        assert type(single.proj_out).__name__ == "LoraLinear"


def test_fused_equals_unfused_and_unfusing_is_bit_exact():
    x = flux_inputs(3)
    loras = [(KOHYA, 0.9), (DIFFUSERS, 0.5)]
    unfused, fused = flux_model(join=True), flux_model(join=True)
    original = {k: v.clone() for k, v in fused.state_dict().items()}
    adapters(unfused).set(loras)
    a = adapters(fused, fuse=True)
    a.set(loras)
    assert not any(isinstance(m, LoraLayer) for m in fused.modules())  # merged: no adapters run
    assert not torch.equal(fused.state_dict()["x_embedder.weight"], original["x_embedder.weight"])
    with torch.no_grad():
        assert rel_err(fused(**x), unfused(**x)) < 1e-5
    a.set([(BFL, -1.0)])  # another set: originals back first, then the new one merged
    a.set([])
    after = fused.state_dict()
    assert all(torch.equal(after[k], original[k]) for k in original)  # bit for bit
    # the joined weight the group's matmul reads was restored too
    first = fused.transformer_blocks[0].attn.to_q
    assert torch.equal(first.joined_weight[:32], original["transformer_blocks.0.attn.to_q.weight"])


def test_switching_sets_copies_in_place_and_grows_only_when_needed():
    model = flux_model(join=True)
    a = adapters(model)
    a.set([(KOHYA, 1.0)])  # the blocks' layers
    banks = model.transformer_blocks[0].ff.net[2].lora_down
    a.set([(DIFFUSERS, 0.5), (KOHYA, -1.0)])  # 4 + 4 = 8 rows: same capacity, same tensors; x_embedder etc. added
    assert model.transformer_blocks[0].ff.net[2].lora_down is banks and a.restructures == 2
    assert model.x_embedder.lora_down.shape == (8, 16)
    a.set([(KOHYA, 0.2), (KOHYA, -1.0)])  # same layers, same capacity: contents only
    assert model.transformer_blocks[0].ff.net[2].lora_down is banks and a.restructures == 2
    a.set([(DIFFUSERS, 0.5), (KOHYA, -1.0), (BFL, 2.0)])  # 12 rows: grown to 16
    assert model.transformer_blocks[0].ff.net[2].lora_down.shape[0] == 16 and a.restructures == 3
    a.set([(XLABS, 1.0)])  # fewer rows and layers: banks kept (zeros where unused), nothing rebuilt
    assert a.restructures == 3 and a.switches == 5
    assert torch.count_nonzero(model.transformer_blocks[0].ff.net[2].lora_up) == 0
    a.set([(XLABS, 1.0)])  # the same set again: nothing to do
    assert a.switches == 5


def test_compiled_blocks_do_not_recompile_when_sets_switch():
    """Regional compile (backend eager): the first LoRA set compiles the adapted blocks once; switching among sets
    of the same capacity, changing scales and going back to no LoRA cost no new graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, x = flux_model(join=True), flux_inputs(4)
    a = adapters(model)
    compile_blocks(model, FLUX_DIT.blocks, backend="eager")
    graphs = lambda: counters["stats"]["unique_graphs"]
    with torch.no_grad():
        plain = model(**x)
        no_lora = graphs()
        a.set([(KOHYA, 1.0), (DIFFUSERS, 0.0)])  # the layers both adapt, 8 rows
        first = model(**x)
        with_lora = graphs()
        outs = []
        for loras in ([(DIFFUSERS, 1.0)], [(KOHYA, 0.3), (DIFFUSERS, -0.8)], [(KOHYA, 1.0)], [], [(BFL, 0.5)]):
            a.set(loras)
            outs.append(model(**x))
    assert with_lora > no_lora  # the adapted blocks traced once
    assert graphs() == with_lora, f"recompiled while switching: {graphs() - with_lora} new graphs"
    assert torch.equal(outs[2], first) and rel_err(outs[3], plain) < 1e-6 and a.restructures == 3  # + none, back
    assert rel_err(outs[0], merged(flux_model(), [(DIFFUSERS, 1.0)])(**x)) < 1e-5
    print(f"dynamo graphs: {no_lora} plain, {with_lora} after the first LoRA set, {graphs()} after 5 more switches")


def test_fp8_layers_take_unfused_loras_and_fusing_into_them_is_refused():
    from gen.transforms.fp8 import quantize_transformer

    model, x = flux_model(), flux_inputs(5)
    quantize_transformer(model, FLUX_DIT.blocks)
    with torch.no_grad():
        fp8_plain = model(**x)
    layer = model.transformer_blocks[0].attn.to_q
    adapters(model).set([(DIFFUSERS, 1.0)])
    h = torch.randn(3, 32)
    with torch.no_grad():  # the layer: its own FP8 matmul plus the exact LoRA update
        pair = read_lora(DIFFUSERS, FLUX).pairs["transformer_blocks.0.attn.to_q"]
        want = type(layer).__mro__[2].forward(layer, h) + h @ pair.down.T @ pair.up.T
        assert rel_err(layer(h), want) < 1e-6
        assert rel_err(model(**x), fp8_plain) > 1e-2
    with pytest.raises(GenError, match="fuse_lora and fp8 cannot be combined") as e:
        check_options(TransformOptions(fp8=True, fuse_lora=True), CPU, torch.bfloat16)
    assert e.value.param == "fuse_lora"
    with pytest.raises(GenError, match="fuse_lora merges LoRAs into full-precision weights"):
        adapters(model, fuse=True).set([(DIFFUSERS, 1.0)])


def test_full_deltas_merge_into_parameters_and_come_back_exactly():
    model = load_dit(ASSETS / "wan-t2v-tiny" / "transformer", CPU, torch.float32)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    file = str(LORAS / "wan-t2v-tiny" / "lightx2v_full.safetensors")
    a = adapters(model, dit=WAN_DIT)
    a.set([(file, 0.5)])
    w = read_lora(file, WAN)
    for name in ("blocks.0.norm2.weight", "blocks.1.scale_shift_table", "scale_shift_table", "patch_embedding.weight",
                 "blocks.0.attn1.to_q.bias", "blocks.1.attn1.norm_k.weight"):
        assert torch.allclose(model.state_dict()[name], original[name] + 0.5 * w.deltas[name], atol=1e-7), name
    a.set([])
    assert all(torch.equal(model.state_dict()[k], original[k]) for k in original)


def test_bad_sets_are_refused_naming_the_entry(tmp_path):
    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", max_loras=2)
    kw = dict(prompt="x", seed=1, num_inference_steps=1, height=32, width=32)
    with pytest.raises(GenError, match="at most 2 LoRAs per request, got 3"):
        gen.generate(**kw, loras=[KOHYA] * 3)
    with pytest.raises(GenError) as e:
        gen.generate(**kw, loras=[(KOHYA, 1.0), (KOHYA, float("nan"))])
    assert e.value.param == "loras[1].scale"
    with pytest.raises(GenError) as e:
        gen.generate(**kw, loras=[(KOHYA, 1.0, "transformer_2")])
    assert e.value.param == "loras[0].target"
    wan_lora = str(LORAS / "wan-t2v-tiny" / "musubi.safetensors")
    with pytest.raises(GenError, match="is a Wan2.1 / Wan2.2 LoRA .* this model is FLUX.1"):
        gen.validate(GenerationRequest(prompt="x", loras=(LoraSpec(wan_lora),)))  # what the server runs first
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(Path(KOHYA).read_bytes()[:5000])
    with pytest.raises(GenError, match="cut.safetensors is truncated"):
        gen.generate(**kw, loras=[(str(cut), 1.0)])
    big = tmp_path / "big.safetensors"  # a LoRA of a wider model: its shapes are named
    save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64),
               "transformer.x_embedder.lora_B.weight": torch.zeros(3072, 4)}, big)
    with pytest.raises(GenError, match=r"x_embedder is 16 -> 32 in this transformer, the LoRA's is 64 -> 3072"):
        gen.generate(**kw, loras=[(str(big), 1.0)])
    assert gen.generate(**kw).images  # still serving


def test_default_set_fused_at_load_and_per_request_sets():
    kw = dict(prompt="a star", seed=4, num_inference_steps=2, height=32, width=32)
    plain = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu")
    fused = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", loras=[(KOHYA, 1.5)], fuse_lora=True)
    base = plain.generate(**kw).images[0]
    with_lora = plain.generate(**kw, loras=[(KOHYA, 1.5)]).images[0]
    assert psnr(fused.generate(**kw).images[0], with_lora) >= 40  # requests naming none get the default set
    assert psnr(fused.generate(**kw, loras=[]).images[0], base) == float("inf")  # []: none, weights restored
    assert psnr(fused.generate(**kw).images[0], with_lora) >= 40
    assert psnr(with_lora, base) < 40


def test_concurrent_generations_with_different_sets_get_their_own():
    kw = dict(prompt="a circle", seed=6, num_inference_steps=2, height=32, width=32)
    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", max_batch=2, batch_wait_ms=50)
    sets = [[(KOHYA, 1.5)], [(DIFFUSERS, -1.0)], [(KOHYA, 1.5)], []]
    alone = [np.asarray(gen.generate(**kw, loras=s).images[0]) for s in sets]
    results = run_together(lambda s: np.asarray(gen.generate(**kw, loras=s).images[0]), sets)
    for got, want in zip(results, alone):
        assert psnr(got, want) >= 40
    assert psnr(alone[0], alone[1]) < 40


def test_cli_lora_flags(tmp_path, capsys):
    out = tmp_path / "out.png"
    args = ["generate", "--model-path", str(ASSETS / "flux-tiny"), "--prompt", "a cat", "--seed", "2", "--height", "32",
            "--width", "32", "--num-inference-steps", "1", "--output", str(out)]
    assert main(args + ["--lora", f"{KOHYA}:0.8", "--lora", DIFFUSERS, "--fuse-lora"]) == 0
    err = capsys.readouterr().err
    assert "LoRAs (fused):" in err and "kohya / sd-scripts, rank 4, scale 0.8" in err and out.is_file()
    assert main(args + ["--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: LoRA ")
    assert main(args + ["--lora", f"{KOHYA}:11"]) == 2
    assert "LoRA scale must be a finite number in [-10, 10], got 11.0" in capsys.readouterr().err


def test_add_lora_in_place_eager_equals_the_compiled_add():
    """add_lora accumulates into the base output in place when eager (on a column slice of a joined output too) and
    adds out of place under torch.compile; both equal y + h @ up^T. A layout it cannot view as rows is added out of
    place."""
    from gen.models.layers import add_lora

    g = torch.Generator().manual_seed(0)
    joined, h, up = torch.randn(2, 5, 24, generator=g), torch.randn(2, 5, 4, generator=g), torch.randn(8, 4, generator=g)
    want = joined[..., 8:16] + h @ up.T
    eager = joined.clone()
    got = add_lora(eager[..., 8:16], h, up)
    assert got.data_ptr() == eager[..., 8:16].data_ptr() and rel_err(got, want) < 1e-6
    assert torch.equal(eager[..., :8], joined[..., :8]) and torch.equal(eager[..., 16:], joined[..., 16:])
    compiled = torch.compile(lambda y: add_lora(y[..., 8:16], h, up), backend="eager", fullgraph=True)
    base = joined.clone()
    assert rel_err(compiled(base), want) < 1e-6 and torch.equal(base, joined)  # out of place: the input untouched
    transposed = joined[..., 8:16].transpose(0, 1)  # rows not mergeable into one stride
    out = add_lora(transposed, h.transpose(0, 1), up)
    assert out.data_ptr() != transposed.data_ptr() and rel_err(out, want.transpose(0, 1)) < 1e-6


def test_wide_input_is_written_in_place_by_its_producer_under_inductor():
    """The wide layout's input [x | x A^T] (or a split group's [h_rest | x | h_last]) under inductor, with a norm
    producing x as in the blocks: the norm writes x straight into the GEMM's buffer in the one kernel that makes it
    (no buffer of x's own, which a concatenation after the down product had to copy; no second pass over the whole
    buffer, which assigning into slices of it made), the down product reads x there and writes into the buffer in
    place, and the GEMM over the 2-D rows keeps its bias (addmm; a 3-D strided view ran a bmm and added the bias
    apart). Values equal eager."""
    import torch.nn.functional as F
    from torch._inductor.utils import run_and_get_code

    from gen.models.layers import wide_lora_input

    def layer(inp, s, down, wide, bias, before):
        x = F.layer_norm(inp, inp.shape[-1:]) * (1 + s)
        return F.linear(wide_lora_input(x, down, before), wide, bias)

    g = torch.Generator().manual_seed(0)
    inp, s, down = torch.randn(2, 40, 32, generator=g), torch.randn(32, generator=g), torch.randn(24, 32, generator=g)
    wide, bias = torch.randn(96, 56, generator=g), torch.randn(96, generator=g)
    x = F.layer_norm(inp, inp.shape[-1:]) * (1 + s)
    h = x @ down.T
    for before in (0, 8):
        want = torch.cat([h[..., :before], x, h[..., before:]], -1).reshape(80, 56) @ wide.T + bias
        assert rel_err(layer(inp, s, down, wide, bias, before), want) < 1e-6
        torch._dynamo.reset()
        got, (code,) = run_and_get_code(torch.compile(layer, fullgraph=True), inp, s, down, wide, bias, before)
        assert rel_err(got, want) < 1e-5
        allocated = [line for line in code.splitlines() if "empty_strided" in line and "= empty_strided" in line]
        assert not any("(80, 32)" in a or "(2, 40, 32)" in a for a in allocated), allocated  # no buffer of x alone
        assert sum("(80, 56)" in a for a in allocated) == 1, allocated
        assert "extern_kernels.addmm(" in code and "bmm(" not in code
        kernels = [line for line in code.splitlines() if re.match(r"\s*cpp_fused\w*\(", line)]  # calls
        assert len(kernels) == 1, kernels  # the norm, its cat and the zero columns
        assert "torch.ops.gen.lora_down_into.default(buf" in code  # in place, on the buffer itself
