"""FLUX.2 [dev] end to end: pipelines/flux2.py Flux2Pipeline vs diffusers' Flux2Pipeline on the tiny asset (same
seed, fp32 CPU) for text-to-image and (multi-)reference editing; the Mistral 3 prompt encoding on gen's LLM runtime
vs the reference's; the PixtralProcessor folder's loader; defaults and request validation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import psnr, rel_err
from PIL import Image

from gen import GenError, Generator
from gen.llm import LLM, registry

ASSET = Path(__file__).resolve().parents[1] / "assets" / "flux2-tiny"
DISC = Path(__file__).resolve().parents[1] / "assets" / "consistency" / "inputs" / "gradient-disc.png"
# below this PSNR a reference image changed the output (in the tiny random model the 512 text tokens dominate the
# attention, so a reference image moves the picture less than a prompt does: 45-53 dB here)
TOOK_PART = 55


def reference_pipeline(asset: Path):
    """diffusers' Flux2Pipeline on the asset's components. Built by hand: from_pretrained checks the tokenizer against
    transformers' PixtralProcessor, which needs torchvision; the tokenizer is the processor folder's text half, which
    is all the reference's prompt encoding uses."""
    import diffusers
    import transformers

    from component_loaders.mistral import load_pixtral_text

    pipe = diffusers.Flux2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(asset / "scheduler")),
        vae=diffusers.AutoencoderKLFlux2.from_pretrained(str(asset / "vae")).eval(),
        text_encoder=transformers.Mistral3ForConditionalGeneration.from_pretrained(str(asset / "text_encoder")).eval(),
        tokenizer=load_pixtral_text(asset / "tokenizer", "PixtralProcessor"),
        transformer=diffusers.Flux2Transformer2DModel.from_pretrained(str(asset / "transformer")).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator.from_pretrained(ASSET, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reference():
    return reference_pipeline(ASSET)


def run_reference(pipe, seed: int, **kw):
    with torch.no_grad():
        return pipe(generator=torch.Generator("cpu").manual_seed(seed), **kw).images


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def test_text_to_image_two_outputs_match_diffusers(gen, reference):
    kw = dict(prompt="a red fox in the snow, golden hour", num_inference_steps=3, height=64, width=48,
              guidance_scale=3.0)
    ours = gen.generate(seed=3, num_outputs=2, **kw).images
    ref = run_reference(reference, 3, num_images_per_prompt=2, **kw)
    assert [im.size for im in ours] == [(48, 64)] * 2
    assert np.asarray(ref[0]).std() > 10, "flat reference: the comparison would prove nothing"
    assert all(psnr(a, b) >= 40 for a, b in zip(ours, ref))
    assert psnr(ours[0], ours[1]) < 40  # two draws, not one image twice
    other = gen.generate(seed=3, **{**kw, "guidance_scale": 1.0}).images[0]
    assert psnr(ours[0], other) < 40  # the embedded guidance changes the picture


def test_edit_one_image_default_size_matches_diffusers(gen, reference):
    """The output takes the input's size (a 100 x 72 image cut to 96 x 64, centre crop)."""
    image = noise_image(100, 72, 1)
    ours = gen.generate(prompt="make it red", images=[image], seed=5, num_inference_steps=2).images[0]
    ref = run_reference(reference, 5, image=[image], prompt="make it red", num_inference_steps=2)[0]
    assert ours.size == ref.size == (96, 64)
    assert psnr(ours, ref) >= 40
    plain = gen.generate(prompt="make it red", seed=5, num_inference_steps=2, height=64, width=96).images[0]
    assert psnr(ours, plain) < TOOK_PART  # the reference image took part


def test_multi_reference_edit_matches_diffusers(gen, reference):
    """Two reference images (time coordinates 10 and 20) at a requested output size, two outputs."""
    images = [Image.open(DISC), noise_image(70, 90, 2)]
    kw = dict(prompt="the disc on the noise", num_inference_steps=2, height=48, width=64, guidance_scale=2.5)
    ours = gen.generate(images=images, seed=9, num_outputs=2, **kw).images
    ref = run_reference(reference, 9, image=images, num_images_per_prompt=2, **kw)
    assert all(psnr(a, b) >= 40 for a, b in zip(ours, ref))
    single = gen.generate(images=images[:1], seed=9, **kw).images[0]
    assert psnr(ours[0], single) < TOOK_PART  # the second reference took part


def test_prompt_encoding_matches_reference(gen, reference):
    """The runtime's states equal Flux2Pipeline._get_mistral_3_small_prompt_embeds (transformers' Mistral 3, layers
    10, 20, 30 stacked per token, the whole 512-token padded sequence); a prompt past 512 tokens is cut the same way."""
    long = " ".join(["a red fox on the grass"] * 150)
    prompts = ["a red fox", "", "x [IMG] y", long]
    want = reference._get_mistral_3_small_prompt_embeds(reference.text_encoder, reference.tokenizer, prompts)
    got = gen.pipeline.encode(prompts)
    assert got.shape == want.shape == (4, 512, 48)
    assert rel_err(got, want) <= 1e-5
    assert len(gen.pipeline.prompt_ids(long)) == 512


def test_encoder_is_the_shared_runtime_and_tokenizer_the_processor_text(gen):
    assert isinstance(gen.pipeline.encoder, LLM)
    assert registry.key(ASSET / "text_encoder", "cpu", torch.float32) in registry.loaded()
    tok = gen.pipeline.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False)
    assert text.startswith(tok.bos_token) and "[INST]hi[/INST]" in text
    ids = gen.pipeline.prompt_ids("hi")
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # one bos, from the template


