"""Wan pipelines end to end on the tiny assets: same seed -> same frames as diffusers (fp32 CPU), errors, `gen generate`."""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import psnr
from PIL import Image

from gen.cli import main as gen_main
from gen.generator import Generator
from gen.types import GenError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
T2V, I2V, A14B = ASSETS / "wan-t2v-tiny", ASSETS / "wan-i2v-tiny", ASSETS / "wan22-a14b-tiny"
ARGS = dict(prompt="a red cat on the grass", negative_prompt="blue", height=32, width=48, num_frames=5,
            num_inference_steps=2, guidance_scale=4.0)
SEED = 7


def input_image(h: int = 40, w: int = 56) -> Image.Image:
    x = np.arange(h * w * 3).reshape(h, w, 3)
    return Image.fromarray(((x * 7) % 251).astype(np.uint8))


def reference_frames(pipe_cls, path: Path, monkeypatch, **kw) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 from the diffusers pipeline, rounded as its PIL output rounds."""
    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v_module

    # diffusers' I2V prompt cleaning calls ftfy unconditionally; ftfy.fix_text leaves our ASCII prompts unchanged.
    monkeypatch.setattr(i2v_module, "ftfy", types.SimpleNamespace(fix_text=lambda s: s), raising=False)
    pipe = pipe_cls.from_pretrained(str(path))
    out = pipe(**kw, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").frames[0]
    return (out * 255).round().astype(np.uint8)


def assert_same_frames(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ref.std() > 1.0, "reference frames are flat: the comparison would prove nothing"
    worst = min(psnr(a, b) for a, b in zip(ours, ref))
    assert worst >= 40.0, worst


@pytest.fixture(scope="module")
def t2v() -> Generator:
    return Generator.from_pretrained(T2V, device="cpu")


@pytest.fixture(scope="module")
def i2v() -> Generator:
    return Generator.from_pretrained(I2V, device="cpu")


def test_t2v_matches_diffusers(t2v, monkeypatch):
    from diffusers import WanPipeline

    result = t2v.generate(seed=SEED, **ARGS)
    assert result.modality == "video" and len(result.frames) == 5 and result.fps == 16
    assert result.frames[0].size == (48, 32)
    assert_same_frames(result.frames_array(), reference_frames(WanPipeline, T2V, monkeypatch, **ARGS))


def test_i2v_matches_diffusers(i2v, monkeypatch):
    from diffusers import WanImageToVideoPipeline

    image = input_image()
    result = i2v.generate(seed=SEED, images=image, **ARGS)
    ref = reference_frames(WanImageToVideoPipeline, I2V, monkeypatch, image=image, **ARGS)
    assert_same_frames(result.frames_array(), ref)
    other = i2v.generate(seed=SEED, images=input_image(24, 24).transpose(Image.Transpose.ROTATE_90), **ARGS)
    assert np.abs(other.frames_array().astype(int) - result.frames_array()).max() > 0, "the image is ignored"


def test_two_experts_match_diffusers_and_switch_at_boundary(monkeypatch):
    from diffusers import WanPipeline

    gen = Generator.from_pretrained(A14B, device="cpu")
    calls = {"transformer": 0, "transformer_2": 0}
    for slot in calls:
        gen.pipeline.components[slot].register_forward_hook(lambda *_, s=slot: calls.__setitem__(s, calls[s] + 1))
    kw = dict(ARGS, num_inference_steps=3)  # flow_shift 12: t = 999, 960 (high-noise expert), 857 (< 875: low-noise)
    result = gen.generate(seed=SEED, **kw)
    assert calls == {"transformer": 4, "transformer_2": 2}  # two steps and one step, each with CFG
    assert_same_frames(result.frames_array(), reference_frames(WanPipeline, A14B, monkeypatch, **kw))


@pytest.mark.parametrize("change, param, value", [
    (dict(num_frames=6), "num_frames", "6"),
    (dict(num_frames=0), "num_frames", "0"),
    (dict(height=40), "height", "40"),
    (dict(width=50), "width", "50"),
    (dict(num_outputs=2), "n", "2"),
])
def test_bad_video_requests(t2v, change, param, value):
    with pytest.raises(GenError, match=value) as err:
        t2v.generate(seed=0, **{**ARGS, **change})
    assert err.value.param == param


def test_image_errors(t2v, i2v):
    with pytest.raises(GenError, match="does not take input images"):
        t2v.generate(seed=0, images=input_image(), **ARGS)
    with pytest.raises(GenError, match="needs an input image"):
        i2v.generate(seed=0, **ARGS)
    with pytest.raises(GenError, match="one input image, got 2"):  # Wan2.1 I2V has no last-frame (FLF2V) embedding
        i2v.generate(seed=0, images=[input_image(), input_image()], **ARGS)
    with pytest.raises(GenError, match="got 3 images"):
        i2v.generate(seed=0, images=[input_image()] * 3, **ARGS)


def test_cli_writes_mp4(tmp_path):
    import imageio.v2 as imageio

    out = tmp_path / "clip.mp4"
    rc = gen_main(["generate", "--model-path", str(T2V), "--prompt", "a cat", "--seed", "1", "--num-frames", "5",
                   "--fps", "8", "--height", "32", "--width", "48", "--num-inference-steps", "1", "--output", str(out)])
    assert rc == 0 and out.is_file()
    reader = imageio.get_reader(str(out), format="FFMPEG")
    try:
        frames = [f for f in reader]
        assert reader.get_meta_data()["fps"] == 8
    finally:
        reader.close()
    assert len(frames) == 5 and frames[0].shape == (32, 48, 3)


def test_cli_bad_frames_writes_nothing(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    rc = gen_main(["generate", "--model-path", str(T2V), "--prompt", "a cat", "--num-frames", "8",
                   "--height", "32", "--width", "32", "--output", str(out)])
    assert rc == 2 and not out.exists()
    assert "num_frames must be 4k+1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def ti2v_folders(tmp_path_factory) -> Path:
    """A tiny Wan2.2 TI2V-5B layout (48-channel VAE with 2x2 patching, 16x spatial; expand_timesteps) as
    WanPipeline and WanImageToVideoPipeline folders, written by diffusers' save_pretrained."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline

    from assets.builders.wan import text_parts, tiny_transformer, unipc

    root = tmp_path_factory.mktemp("ti2v")
    parts = text_parts()
    torch.manual_seed(0)
    parts["vae"] = AutoencoderKLWan(base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                    temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                                    out_channels=12, patch_size=2, scale_factor_spatial=16,
                                    latents_mean=[0.1] * 48, latents_std=[1.5] * 48).eval()
    transformer = tiny_transformer(6, in_channels=48, out_channels=48)
    for name, cls in (("t2v", WanPipeline), ("i2v", WanImageToVideoPipeline)):
        cls(**parts, scheduler=unipc(5.0), transformer=transformer, expand_timesteps=True).save_pretrained(root / name)
    return root


