"""Qwen-Image's Qwen2.5-VL text encoder runs through gen's LLM runtime, shared by every pipeline naming it."""
from __future__ import annotations

import torch

from gen import Generator
from gen.llm import LLM, registry
from pipelines.qwen_image import RuntimeQwenVL, TransformersQwenVL
from conftest import ASSETS


def test_encoder_is_the_shared_runtime_and_matches_transformers():
    a = Generator.from_pretrained(ASSETS / "qwen-image-tiny")
    b = Generator.from_pretrained(ASSETS / "qwen-image-tiny")
    assert isinstance(a.pipeline.encoder, RuntimeQwenVL)
    assert a.pipeline.components["text_encoder"] is b.pipeline.components["text_encoder"]  # one instance
    assert isinstance(a.pipeline.components["text_encoder"], LLM)
    assert any("qwen-image-tiny" in k[0] for k in registry.loaded())

    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(ASSETS / "qwen-image-tiny" / "text_encoder").eval()
    ref = TransformersQwenVL(hf, a.pipeline.components["tokenizer"])
    texts = ["a red circle", "a much longer prompt about a small blue square"]
    h1, m1 = a.pipeline.encoder.encode(texts)
    h2, m2 = ref.encode(texts)
    for x, mx, y, my in zip(h1, m1, h2, m2):
        a_rows, b_rows = x[mx.bool()], y[my.bool()]
        assert a_rows.shape == b_rows.shape
        assert ((a_rows - b_rows).norm() / b_rows.norm()).item() <= 1e-5
    assert torch.equal(m1.sum(1), m2.sum(1))
