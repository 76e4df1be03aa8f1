"""Shared by the LoRA parity tests: diffusers' pipeline with `load_lora_weights` + `set_adapters` (the reference) and
the check that ours equals it (PSNR >= 40 dB) and that the LoRA visibly changes the picture."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import WanPipeline

from helpers import psnr

ASSETS = Path(__file__).resolve().parents[1] / "assets"
LORAS = ASSETS / "loras"


def first(result):
    return result.frames[0] if result.frames is not None else result.images[0]


class Reference:
    """One diffusers pipeline, LoRAs loaded per case and unloaded after."""

    def __init__(self, cls, path=None, pipe=None):
        """`cls.from_pretrained(path)`, or `pipe`: one built by hand (FLUX.2, Qwen-Image 2.1: see their tests)."""
        self.pipe = pipe if pipe is not None else cls.from_pretrained(path)
        self.pipe.set_progress_bar_config(disable=True)
        self.video = cls is WanPipeline

    def __call__(self, loras, **kw):
        names = []
        for i, (file, scale, *target) in enumerate(loras):
            into_2 = dict(load_into_transformer_2=True) if target and target[0] == "transformer_2" else {}
            self.pipe.load_lora_weights(str(file), adapter_name=f"l{i}", **into_2)
            names.append(f"l{i}")
        try:
            if names:
                self.pipe.set_adapters(names, [lora[1] for lora in loras])
            seed = kw.pop("seed")
            if self.video:
                kw["output_type"] = "pil"
            out = self.pipe(generator=torch.Generator("cpu").manual_seed(seed), **kw)
            return out.frames[0][0] if self.video else out.images[0]
        finally:
            if names:
                self.pipe.unload_lora_weights()


class Parity:
    """Ours (one Generator, its no-LoRA picture computed once) against the reference."""

    def __init__(self, ours, ref: Reference, kw: dict):
        self.ours, self.ref, self.kw = ours, ref, kw
        self.base = first(ours.generate(**kw, loras=[]))

    def check(self, loras, changed_below: float, **kw):
        kw = {**self.kw, **kw}
        base = self.base if kw == self.kw else first(self.ours.generate(**kw, loras=[]))
        got = first(self.ours.generate(**kw, loras=loras))
        want = self.ref([(Path(f), s, *t) for f, s, *t in loras], **dict(kw))
        assert psnr(got, want) >= 40, loras
        assert psnr(got, base) < changed_below, loras  # the LoRA does something
