"""CUDA-graph replay of the transformer call (gen/transforms/cuda_graph.py): the wrapper's logic, run on CPU through
`eager_capture` (a "graph" whose replay recomputes the call on the static buffers), and its refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gen import GenError, Generator
from gen.cli import main
from gen.transforms.cuda_graph import GraphedCall, check_cuda_graphs, eager_capture, enable_cuda_graphs

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CASES = {  # model, request (two CFG branches per step), signatures per transformer: Qwen-Image's text is not
    # padded, so its two prompts of different lengths make two; T5 (FLUX) and umT5 (Wan) pad to a fixed length
    "flux": ("flux-tiny", dict(height=64, width=64, negative_prompt="a blue square", true_cfg_scale=2.0), 1),
    "wan22": ("wan22-a14b-tiny", dict(height=32, width=32, num_frames=5, guidance_scale=3.0), 1),
    "qwen": ("qwen-image-tiny", dict(height=64, width=64, negative_prompt="a blue square", true_cfg_scale=2.0), 2),
}


def _models(gen: Generator) -> list[torch.nn.Module]:
    p = gen.pipeline
    return [m for m in (p.transformer, getattr(p, "transformer_2", None)) if m is not None]


@pytest.mark.parametrize("name", sorted(CASES))
def test_replayed_generation_equals_the_plain_one(name):
    folder, kw, signatures = CASES[name]
    gen = Generator.from_pretrained(ASSETS / folder, device="cpu")
    plain = gen.generate("a red circle", seed=3, num_inference_steps=4, **kw)
    graphed = [enable_cuda_graphs(m, capture=eager_capture) for m in _models(gen)]
    out = gen.generate("a red circle", seed=3, num_inference_steps=4, **kw)
    first = lambda r: np.asarray(r.images[0] if r.images else r.frames[0])
    np.testing.assert_array_equal(first(out), first(plain))
    assert [g.captures for g in graphed] == [signatures] * len(graphed)  # not one per step
    again = gen.generate("a red circle", seed=3, num_inference_steps=4, **kw)
    np.testing.assert_array_equal(first(again), first(plain))
    assert [g.captures for g in graphed] == [signatures] * len(graphed)  # replayed, not captured again


def test_signatures_copies_and_eviction():
    calls = []

    def fn(x, scale, shapes):
        calls.append(x.shape)
        return x * scale + len(shapes), {"sum": x.sum()}

    g = GraphedCall(fn, capture=eager_capture, max_graphs=2)
    a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
    out_a = g(a, 2.0, [(1, 2)])
    out_b = g(b, 2.0, [(1, 2)])  # same signature: replayed on b's values
    assert g.captures == 1
    torch.testing.assert_close(out_a[0], torch.full((2, 3), 3.0))  # a returned copy: not overwritten by the replay
    torch.testing.assert_close(out_b[0], torch.full((2, 3), 5.0))
    torch.testing.assert_close(out_b[1]["sum"], torch.tensor(12.0))
    g(b, 3.0, [(1, 2)])  # another non-tensor value: another signature
    g(torch.ones(4, 3), 2.0, [(1, 2)])  # another shape: a third, the oldest is dropped
    assert g.captures == 3 and len(g.graphs) == 2
    torch.testing.assert_close(g(a, 2.0, [(1, 2)])[0], out_a[0])  # captured again after its eviction
    assert g.captures == 4
    with pytest.raises(ValueError, match="max_graphs must be at least 1, got 0"):
        GraphedCall(fn, max_graphs=0)


def test_refusals_name_the_problem(tmp_path, monkeypatch, capsys):
    with pytest.raises(GenError, match="cuda_graphs needs a CUDA device, got cpu") as info:
        check_cuda_graphs(torch.device("cpu"))
    assert info.value.param == "cuda_graphs"
    with pytest.raises(GenError, match="cannot be combined"):
        check_cuda_graphs(torch.device("cuda"), step_cache=0.1)
    check_cuda_graphs(torch.device("cuda"))  # fine
    with pytest.raises(GenError, match="cuda_graphs needs a CUDA device"):
        Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", cuda_graphs=True)
    monkeypatch.chdir(tmp_path)
    args = ["generate", "--model-path", str(ASSETS / "flux-tiny"), "--prompt", "x", "--device", "cpu",
            "--cuda-graphs"]
    assert main(args) == 2
    assert "cuda_graphs needs a CUDA device, got cpu" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
@pytest.mark.parametrize("name", sorted(CASES))
def test_on_cuda_graph_replays_equal_the_plain_generation(name):
    """Real CUDA graphs (one shared pool; Qwen-Image's two signatures replay alternately) against eager calls. The
    graphs are put on after loading, so the modulation schedule, which --cuda-graphs turns off (a replay would reuse
    the captured step's rows), is off from the start; the CFG branches run as two calls, as on the CPU (on CUDA they
    are batched into one by default), so that Qwen-Image's two signatures are both captured and replayed."""
    folder, kw, signatures = CASES[name]
    gen = Generator.from_pretrained(ASSETS / folder, device="cuda", modulation_schedule=False, cfg_batch=False)
    outputs = {}
    for graphed in (False, True):
        if graphed:
            calls = [enable_cuda_graphs(m) for m in _models(gen)]
        outputs[graphed] = [gen.generate("a red circle", seed=s, num_inference_steps=4, **kw) for s in (3, 4)]
    for plain, replayed in zip(outputs[False], outputs[True]):
        a = np.asarray(plain.images[0] if plain.images else plain.frames[0]).astype(float)
        b = np.asarray(replayed.images[0] if replayed.images else replayed.frames[0]).astype(float)
        assert np.abs(a - b).max() <= 1  # same kernels on the same inputs; at most a rounding step of uint8
    assert [g.captures for g in calls] == [signatures] * len(calls)


def test_dropping_every_graph_takes_a_new_capture_pool(monkeypatch):
    """A structure change (LoRA banks on or off: gen/transforms/lora.py) drops every captured graph; the next capture
    must not go into the pool those graphs shared (on CUDA that fails an allocator assertion), so drop() takes a new
    pooled capture. The LoRA adapters drop the graphs of a model with CUDA graphs on when a set changes structure."""
    import gen.transforms.cuda_graph as cg
    from gen.transforms.lora import LoraAdapters

    pools = []

    def pooled():
        pools.append(object())
        return lambda fn, args, kwargs: eager_capture(fn, args, kwargs)

    monkeypatch.setattr(cg, "pooled_cuda_capture", pooled)
    g = GraphedCall(lambda x: x + 1)
    g(torch.ones(2))
    assert len(pools) == 1 and len(g.graphs) == 1
    g.drop()
    assert len(pools) == 2 and not g.graphs
    torch.testing.assert_close(g(torch.ones(2)), torch.full((2,), 2.0))
    assert g.captures == 2
    given = GraphedCall(lambda x: x, capture=eager_capture)
    given.drop()
    assert given.capture is eager_capture and len(pools) == 2  # a capture given is kept

    model = torch.nn.Linear(2, 2)
    wrapped = enable_cuda_graphs(model, capture=eager_capture)
    model(torch.ones(1, 2))
    adapters = LoraAdapters.__new__(LoraAdapters)
    adapters.slots, adapters.models = ("transformer",), {"transformer": model}
    adapters._forget_graphs()
    assert not wrapped.graphs