@pytest.mark.parametrize("name", ["t2v", "i2v"])
def test_ti2v_expand_timesteps_matches_diffusers(ti2v_folders, name, monkeypatch):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    path = ti2v_folders / name
    kw = dict(ARGS, height=64, width=32)
    extra = dict(image=input_image()) if name == "i2v" else {}
    gen = Generator.from_pretrained(path, device="cpu")
    ours = gen.generate(seed=SEED, images=extra.get("image"), **kw).frames_array()
    cls = WanImageToVideoPipeline if name == "i2v" else WanPipeline
    assert_same_frames(ours, reference_frames(cls, path, monkeypatch, **kw, **extra))
    with pytest.raises(GenError, match="multiple of 32, got 48"):  # 16x VAE x 2x2 patches
        gen.generate(seed=0, images=extra.get("image"), **dict(kw, height=48))


def test_first_last_frame_matches_diffusers(tmp_path, monkeypatch):
    """FLF2V: an I2V transformer with `pos_embed_seq_len` takes a first and a last frame (diffusers' `last_image`)."""
    from diffusers import WanImageToVideoPipeline

    from assets.builders.wan import HEAD_DIM, HEADS, IMAGE_DIM, tiny_transformer

    pipe = WanImageToVideoPipeline.from_pretrained(str(I2V))
    pipe.transformer = tiny_transformer(7, in_channels=36, image_dim=IMAGE_DIM, added_kv_proj_dim=HEADS * HEAD_DIM,
                                        pos_embed_seq_len=2 * 17)  # 17 CLIP tokens per image
    pipe.save_pretrained(tmp_path)
    first, last = input_image(), input_image(30, 30)
    kw = dict(ARGS, num_frames=9)
    gen = Generator.from_pretrained(tmp_path, device="cpu")
    ours = gen.generate(seed=SEED, images=[first, last], **kw).frames_array()
    assert_same_frames(ours, reference_frames(WanImageToVideoPipeline, tmp_path, monkeypatch, image=first,
                                              last_image=last, **kw))
    with pytest.raises(GenError, match="a first and a last frame, got 1"):
        gen.generate(seed=0, images=first, **kw)
