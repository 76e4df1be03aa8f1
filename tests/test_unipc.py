"""Our sync-free UniPC (gen/schedulers/unipc.py) against diffusers' UniPCMultistepScheduler: the same timesteps and
sigmas, every step's output within 1e-5 (fp32) on Wan2.1 / Wan2.2 configs, no host read or host->device copy in a
step (checked op by op on the meta device), the loader's choice, and a Wan generation against diffusers'."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import psnr
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gen.schedulers.unipc import UniPCConfig, UniPCScheduler, unsupported
from gen.types import GenError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
WAN21 = json.loads((ASSETS / "wan-t2v-tiny" / "scheduler" / "scheduler_config.json").read_text())
WAN22 = json.loads((ASSETS / "wan22-a14b-tiny" / "scheduler" / "scheduler_config.json").read_text())
# a config as an older diffusers (0.33) writes it for Wan2.1: no time_shift_type / use_dynamic_shifting / sigma_* keys
WAN21_OLD = {k: v for k, v in WAN21.items()
             if k not in ("time_shift_type", "use_dynamic_shifting", "sigma_min", "sigma_max", "shift_terminal")}
CONFIGS = {
    "wan2.1 shift 3": dict(WAN21, flow_shift=3.0),
    "wan2.1 shift 5": dict(WAN21, flow_shift=5.0),
    "wan2.1 (diffusers 0.33 keys)": WAN21_OLD,
    "wan2.2 a14b shift 12": WAN22,
    "wan2.2 shift 5": dict(WAN22, flow_shift=5.0),
    "wan2.2 shift 3": dict(WAN22, flow_shift=3.0),
}
VARIANTS = {  # options the Wan checkpoints do not use but the implementation covers
    "order 1": dict(WAN21, solver_order=1),
    "order 3": dict(WAN21, solver_order=3),
    "bh1, sigma_min": dict(WAN21, solver_type="bh1", final_sigmas_type="sigma_min"),
    "no lower_order_final, sigma_min": dict(WAN21, lower_order_final=False, final_sigmas_type="sigma_min"),
    "corrector off at 0 and 3": dict(WAN21, disable_corrector=[0, 3]),
    "shift_terminal": dict(WAN21, shift_terminal=0.1),
}


def step_errors(config: dict, steps: int, dtype=torch.float32, sigmas=None) -> list[float]:
    """Both schedulers over the same schedule with the same model outputs (random, and depending on the sample as a
    model's would); each step's relative error of ours against diffusers'."""
    from diffusers import UniPCMultistepScheduler

    ref, ours = UniPCMultistepScheduler.from_config(config), UniPCScheduler.from_config(config)
    for s in (ref, ours):
        s.set_timesteps(None if sigmas is not None else steps, sigmas=sigmas)
        s.set_begin_index(0)
    assert torch.equal(ours.timesteps, ref.timesteps), (ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas), (ours.sigmas, ref.sigmas)
    g = torch.Generator().manual_seed(steps)
    x_ref = torch.randn(1, 4, 3, 6, 8, generator=g)
    x_ours = x_ref.clone()
    errors = []
    for t in ref.timesteps:
        v = (torch.randn(x_ref.shape, generator=g) + 0.5 * x_ref).to(dtype)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x_ours = ours.step(v, t, x_ours, return_dict=False)[0]
        assert x_ours.dtype == x_ref.dtype and torch.isfinite(x_ref).all()
        errors.append(((x_ours - x_ref).norm() / x_ref.norm()).item())
    return errors


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 40, 50])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_steps_match_diffusers(name, steps):
    errors = step_errors(CONFIGS[name], steps)
    assert len(errors) == steps
    assert max(errors) <= 1e-5, errors


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_match_diffusers(name):
    assert unsupported(VARIANTS[name]) == []
    errors = step_errors(VARIANTS[name], 12)
    assert max(errors) <= 1e-5, errors


