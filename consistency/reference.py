"""Runs a case through the reference diffusers pipeline (for goldens); one small function per model_index `_class_name`.

Noise comes from `torch.Generator("cpu").manual_seed(seed)`, as gen draws it. Not used by `gen consistency run`.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from consistency.cases import Case
from gen.generator import load_image
from gen.types import GenError


def _common(case: Case, *names: str) -> dict:
    """The case's fields named in `names` that are set, plus the seeded CPU generator."""
    kw = {n: getattr(case, n) for n in names if getattr(case, n) is not None}
    kw["generator"] = torch.Generator("cpu").manual_seed(case.seed)
    return kw


def _frames(video: np.ndarray) -> list[Image.Image]:
    """(T, H, W, 3) floats in [0, 1] -> PIL frames, rounded as diffusers' image processor rounds."""
    return [Image.fromarray((f * 255).round().astype(np.uint8)) for f in video]


def _flux(pipe, case: Case) -> tuple[list[Image.Image], None]:
    kw = _common(case, "prompt", "negative_prompt", "true_cfg_scale", "height", "width", "num_inference_steps",
                 "guidance_scale")
    return pipe(**kw).images, None


def _flux_kontext(pipe, case: Case) -> tuple[list[Image.Image], None]:
    kw = _common(case, "prompt", "negative_prompt", "true_cfg_scale", "height", "width", "num_inference_steps",
                 "guidance_scale")
    if case.height is not None and case.width is not None:
        kw["max_area"] = case.height * case.width  # the reference rescales height x width to max_area pixels
    return pipe(image=load_image(case.images[0]), **kw).images, None


def _z_image(pipe, case: Case) -> tuple[list[Image.Image], None]:
    kw = _common(case, "prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale")
    return pipe(**kw).images, None


def _qwen_image(pipe, case: Case) -> tuple[list[Image.Image], None]:
    kw = _common(case, "prompt", "negative_prompt", "true_cfg_scale", "height", "width", "num_inference_steps",
                 "guidance_scale")
    return pipe(**kw).images, None


def _qwen_image_edit(pipe, case: Case) -> tuple[list[Image.Image], None]:
    kw = _common(case, "prompt", "negative_prompt", "true_cfg_scale", "height", "width", "num_inference_steps",
                 "guidance_scale")
    return pipe(image=load_image(case.images[0]), **kw).images, None


def _qwen_image21(pipe, case: Case) -> tuple[list[Image.Image], None]:
    kw = _common(case, "prompt", "negative_prompt", "true_cfg_scale", "height", "width", "num_inference_steps")
    if case.images:  # condition images are optional
        kw["image"] = [load_image(p) for p in case.images]
    return pipe(**kw).images, None


def _flux2(pipe, case: Case) -> tuple[list[Image.Image], None]:
    """FLUX.2 [dev] / [klein], reference images optional; a [klein] negative prompt goes in as embeds (the reference's
    own negative prompt is always "")."""
    kw = _common(case, "prompt", "height", "width", "num_inference_steps", "guidance_scale")
    if case.images:
        kw["image"] = [load_image(p) for p in case.images]
    if case.negative_prompt is not None:
        kw["negative_prompt_embeds"] = pipe.encode_prompt(case.negative_prompt, device=pipe.device)[0]
    return pipe(**kw).images, None


def _flux2_dev(pipe, case: Case) -> tuple[list[Image.Image], None]:
    from component_loaders.mistral import load_pixtral_text

    pipe.tokenizer = load_pixtral_text(case.model / "tokenizer", "PixtralProcessor")  # its text half, as gen loads it
    return _flux2(pipe, case)


def _no_tokenizer(model) -> dict:
    """transformers' PixtralProcessor needs torchvision: FLUX.2 [dev] is loaded without it, _flux2_dev sets the
    tokenizer."""
    return {"tokenizer": None}


def _wan_t2v(pipe, case: Case) -> tuple[list[Image.Image], int | None]:
    kw = _common(case, "prompt", "negative_prompt", "height", "width", "num_frames", "num_inference_steps",
                 "guidance_scale")
    return _frames(pipe(output_type="np", **kw).frames[0]), case.fps


