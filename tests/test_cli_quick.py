"""`gen generate` is quick and forgiving: checks that need no model answer before it loads (and before torch is
imported), any prompt bytes are accepted, several outputs come from one load, outputs get the user's umask, `gen
--version`, the tiny video checkpoints run small by default, and .gitignore covers what the tools write."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from gen.cli import main
from gen.types import GenerationResult

GEN = [sys.executable, "-m", "gen.cli"]
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--height", "32", "--width", "32", "--num-inference-steps", "2"]


@pytest.fixture(scope="module")
def torch_refused(tmp_path_factory) -> dict:
    """An environment in which importing torch fails: a process that answers in it never imported torch."""
    shim = tmp_path_factory.mktemp("shim") / "torch"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ImportError('gen imported torch before answering')\n")
    path = os.pathsep.join(p for p in (str(shim.parent), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


@pytest.mark.parametrize("args, message", [
    (["--height", "50"], "height must be a multiple of 16, got 50"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**63), got -1"),
    (["--prompt", "   "], "prompt must be a non-empty string"),
    (["--output", "out.gif"], "image output must end in .png, .jpg or .webp"),
    (["--output", "no-such-dir/x.png"], "output directory 'no-such-dir' does not exist"),
    (["--num-inference-steps", "0"], "num_inference_steps must be between 1 and 1000, got 0"),
    (["--num-frames", "6"], "num_frames must be 4k+1"),
    (["--num-images", "0"], "num-images must be between 1 and 1000"),
    (["--prompts-file", "missing.txt"], "prompts file 'missing.txt' cannot be read"),
    (["--kernel-tuning"], "kernel_tuning tunes the compiled blocks' kernels: add compile"),
])
def test_checks_that_need_no_model_answer_at_once(tmp_path, torch_refused, args, message):
    base = [] if any(a.startswith("--prompt") for a in args) else ["--prompt", "a red circle"]
    start = time.perf_counter()
    proc = subprocess.run(GEN + ["generate"] + base + args, capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env=torch_refused)  # no torch import (so no model load)
    took = time.perf_counter() - start
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert took < 10.0, took  # about 0.2 s here; the bound only catches a hang (CI's cores are busy)
    assert not list(tmp_path.iterdir())


def test_version(capsys):
    from gen import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"gen {__version__}"


def test_prompt_bytes_that_are_not_utf8_are_replaced(tmp_path, capsys):
    out = tmp_path / "x.png"
    # a real process: argv bytes that are not UTF-8 reach Python as surrogate escapes only there
    proc = subprocess.run(GEN + ["generate", "--prompt", b"a red \xff\xfe circle", "--seed", "1", "--output", str(out)]
                          + SMALL, capture_output=True, cwd=tmp_path, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "not UTF-8 were replaced" in err and out.is_file()
    prompts = tmp_path / "prompts.txt"  # a file's bytes are read the same way in any process: in this one
    prompts.write_bytes(b"a blue \xc3 square\n")
    assert main(["generate", "--prompts-file", str(prompts), "--output", str(tmp_path / "y.png")] + SMALL) == 0
    assert "not UTF-8 were replaced" in capsys.readouterr().err and (tmp_path / "y.png").is_file()


def test_several_prompts_and_images_from_one_load(tmp_path, monkeypatch, capsys):
    from gen.generator import Generator

    loads = []
    real = Generator.from_pretrained.__func__
    monkeypatch.setattr(Generator, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: loads.append(a) or real(cls, *a, **kw)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle at the top left on a blue background\n\n"
                       "a large yellow star in the center on a purple background\n")
    code = main(["generate", "--prompts-file", str(prompts), "--num-images", "2", "--seed", "5",
                 "--output", str(tmp_path / "o.png")] + SMALL)
    out = capsys.readouterr().out
    assert code == 0 and len(loads) == 1
    names = sorted(p.name for p in tmp_path.glob("o-*.png"))
    assert names == ["o-1.png", "o-2.png", "o-3.png", "o-4.png"]
    assert [line.split("(seed ")[1].split(";")[0] for line in out.splitlines() if line.startswith("wrote")] == \
        ["5", "6", "5", "6"]
    with Image.open(tmp_path / "o-1.png") as a, Image.open(tmp_path / "o-3.png") as b:
        assert a.tobytes() != b.tobytes()  # different prompts


def test_enhanced_prompt_is_printed_and_out_of_domain_warned(tmp_path, capsys, caplog):
    code = main(["generate", "--prompt", "a photo of a cat", "--enhance-prompt", "--seed", "2",
                 "--output", str(tmp_path / "cat.png")] + SMALL)
    captured = capsys.readouterr()
    assert code == 0
    assert "revised prompt: a " in captured.out and " background" in captured.out
    assert [r.message for r in caplog.records if "draws colored shapes only" in r.message]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_get_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = GenerationResult(seed=0, images=[Image.new("RGB", (8, 8))]).save(tmp_path / "a.png")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_tiny_video_checkpoints_default_to_seconds():
    from gen.generator import Generator

    gen = Generator.from_pretrained(ROOT / "assets" / "wan-t2v-tiny")
    d = gen.defaults
    assert (d.height, d.width, d.num_frames, d.num_inference_steps) == (32, 48, 9, 4)
    start = time.perf_counter()
    result = gen.generate("a cat", seed=0)
    assert len(result.frames) == 9 and result.frames[0].size == (48, 32)
    assert time.perf_counter() - start < 30


def test_gitignore_covers_what_the_tools_write_by_default():
    paths = ["out.png", "out-1.png", "out.mp4", "out.jpg", "gen-outputs/jobs.db", "consistency-artifacts/case/x.png",
             ".shapes/pack/part-0/encoder.pt"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == sorted(paths)