def test_custom_sigmas_and_bf16_model_output_match_diffusers():
    errors = step_errors(WAN21, 0, sigmas=np.array([1.0, 0.8, 0.55, 0.3, 0.1]))
    assert len(errors) == 5 and max(errors) <= 1e-5, errors
    # on the GPU the model's output is bf16 and the latents fp32: the same mixed arithmetic as the reference
    errors = step_errors(WAN22, 10, dtype=torch.bfloat16)
    assert max(errors) <= 1e-5, errors


class DeviceReads(TorchDispatchMode):
    """Every op that would make the host wait for the device: a tensor read into a Python number, a data-dependent
    shape, or a host tensor taking part (a host->device copy, a host tensor in a device op)."""

    READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "masked_select", "unique_consecutive",
             "_unique2", "_linalg_check_errors"}

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = func.overloadpacket.__name__
        devices = {a.device.type for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        if name in self.READS or "cpu" in devices or kwargs.get("device") not in (None, torch.device("meta")):
            self.found.append(f"{func} on {sorted(devices)}")
        return func(*args, **kwargs)


def run_on_meta(scheduler, steps: int) -> DeviceReads:
    """The step loop on meta tensors (no data exists there: any host read raises), every op watched."""
    scheduler.set_timesteps(steps, device="meta")
    scheduler.set_begin_index(0)
    x = torch.empty(1, 16, 5, 30, 52, device="meta")
    watch = DeviceReads()
    for t in scheduler.timesteps:
        v = torch.empty_like(x, dtype=torch.bfloat16)
        with watch:
            x = scheduler.step(v, t, x, return_dict=False)[0]
    assert x.device.type == "meta" and x.shape == (1, 16, 5, 30, 52) and x.dtype == torch.float32
    return watch


@pytest.mark.parametrize("config", [WAN21, WAN22, VARIANTS["order 3"]], ids=["wan2.1", "wan2.2", "order 3"])
def test_step_reads_nothing_from_the_device(config):
    watch = run_on_meta(UniPCScheduler.from_config(config), 8)
    assert watch.ops > 8 * 4, watch.ops  # the watch saw the steps' arithmetic
    assert watch.found == [], watch.found[:5]


def test_the_device_read_check_catches_diffusers_step():
    """The same check on diffusers' step finds its host->device copies (its sigma table lives on the CPU)."""
    from diffusers import UniPCMultistepScheduler

    watch = run_on_meta(UniPCMultistepScheduler.from_config(WAN21), 8)
    assert any("_to_copy" in f and "cpu" in f for f in watch.found), watch.found[:5]


def test_unsupported_options_are_named():
    assert unsupported(WAN21) == [] and unsupported(WAN22) == [] and unsupported(WAN21_OLD) == []
    found = unsupported(dict(WAN21, thresholding=True, use_karras_sigmas=True, prediction_type="epsilon",
                             brand_new_option=1))
    assert "unknown option brand_new_option=1" in found
    assert any(f.startswith("thresholding=True") for f in found)
    assert any(f.startswith("use_karras_sigmas=True") for f in found)
    assert any(f.startswith("prediction_type='epsilon'") for f in found)
    assert any("bh1" in f for f in unsupported(dict(WAN21, solver_type="bh1")))
    assert any("lower_order_final" in f for f in unsupported(dict(WAN21, lower_order_final=False)))
    assert any("solver_order" in f for f in unsupported(dict(WAN21, solver_order="2")))
    with pytest.raises(ValueError, match="thresholding=True"):
        UniPCScheduler.from_config(dict(WAN21, thresholding=True))
    with pytest.raises(ValueError, match="brand_new_option"):
        UniPCScheduler.from_config(dict(WAN21, brand_new_option=1))


def test_misuse_raises():
    s = UniPCScheduler.from_config(WAN21)
    x = torch.zeros(1, 4, 1, 2, 2)
    with pytest.raises(RuntimeError, match="before set_timesteps"):
        s.step(x, 0, x)
    for bad in (0, -3, 2.5, None):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(bad)
    with pytest.raises(ValueError, match="mu=0.5"):
        s.set_timesteps(4, mu=0.5)
    with pytest.raises(ValueError, match="begin_index=2"):
        s.set_begin_index(2)
    s.set_timesteps(2)
    s.step(x, 0, x)
    assert s.step(x, 0, x).prev_sample.shape == x.shape
    with pytest.raises(RuntimeError, match="step 3 of a 2-step"):
        s.step(x, 0, x)
    s.set_timesteps(2)  # a new schedule starts over
    assert s.step_index is None and s.step(x, 0, x, return_dict=False)[0].shape == x.shape
    assert s.config.get("use_flow_sigmas") is True and s.config.num_train_timesteps == 1000
    assert isinstance(s.config, UniPCConfig)


def test_loader_picks_ours_or_diffusers_with_a_warning(tmp_path, caplog):
    from diffusers import UniPCMultistepScheduler

    from component_loaders import LOADERS

    load = LOADERS[("diffusers", "UniPCMultistepScheduler")]
    for asset in ("wan-t2v-tiny", "wan-i2v-tiny", "wan22-a14b-tiny"):
        assert type(load(ASSETS / asset / "scheduler", "UniPCMultistepScheduler")) is UniPCScheduler
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(dict(WAN21, use_karras_sigmas=True)))
    with caplog.at_level(logging.WARNING):
        s = load(folder, "UniPCMultistepScheduler")
    assert type(s) is UniPCMultistepScheduler and s.config.use_karras_sigmas
    assert "use_karras_sigmas=True" in caplog.text and "diffusers" in caplog.text
    (folder / "scheduler_config.json").write_text("{not json")
    with pytest.raises(GenError, match="scheduler_config.json"):
        load(folder, "UniPCMultistepScheduler")
    with pytest.raises(GenError, match="missing|does not exist"):
        load(tmp_path / "nowhere", "UniPCMultistepScheduler")


