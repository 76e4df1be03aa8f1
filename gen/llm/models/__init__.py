"""The LLM architectures the runtime knows: HF `architectures[0]` -> "module:Class", imported lazily."""
from __future__ import annotations

import importlib

ARCHITECTURES = {
    "LlamaForCausalLM": "gen.llm.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "gen.llm.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "gen.llm.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "gen.llm.models.llama:LlamaForCausalLM",
    # bare decoders saved without a head (re-saved text encoders): encoding only
    "LlamaModel": "gen.llm.models.llama:LlamaModelOnly",
    "Qwen2Model": "gen.llm.models.llama:LlamaModelOnly",
    "Qwen3Model": "gen.llm.models.llama:LlamaModelOnly",
    "MistralModel": "gen.llm.models.llama:LlamaModelOnly",
    "Mistral3ForConditionalGeneration": "gen.llm.models.mistral3:Mistral3ForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "gen.llm.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "gen.llm.models.qwen3_vl:Qwen3VLForConditionalGeneration",
    "DeepseekV2ForCausalLM": "gen.llm.models.deepseek:DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM": "gen.llm.models.deepseek:DeepseekV3ForCausalLM",
}


def model_class(architecture: str):
    """The model class for an HF architecture name; ValueError naming it (and the known ones) if unknown."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown LLM architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    module, name = ARCHITECTURES[architecture].split(":")
    return getattr(importlib.import_module(module), name)
