"""`gen generate` as a user runs it: a real subprocess, output files, exit codes, no partial files."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from gen.cli import main

GEN = [sys.executable, "-m", "gen.cli"]
SMALL = ["--height", "32", "--width", "48", "--num-inference-steps", "2"]


def test_generate_with_embedded_default(tmp_path):
    out = tmp_path / "out.png"
    proc = subprocess.run(GEN + ["generate", "--prompt", "a red circle", "--seed", "3", "--output", str(out)] + SMALL,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "seed 3" in proc.stdout
    assert "denoising" in proc.stderr  # the progress bar
    with Image.open(out) as im:
        assert im.size == (48, 32) and im.format == "PNG"


def test_generate_defaults_and_formats(tmp_path, flux_dev_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model-path", str(flux_dev_path), "--prompt", "x", "--num-inference-steps", "1"]) == 0
    with Image.open(tmp_path / "out.png") as im:  # default output name, default size of the model
        assert im.size == (128, 128)
    assert main(["generate", "--prompt", "x", "--output", "a.jpg"] + SMALL) == 0
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.format == "JPEG"


@pytest.mark.parametrize("args, message", [
    (["--height", "50"], "height must be a multiple of 16, got 50"),
    (["--num-inference-steps", "0"], "num_inference_steps must be between 1 and 1000, got 0"),
    (["--model-path", "/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
    (["--output", "/nonexistent-dir/x.png"], "output directory '/nonexistent-dir' does not exist"),
    (["--output", "out.gif"], "image output must end in .png, .jpg or .webp"),
    (["--image", "missing.png"], "input image 'missing.png' does not exist"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--num-frames", "5"], "num_frames is only valid for video models"),
])
def test_bad_input_exit_2_one_line_no_file(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    code = main(["generate", "--prompt", "x", "--height", "32", "--width", "32", "--num-inference-steps", "1"] + args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not [p for p in tmp_path.iterdir() if p.is_file()]  # nothing written, not even a temp file


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--seed", "abc", "--prompt", "x"])
    assert info.value.code == 2
    assert "invalid int value: 'abc'" in capsys.readouterr().err


def test_broken_model_folders(tmp_path, flux_dev_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(flux_dev_path, model)
    (model / "model_index.json").write_text((model / "model_index.json").read_text()
                                           .replace("FluxPipeline", "FooPipeline"))
    assert main(["generate", "--model-path", str(model), "--prompt", "x"]) == 2
    assert "unknown pipeline class 'FooPipeline'" in capsys.readouterr().err
    (model / "model_index.json").write_text("{ not json")
    assert main(["generate", "--model-path", str(model), "--prompt", "x"]) == 2
    assert "is not valid JSON (line 1" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    assert main(["generate", "--prompt", "x", "--output", str(ro / "x.png")] + SMALL) == 2
    assert "is not writable" in capsys.readouterr().err


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """An error while writing the file (image or video) leaves neither the output nor a temp file behind."""
    import gen.types
    from gen.types import GenerationResult

    def broken_write(fp, *a, **k):
        Path(fp).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(gen.types, "_write_bytes", broken_write)
    monkeypatch.setattr(gen.types, "write_mp4", broken_write)
    for result, name in ((GenerationResult(seed=0, images=[Image.new("RGB", (8, 8))]), "x.png"),
                         (GenerationResult(seed=0, frames=[Image.new("RGB", (8, 8))] * 2, fps=8), "x.mp4")):
        with pytest.raises(OSError, match="disk full"):
            result.save(tmp_path / name)
        assert list(tmp_path.iterdir()) == []


def test_outputs_are_lossless_and_encoded_quicker(tmp_path):
    """PNG outputs (CLI/API files and server responses) use zlib level 4: the same pixels back, and no bigger than
    PIL's default level 6 on a smooth image by more than a few percent."""
    import io

    import numpy as np

    from gen.server.schemas import encode_image
    from gen.types import GenerationResult

    y, x = np.mgrid[0:256, 0:256]
    rng = np.random.default_rng(0)
    pixels = np.stack([x, y, (x + y) // 2], -1).astype(np.int16) + rng.integers(-3, 4, (256, 256, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    path = GenerationResult(seed=0, images=[image]).save(tmp_path / "x.png")
    served = encode_image(image, "png", None)
    default = io.BytesIO()
    image.save(default, format="PNG")
    for data in (path.read_bytes(), served):
        with Image.open(io.BytesIO(data)) as im:
            assert np.array_equal(np.asarray(im), np.asarray(image))
        assert len(data) <= 1.1 * default.tell()
    assert served != default.getvalue()  # not PIL's default encoding
