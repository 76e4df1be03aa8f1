"""End-to-end parity of pipelines/qwen_image21.py with diffusers' QwenImage21Pipeline on the tiny asset (fp32 CPU):
text-to-image with and without true CFG, several outputs, image-conditioned generation with one and two condition
images, the checkpoint's own sigma grid; Qwen3-VL runs on gen's LLM runtime, the reference on transformers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import psnr

import gen  # noqa: F401  (imports the package before component_loaders)
from component_loaders.qwen import load_qwen3_vl_processor
from gen import Generator, GenError, GenerationRequest
from gen.llm import LLM, registry

ASSET = Path(__file__).resolve().parents[1] / "assets" / "qwen-image21-tiny"


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def reference(path: Path = ASSET):
    import diffusers

    # transformers' Qwen3VLProcessor needs torchvision for its (unused) video half: the image-only one is passed in
    processor = load_qwen3_vl_processor(path / "processor", "Qwen3VLProcessor")
    pipe = diffusers.QwenImage21Pipeline.from_pretrained(str(path), processor=processor, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, seed: int, **kw) -> list[Image.Image]:
    with torch.no_grad():
        return pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", **kw).images


@pytest.fixture(scope="module")
def ours():
    return Generator.from_pretrained(ASSET, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def ref():
    return reference()


def assert_same(a: Image.Image, b: Image.Image) -> None:
    assert a.size == b.size and a.mode == b.mode == "RGBA"  # the VAE decodes four channels
    assert np.asarray(b).std() > 20, "the reference image is flat: the comparison would prove nothing"
    assert psnr(a, b) >= 40


def test_text_to_image_with_true_cfg(ours, ref):
    kw = dict(prompt="a red cat sitting on grass", negative_prompt="blurry", true_cfg_scale=3.0, height=64, width=96,
              num_inference_steps=2)
    a = ours.generate(seed=3, **kw).images[0]
    assert a.size == (96, 64)
    assert_same(a, run_reference(ref, 3, **kw)[0])
    # guidance is on: without the negative prompt the picture differs
    assert psnr(a, ours.generate(seed=3, **dict(kw, negative_prompt=None)).images[0]) < 30


def test_text_to_image_two_outputs_without_cfg(ours, ref):
    kw = dict(prompt="a blue dog", height=32, width=64, num_inference_steps=3)
    got = ours.generate(seed=5, num_outputs=2, **kw).images
    want = run_reference(ref, 5, num_images_per_prompt=2, **kw)
    assert len(got) == 2 and psnr(got[0], got[1]) < 30  # two different noises
    for a, b in zip(got, want):
        assert_same(a, b)


def test_condition_image(ours, ref):
    """One condition image: Qwen3-VL sees it (about 1024 x 1024 pixels, 1024 vision slots), the transformer reads its
    latents in those slots; an empty negative prompt is encoded as " "."""
    image = picture(90, 60, 0)
    kw = dict(prompt="make it blue", negative_prompt="", true_cfg_scale=2.0, height=64, width=32,
              num_inference_steps=2)
    assert_same(ours.generate(seed=7, images=[image], **kw).images[0], run_reference(ref, 7, image=image, **kw)[0])


def test_two_condition_images_smaller_resolution(ours, ref):
    """Two condition images, resized to about 384 x 384 pixels each (the reference's output_resolution, which also
    sets the default output size)."""
    images = [picture(64, 64, 1), picture(40, 80, 2)]
    kw = dict(prompt="the cat from picture one on the grass of picture two", num_inference_steps=2)
    ours.pipeline.output_resolution = 384
    try:
        got = ours.generate(seed=11, images=images, **kw).images[0]
    finally:
        ours.pipeline.output_resolution = 1024
    assert got.size == (256, 544)  # about 384 x 384 pixels at the last image's 1:2, multiples of 32
    assert_same(got, run_reference(ref, 11, image=images, output_resolution=384, **kw)[0])


def test_checkpoint_sigma_grid(tmp_path):
    """model_index.json's sample_sigmas fix the schedule: the step count defaults to its length, others are refused."""
    path = tmp_path / "model"
    shutil.copytree(ASSET, path)
    index = json.loads((path / "model_index.json").read_text())
    index["sample_sigmas"] = [1.0, 0.75, 0.4]
    (path / "model_index.json").write_text(json.dumps(index))
    gen_ = Generator.from_pretrained(path, device="cpu", dtype="fp32")
    kw = dict(prompt="a green star", height=32, width=32)
    a = gen_.generate(seed=2, **kw)
    assert a.request.num_inference_steps == 3
    assert_same(a.images[0], run_reference(reference(path), 2, **kw)[0])
    with pytest.raises(GenError, match="num_inference_steps must be 3"):
        gen_.generate(seed=2, num_inference_steps=4, **kw)


def test_encoder_is_the_shared_runtime(ours):
    """Qwen3-VL is gen's LLM, loaded once under the text encoder's path (its tokenizer read from processor/)."""
    llm = ours.pipeline.components["text_encoder"]
    assert isinstance(llm, LLM)
    assert registry.key(ASSET / "text_encoder", "cpu", torch.float32) in registry.loaded()
    assert llm.tokenizer.convert_tokens_to_ids("<|image_pad|>") == llm.config["image_token_id"]


def test_defaults_and_bad_inputs(ours):
    from stages.validate import validate_request

    pipe = ours.pipeline
    plain = validate_request(GenerationRequest(prompt="x"), pipe.size_defaults(GenerationRequest(prompt="x")))
    assert (plain.width, plain.height, plain.num_inference_steps, plain.true_cfg_scale) == (1024, 1024, 40, 1.0)
    req = GenerationRequest(prompt="x", images=(picture(200, 100, 0),))
    filled = validate_request(req, pipe.size_defaults(req))
    assert (filled.width, filled.height) == (1440, 736)  # ~1024*1024 pixels at 2:1, multiples of 32
    with pytest.raises(GenError, match="multiple of 32"):
        ours.generate("x", num_inference_steps=1, height=48, width=32)
    with pytest.raises(GenError, match="PIL images"):
        ours.run(GenerationRequest(prompt="x", images=(np.zeros((8, 8, 3)),), num_inference_steps=1))
