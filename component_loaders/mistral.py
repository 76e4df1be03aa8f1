"""Loader for a PixtralProcessor folder's text half (FLUX.2 [dev]'s `tokenizer`): the tokenizer with the processor's
chat template.

Not the image processor: FLUX.2 shows its input images to the VAE, never to the Mistral text encoder (only the
reference's optional prompt upsampling would, and it is not supported), and transformers' PixtralProcessor cannot
be built without torchvision. Tokenized as the processor does it: the pipeline adds special tokens only when the
templated text does not start with the bos token already (Mistral's template starts with it).
"""
from __future__ import annotations

import json
from pathlib import Path

from component_loaders.tokenizer import load_tokenizer
from gen.types import GenError


def load_pixtral_text(folder: Path, class_name: str, **_):
    """AutoTokenizer from `folder` with the chat template the processor would use: chat_template.jinja, else
    chat_template.json's, else processor_config.json's, else the tokenizer's own."""
    folder = Path(folder)
    tokenizer = load_tokenizer(folder, "AutoTokenizer")
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    elif (folder / "processor_config.json").is_file():
        template = json.loads((folder / "processor_config.json").read_text()).get("chat_template")
    template = template or tokenizer.chat_template
    if template is None:
        raise GenError(f"{folder} holds no chat template (chat_template.jinja / .json, processor_config.json or the "
                       f"tokenizer's): {class_name} prompts are chat-templated", param="model_path")
    tokenizer.chat_template = template
    return tokenizer