def _wan_i2v(pipe, case: Case) -> tuple[list[Image.Image], int | None]:
    # diffusers' I2V prompt cleaning calls ftfy unconditionally (a NameError without ftfy installed), so the text is
    # encoded with the T2V pipeline's text encoding, the same code with the ftfy use guarded.
    from diffusers import WanPipeline

    kw = _common(case, "height", "width", "num_frames", "num_inference_steps", "guidance_scale")
    pos = WanPipeline._get_t5_prompt_embeds(pipe, case.prompt, max_sequence_length=512)
    neg = WanPipeline._get_t5_prompt_embeds(pipe, case.negative_prompt or "", max_sequence_length=512)
    out = pipe(image=load_image(case.images[0]), prompt_embeds=pos, negative_prompt_embeds=neg, output_type="np", **kw)
    return _frames(out.frames[0]), case.fps


def _qwen_vl_processor(model) -> dict:
    """transformers' Qwen2VLProcessor without its video processor (which needs torchvision; editing uses none)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return type(None)
            return super().check_argument_for_proper_class(name, arg)

    folder = str(model / "processor")
    return {"processor": ImageOnlyQwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder),
                                                   tokenizer=AutoTokenizer.from_pretrained(folder),
                                                   video_processor=None)}


def _qwen3_vl_processor(model) -> dict:
    """transformers' Qwen3VLProcessor without its video processor, as gen loads it."""
    from component_loaders.qwen import load_qwen3_vl_processor

    return {"processor": load_qwen3_vl_processor(model / "processor", "Qwen3VLProcessor")}


# model_index.json `_class_name` -> (diffusers pipeline class, runner, components to pass in instead of loading)
RUNNERS = {
    "FluxPipeline": ("FluxPipeline", _flux, None),
    "FluxKontextPipeline": ("FluxKontextPipeline", _flux_kontext, None),
    "ZImagePipeline": ("ZImagePipeline", _z_image, None),
    "QwenImagePipeline": ("QwenImagePipeline", _qwen_image, None),
    "QwenImageEditPipeline": ("QwenImageEditPipeline", _qwen_image_edit, _qwen_vl_processor),
    "QwenImage21Pipeline": ("QwenImage21Pipeline", _qwen_image21, _qwen3_vl_processor),
    "Flux2Pipeline": ("Flux2Pipeline", _flux2_dev, _no_tokenizer),
    "Flux2KleinPipeline": ("Flux2KleinPipeline", _flux2, None),
    "WanPipeline": ("WanPipeline", _wan_t2v, None),
    "WanImageToVideoPipeline": ("WanImageToVideoPipeline", _wan_i2v, None),
}


def run_reference(case: Case, class_name: str, device: torch.device, dtype: torch.dtype):
    """(frames, fps) from the reference pipeline for `case`; frames is one image for image cases."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    if class_name not in RUNNERS:
        raise GenError(f"case {case.id!r}: no reference runner for pipeline {class_name!r}; "
                       f"known: {sorted(RUNNERS)} (use --source gen)")
    takes_image = class_name in ("QwenImageEditPipeline", "WanImageToVideoPipeline", "FluxKontextPipeline")
    optional = ("QwenImage21Pipeline", "Flux2Pipeline", "Flux2KleinPipeline")  # images optional
    if takes_image != bool(case.images) and class_name not in optional:
        need = "needs an input image" if takes_image else "takes no input images"
        raise GenError(f"case {case.id!r}: {class_name} {need} (case field 'images')")
    cls_name, runner, given = RUNNERS[class_name]
    diffusers_logging.disable_progress_bar()
    kw = given(case.model) if given is not None else {}
    pipe = getattr(diffusers, cls_name).from_pretrained(case.model, dtype=dtype, **kw).to(device)
    pipe.set_progress_bar_config(disable=True)
    if case.loras:  # diffusers' own LoRA loading (PEFT), each at its scale
        names = [f"lora{i}" for i in range(len(case.loras))]
        for name, (path, _) in zip(names, case.loras):
            pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters(names, [scale for _, scale in case.loras])
    return runner(pipe, case)