def test_defaults_and_validation(gen):
    d = gen.pipeline.defaults
    assert (d.num_inference_steps, d.guidance_scale, d.height, d.width, d.size_multiple) == (50, 4.0, 1024, 1024, 16)
    run = dict(num_inference_steps=1, height=32, width=32)
    with pytest.raises(GenError, match="true_cfg_scale=2.0: Flux2Pipeline has no true CFG"):
        gen.generate("x", true_cfg_scale=2.0, **run)
    with pytest.raises(GenError, match="negative_prompt given, but Flux2Pipeline does not use one"):
        gen.generate("x", negative_prompt="blurry", **run)
    with pytest.raises(GenError, match="input image 0 is 63 x 80: both sides must be at least 64"):
        gen.generate("x", images=[noise_image(63, 80, 0)], **run)
    with pytest.raises(GenError, match="input image 1 is 600 x 64: the aspect ratio must be at most 8:1"):
        gen.generate("x", images=[noise_image(64, 64, 0), noise_image(600, 64, 0)], **run)
    with pytest.raises(GenError, match="height must be a multiple of 16"):
        gen.generate("x", num_inference_steps=1, height=40, width=32)


def test_large_input_scaled_to_a_megapixel():
    """Inputs over 1024^2 pixels are scaled down first (the size the output then defaults to)."""
    from pipelines.flux2 import input_size, prepare_image

    image = noise_image(2000, 1000, 3)
    assert input_size(image, 16) == (1440, 720)  # 2000 x 1000 -> 1448 x 724 -> multiples of 16
    assert prepare_image(image, 16).shape == (1, 3, 720, 1440)


def test_empirical_mu_matches_reference():
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    from pipelines.flux2 import empirical_mu

    for tokens in (16, 1024, 4096, 4301, 9000):
        for steps in (1, 4, 28, 50):
            assert empirical_mu(tokens, steps) == compute_empirical_mu(tokens, steps)


def test_system_message_is_the_references():
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    from pipelines.flux2 import DEV_SYSTEM_MESSAGE

    assert DEV_SYSTEM_MESSAGE == SYSTEM_MESSAGE


def test_concurrent_generations_batched_equal_each_alone(gen):
    """Two generations in threads: their transformer calls merged along the declared batch arguments (the guidance
    included), each result as it is alone."""
    import threading

    from gen.types import GenerationRequest

    requests = [GenerationRequest(prompt=p, seed=10 + i, height=32, width=32, num_inference_steps=2, guidance_scale=g)
                for i, (p, g) in enumerate([("a red circle", 4.0), ("a small blue square in the corner", 2.0)])]
    expected = [np.asarray(gen.run(r).images[0]) for r in requests]
    batched = Generator.from_pretrained(ASSET, device="cpu", max_batch=2, batch_wait_ms=2000)
    results, start = [None, None], threading.Barrier(2)

    def work(i):
        start.wait()
        results[i] = batched.run(requests[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert batched.batch_group.stats["batched_calls"] > 0
    for r, want in zip(results, expected):
        assert psnr(np.asarray(r.images[0]), want) >= 50
