"""Loaders for Qwen-VL processor folders (tokenizer + image processor): Qwen2-VL's, as Qwen-Image-Edit checkpoints ship
them, and Qwen3-VL's (Qwen-Image 2.1).

Ours rather than transformers' `Qwen2VLProcessor`: that class insists on a video processor, which needs
torchvision, and image editing never uses video. The image side is transformers' own PIL-backed
`Qwen2VLImageProcessorPil` (same config file); the text side is the folder's tokenizer.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from component_loaders.tokenizer import load_tokenizer
from gen.types import GenError


class QwenVLProcessor:
    """text (+ images) -> input_ids, attention_mask (+ pixel_values, image_grid_thw) for Qwen2/2.5-VL.

    Each `<|image_pad|>` in the texts (in order, across texts) stands for one image and is expanded to that
    image's number of merged patches, as transformers' Qwen2VLProcessor does.
    """

    image_token = "<|image_pad|>"

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def __call__(self, text: str | list[str], images: Image.Image | list[Image.Image] | None = None,
                 padding: bool | str = True, return_tensors: str = "pt", **tokenizer_kwargs):
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else [images] if isinstance(images, Image.Image) else list(images)
        n_slots = sum(t.count(self.image_token) for t in texts)
        if n_slots != len(images):
            raise ValueError(f"the texts hold {n_slots} {self.image_token} placeholders for {len(images)} images")
        vision = {}
        if images:
            vision = dict(self.image_processor(images=images, return_tensors="pt"))
            counts = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
            it = iter(counts)
            texts = ["".join(p if i == 0 else self.image_token * next(it) + p
                             for i, p in enumerate(t.split(self.image_token))) for t in texts]
        tokens = self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **tokenizer_kwargs)
        from transformers import BatchFeature

        return BatchFeature({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], **vision})


def load_qwen_vl_processor(folder: Path, class_name: str, **_) -> QwenVLProcessor:
    from transformers import Qwen2VLImageProcessorPil

    folder = Path(folder)
    if not (folder / "preprocessor_config.json").is_file():
        raise GenError(f"{folder}/preprocessor_config.json is missing ({class_name} needs an image processor)",
                       param="model_path")
    tokenizer = load_tokenizer(folder, "AutoTokenizer")
    return QwenVLProcessor(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(str(folder)))



def load_qwen3_vl_processor(folder: Path, class_name: str, **_):
    """transformers' own Qwen3VLProcessor (Qwen-Image 2.1's), images only: its video half needs torchvision, which
    image generation never uses. Tokenizer, PIL image processor and chat template (chat_template.jinja, or the older
    chat_template.json) come from `folder`, so `apply_chat_template` and `__call__` behave as the reference's."""
    import json

    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return type(None)
            return super().check_argument_for_proper_class(name, arg)

    folder = Path(folder)
    if not (folder / "preprocessor_config.json").is_file():
        raise GenError(f"{folder}/preprocessor_config.json is missing ({class_name} needs an image processor)",
                       param="model_path")
    tokenizer = load_tokenizer(folder, "AutoTokenizer")
    template = tokenizer.chat_template
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text()).get("chat_template", template)
    if template is None:
        raise GenError(f"{folder} holds no chat template (chat_template.jinja / .json or the tokenizer's)",
                       param="model_path")
    return ImageOnlyQwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(str(folder)),
                                     tokenizer=tokenizer, video_processor=None, chat_template=template)
