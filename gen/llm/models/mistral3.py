"""Mistral 3 (Mistral-Small-3.x; FLUX.2 [dev] reads hidden states of its layers 10, 20, 30): the Mistral text decoder of
llama.py loaded from a Mistral3ForConditionalGeneration checkpoint, text only.

The Pixtral vision tower and its projector are neither built nor read: diffusers' Flux2Pipeline encodes prompts as
text (format_input without images); only its optional prompt upsampling shows images to the model, by generation.
"""
from __future__ import annotations

from gen.llm.models.llama import LlamaForCausalLM


class Mistral3ForConditionalGeneration(LlamaForCausalLM):
    # the published layout (also what transformers 5 save_pretrained writes) and transformers 4.5x's in-memory names
    checkpoint_key_map = {r"^language_model\.model\.": "model.", r"^language_model\.lm_head\.": "lm_head.",
                          r"^model\.language_model\.": "model."}
    ignored_checkpoint_keys = (r"^(model\.)?vision_tower\.", r"^(model\.)?multi_modal_projector\.")