def test_wan_generation_with_ours_matches_diffusers(monkeypatch):
    """Four steps (the order-2 predictor and corrector run; the pipeline tests' two steps stay at order 1), CFG."""
    from diffusers import WanPipeline

    from gen.generator import Generator

    folder = ASSETS / "wan-t2v-tiny"
    gen = Generator.from_pretrained(folder, device="cpu")
    assert type(gen.pipeline.components["scheduler"]) is UniPCScheduler
    args = dict(prompt="a red cat on the grass", negative_prompt="blue", height=32, width=48, num_frames=5,
                num_inference_steps=4, guidance_scale=4.0)
    ours = gen.generate(seed=3, **args).frames_array()
    pipe = WanPipeline.from_pretrained(str(folder))
    ref = pipe(**args, generator=torch.Generator("cpu").manual_seed(3), output_type="np").frames[0]
    ref = (ref * 255).round().astype(np.uint8)
    assert ours.shape == ref.shape and ref.std() > 1.0
    assert min(psnr(a, b) for a, b in zip(ours, ref)) >= 40.0


def test_sync_check_scheduler_comparison_runs_on_cpu(tmp_path):
    from benchmarks.sync_check import main

    result = main(["--tiny", "--no-pipelines", "--out", str(tmp_path / "sync.json")])
    u = json.loads((tmp_path / "sync.json").read_text())["unipc_step"]
    assert u == result["unipc_step"] and u["steps"] == 40
    assert u["ours"]["class"] == "UniPCScheduler" and u["diffusers"]["class"] == "UniPCMultistepScheduler"
    assert u["ours"]["syncs"] == 0 and u["ours"]["ms_per_step"] > 0 and u["diffusers"]["ms_per_step"] > 0
    assert 0 < u["max_rel_err"] <= 1e-5
