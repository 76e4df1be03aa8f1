"""The engine's opt-in compiled prefill (Engine(compile_prefill=True)) against the eager prefill: inductor on the CPU
(needs a C++ compiler), tiny Qwen2 in fp32."""
from __future__ import annotations

import shutil

import pytest
import torch
from helpers import rel_err
from test_llm_models import engine, make_pair

from gen.llm.engine import pad_left
from gen.llm.sampling import SamplingParams

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None,
                                reason="torch.compile on the CPU needs a C++ compiler")


@torch.no_grad()
def test_compiled_prefill_equals_eager():
    """Two shapes compiled (prefill into generate's cache, hidden states without a cache): logits, cache, hidden states
    and greedy tokens equal the eager engine's (fp32, rel <= 1e-5); a third shape past max_prefill_shapes=2 runs
    eagerly, with the same result."""
    compiled = engine(make_pair("qwen2")[0], compile_prefill=True, prefill_mode="default", max_prefill_shapes=2)
    eager = engine(make_pair("qwen2")[0])
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3]]  # left-padded: the masked attention path

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    ids, mask, pos = pad_left(prompts, 0, torch.device("cpu"))
    p = SamplingParams(max_new_tokens=10)  # generate's cache: 7 + 10 slots, the one made here
    caches = [e.model.new_cache(2, 17, torch.device("cpu"), torch.float32) for e in (compiled, eager)]
    got = compiled.model.compute_logits(compiled.prefill(ids, pos, mask, caches[0])[0])
    want = eager.model.compute_logits(eager.prefill(ids, pos, mask, caches[1])[0])
    assert rel_err(got, want) <= 1e-5
    assert rel_err(caches[0].k[:, :, :, :7], caches[1].k[:, :, :, :7]) <= 1e-5
    assert len(compiled._prefill_shapes) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # dynamo did capture graphs
    assert compiled.generate(prompts, p) == eager.generate(prompts, p)  # the same compiled prefill
    assert len(compiled._prefill_shapes) == 1

    h, m = compiled.hidden_states(prompts)
    h_ref, m_ref = eager.hidden_states(prompts)
    assert torch.equal(m, m_ref) and rel_err(h, h_ref) <= 1e-5
    assert len(compiled._prefill_shapes) == 2

    h1, _ = compiled.hidden_states(prompts, hidden_layer=1)  # a third shape key: eager
    assert rel_err(h1, eager.hidden_states(prompts, hidden_layer=1)[0]) <= 1e-5
    assert len(compiled._prefill_shapes) == 2


def test_max_prefill_shapes_must_be_positive():
    with pytest.raises(ValueError, match="max_prefill_shapes"):
        engine(make_pair("qwen2")[0], compile_prefill=True, max_prefill_shapes=0)


def test_llm_api_passes_compile_prefill_to_its_engine():
    """`LLM(..., compile_prefill=True)` reaches the engine (off by default); no compiling happens until a prefill."""
    from test_llm_models import make_pair as _pair

    from gen.llm import LLM

    model, _ = _pair("qwen2")
    cfg = {"architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 64}

    class Tok:
        pad_token_id, eos_token_id = 0, 1

    on = LLM.from_parts(model, Tok(), cfg, device="cpu", dtype=torch.float32, compile_prefill=True)
    off = LLM.from_parts(model, Tok(), cfg, device="cpu", dtype=torch.float32)
    assert on.engine._prefill_fn is not None and off.engine._prefill_fn is None
