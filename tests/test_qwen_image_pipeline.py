"""End-to-end parity of pipelines/qwen_image.py with diffusers' Qwen-Image pipelines on the tiny assets (fp32 CPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import psnr

import gen  # noqa: F401  (imports the package before component_loaders)
from component_loaders.qwen import load_qwen_vl_processor
from gen import Generator, GenError, GenerationRequest

ASSETS = Path(__file__).resolve().parents[1] / "assets"
T2I, EDIT, PLUS = ASSETS / "qwen-image-tiny", ASSETS / "qwen-image-edit-tiny", ASSETS / "qwen-image-edit-plus-tiny"


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def reference(cls_name: str, path: Path):
    import diffusers

    # transformers' Qwen2VLProcessor needs torchvision for its (unused) video half; both pipelines get our processor
    kwargs = {"processor": None} if (path / "processor").is_dir() else {}
    pipe = getattr(diffusers, cls_name).from_pretrained(str(path), dtype=torch.float32, **kwargs)
    if kwargs:
        pipe.processor = load_qwen_vl_processor(path / "processor", "Qwen2VLProcessor")
    return pipe


def run_reference(pipe, seed: int, **kw) -> list[Image.Image]:
    with torch.no_grad():
        return pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", **kw).images


@pytest.fixture(scope="module")
def t2i():
    return Generator.from_pretrained(T2I, device="cpu", dtype="fp32")


def test_text_to_image_matches_diffusers_with_true_cfg(t2i):
    kw = dict(prompt="a red cat sitting on grass", negative_prompt=" ", num_inference_steps=2, height=64, width=48,
              true_cfg_scale=4.0)
    ours = t2i.generate(seed=3, **kw).images
    ref = run_reference(reference("QwenImagePipeline", T2I), 3, **kw)
    assert ours[0].size == (48, 64)
    assert psnr(ours[0], ref[0]) >= 40


def test_text_to_image_without_cfg_two_outputs(t2i):
    kw = dict(prompt="a blue dog", num_inference_steps=2, height=32, width=32)
    ours = t2i.generate(seed=5, num_outputs=2, **kw).images
    ref = run_reference(reference("QwenImagePipeline", T2I), 5, num_images_per_prompt=2, **kw)
    assert len(ours) == 2
    assert all(psnr(a, b) >= 40 for a, b in zip(ours, ref))


def test_edit_matches_diffusers():
    image = picture(96, 64, 0)
    kw = dict(prompt="turn the cat blue", negative_prompt=" ", num_inference_steps=2, height=32, width=48,
              true_cfg_scale=2.5)
    ours = Generator.from_pretrained(EDIT, device="cpu", dtype="fp32").generate(seed=7, images=[image], **kw).images
    ref = run_reference(reference("QwenImageEditPipeline", EDIT), 7, image=image, **kw)
    assert ours[0].size == (48, 32)
    assert psnr(ours[0], ref[0]) >= 40


def test_edit_plus_two_images_matches_diffusers():
    images = [picture(64, 64, 1), picture(48, 80, 2)]
    kw = dict(prompt="make it green", num_inference_steps=2, height=32, width=32)
    ours = Generator.from_pretrained(PLUS, device="cpu", dtype="fp32").generate(seed=11, images=images, **kw).images
    ref = run_reference(reference("QwenImageEditPlusPipeline", PLUS), 11, image=images, **kw)
    assert psnr(ours[0], ref[0]) >= 40


def test_edit_default_size_follows_the_input_aspect():
    gen_ = Generator.from_pretrained(EDIT, device="cpu", dtype="fp32")
    req = GenerationRequest(prompt="x", images=(picture(200, 100, 0),))
    from stages.validate import validate_request

    filled = validate_request(req, gen_.pipeline.size_defaults(req))
    assert (filled.width, filled.height) == (1440, 736)  # ~1024*1024 pixels at 2:1, multiples of 32


def test_bad_inputs(t2i):
    edit = Generator.from_pretrained(EDIT, device="cpu", dtype="fp32")
    with pytest.raises(GenError, match="needs an input image"):
        edit.generate("x", num_inference_steps=1, height=32, width=32)
    with pytest.raises(GenError, match="PIL images"):
        edit.run(GenerationRequest(prompt="x", images=(np.zeros((8, 8, 3)),), num_inference_steps=1))
    with pytest.raises(GenError, match="at most 1"):
        edit.generate("x", images=[picture(32, 32, 0)] * 2, num_inference_steps=1, height=32, width=32)
    with pytest.raises(GenError, match="does not take input images"):
        t2i.generate("x", images=[picture(32, 32, 0)], num_inference_steps=1, height=32, width=32)
    with pytest.raises(GenError, match="multiple of 16"):
        t2i.generate("x", num_inference_steps=1, height=40, width=32)
    with pytest.raises(GenError, match="not a readable image"):
        edit.generate("x", images=[__file__], num_inference_steps=1, height=32, width=32)
