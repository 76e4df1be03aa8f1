"""UniPC multistep sampling over flow-matching sigmas (the scheduler Wan2.1 / Wan2.2 checkpoints ship), with a step
that never reads device data on the host.

diffusers' `UniPCMultistepScheduler` keeps its sigma table on the CPU, copies entries to the device with blocking
copies and solves the corrector's small linear system on the device (a sync for its error check): 5 host-device
syncs per step on a GPU. Here `set_timesteps` computes every per-step coefficient on the host, in float64, from the
host sigma schedule (the predictor's and corrector's B(h) weights, the rho vectors from those small systems, the
orders), so `step` is a handful of elementwise tensor ops with Python-float scalars: nothing waits for the device.
The math is UniPC's (Zhao et al. 2023, B(h) variants) in the data-prediction form on the flow schedule
alpha = 1 - sigma; the reference for numerics is diffusers' class (same sigmas, timesteps and steps within fp32
rounding).

Supported (`unsupported(config)` lists what is not): `use_flow_sigmas` with `prediction_type="flow_prediction"`
and `predict_x0`, `solver_type` bh1 / bh2, any `solver_order`, `lower_order_final`, `disable_corrector`,
`flow_shift`, `shift_terminal`, `final_sigmas_type` zero / sigma_min, custom `sigmas` in `set_timesteps`. The beta
options (`beta_*`, `trained_betas`, `rescale_betas_zero_snr`), `timestep_spacing`, `steps_offset`, `sigma_min/max`
and the thresholding ratios do not change a flow-sigma schedule and are accepted. Not supported: other prediction
types or sigma schedules (Karras / exponential / beta), thresholding (a quantile of x0 each step), `solver_p`,
`use_dynamic_shifting` (needs `mu`, which no Wan pipeline passes), bh1 or `lower_order_final=False` with a zero
final sigma (the reference's last step is not finite there), and options this file does not know. For those the
component loader uses diffusers' class instead, with a warning naming the options (not a refusal: its output is the
reference's, only with its syncs). Building `UniPCScheduler` directly from such a config raises ValueError naming
them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gen.config import config_from_dict, read_json


@dataclass(frozen=True)
class UniPCConfig:
    """scheduler_config.json of a `UniPCMultistepScheduler`; defaults are diffusers' (so absent keys mean the same)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    solver_p: Any = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    sigma_min: float | None = None
    sigma_max: float | None = None
    shift_terminal: float | None = None

    def get(self, key: str, default: Any = None) -> Any:
        """dict-style read, as code written for diffusers' config does (`scheduler.config.get(...)`)."""
        return getattr(self, key, default)


_KEYS = {f.name for f in dataclasses.fields(UniPCConfig)}


def unsupported(config: dict | UniPCConfig) -> list[str]:
    """What in `config` (a scheduler_config.json's content or a UniPCConfig) this scheduler does not implement, each
    named with its value; empty when it is supported."""
    found = []
    if isinstance(config, dict):
        found = [f"unknown option {k}={v!r}" for k, v in config.items() if not k.startswith("_") and k not in _KEYS]
        config = config_from_dict(UniPCConfig, config)
    c = config
    wanted = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "predict_x0": True, "thresholding": False,
              "solver_p": None, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
              "use_dynamic_shifting": False}
    found += [f"{k}={getattr(c, k)!r} (only {v!r})" for k, v in wanted.items() if getattr(c, k) != v]
    if c.solver_type not in ("bh1", "bh2"):
        found.append(f"solver_type={c.solver_type!r} (only 'bh1' or 'bh2')")
    if not isinstance(c.solver_order, int) or isinstance(c.solver_order, bool) or c.solver_order < 1:
        return found + [f"solver_order={c.solver_order!r} (a positive integer)"]
    if c.final_sigmas_type not in ("zero", "sigma_min"):
        found.append(f"final_sigmas_type={c.final_sigmas_type!r} (only 'zero' or 'sigma_min')")
    elif c.final_sigmas_type == "zero" and c.solver_type == "bh1":
        found.append("solver_type='bh1' with final_sigmas_type='zero' (the reference's last step is not finite)")
    elif c.final_sigmas_type == "zero" and not c.lower_order_final and c.solver_order > 1:
        found.append("lower_order_final=False with final_sigmas_type='zero' (the reference's last step is not finite)")
    if not isinstance(c.disable_corrector, tuple) or not all(isinstance(i, int) for i in c.disable_corrector):
        found.append(f"disable_corrector={c.disable_corrector!r} (step indices)")
    for k in ("flow_shift", "num_train_timesteps"):
        v = getattr(c, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            found.append(f"{k}={v!r} (a positive number)")
    if c.shift_terminal is not None and not (isinstance(c.shift_terminal, (int, float)) and 0 <= c.shift_terminal < 1):
        found.append(f"shift_terminal={c.shift_terminal!r} (in [0, 1))")
    return found


@dataclass(frozen=True)
class Update:
    """One linear update on the x0 history `xs` (newest first):
    out = a * x - b * xs[base] - sum(c * (xs[j] - xs[base]) for j, c in diffs)."""

    a: float
    b: float
    base: int
    diffs: tuple[tuple[int, float], ...]

    def __call__(self, x: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
        m0 = xs[self.base]
        out = self.a * x - self.b * m0
        for j, c in self.diffs:
            out = out - c * (xs[j] - m0)
        return out.to(x.dtype)


@dataclass(frozen=True)
class StepPlan:
    """Step i: x0 = sample - sigma * v; `correct` (UniC, from the previous step's input and x0s; None on the first
    step and where disabled) replaces the sample; `predict` (UniP) gives the next sample."""

    sigma: float
    correct: Update | None
    predict: Update


@dataclass
class StepOutput:
    prev_sample: torch.Tensor


def rounded(x: float, dtype: torch.dtype) -> float:
    """`x` rounded to `dtype` on the host (nearest, ties to even). The reference multiplies the model output by a
    0-dim float32 sigma tensor, which torch casts to the output's dtype first: with a bf16 output (a GPU run) the
    sigma itself is rounded to bf16, and matching the reference means doing the same."""
    if dtype == torch.bfloat16:
        bits = int(np.array(x, dtype=np.float32).view(np.uint32))
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return float(np.array(bits, dtype=np.uint32).view(np.float32))
    if dtype == torch.float16:
        return float(np.float16(np.float32(x)))
    return float(np.float32(x)) if dtype == torch.float32 else x


def _lam(s: np.float64) -> np.float64:
    """log-SNR of a flow sigma: log(alpha) - log(sigma), alpha = 1 - sigma (inf at sigma 0)."""
    return np.log1p(-s) - np.log(s)


def _update(sig: np.ndarray, t: int, s0: int, hist: list[int], corrector: bool, bh1: bool) -> Update:
    """The update from sigma index `s0` to `t` with the earlier points `hist` (sigma indices, newest first) of UniP
    (corrector False) or UniC (True), order len(hist) + 1. Coefficients in float64: the B(h) weights b, the system
    R rho = b (rho_p: its leading block; order 2 predictor / order 1 corrector: rho = 0.5), then each difference
    term's weight alpha_t B(h) rho_k / r_k folded into one number."""
    order = len(hist) + 1
    st, ss = np.float64(sig[t]), np.float64(sig[s0])
    alpha_t = 1 - st
    h = _lam(st) - _lam(ss)  # inf into a zero final sigma; 0 into a repeated sigma_min (ratios below then NaN)
    rks = [(_lam(np.float64(sig[k])) - _lam(ss)) / h for k in hist] + [np.float64(1)]
    hh = -h  # data prediction
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B_h = hh if bh1 else np.expm1(hh)
    R, b, fact = [], [], 1
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, b = np.array(R), np.array(b)
    if corrector:
        rho = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
    else:
        rho = [] if order == 1 else [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    w = alpha_t * B_h
    # x0 history seen by the update: predictor [x0_s0, x0_hist...]; corrector [x0_t, x0_s0, x0_hist...]
    off = 1 if corrector else 0
    diffs = [(off + 1 + k, w * rho[k] / rks[k]) for k in range(order - 1)]
    if corrector:
        diffs.append((0, w * rho[-1]))
    return Update(a=float(st / ss), b=float(alpha_t * h_phi_1), base=off,
                  diffs=tuple((j, float(c)) for j, c in diffs))


def flow_sigmas(config: UniPCConfig, steps: int | None, sigmas=None) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas float32 (n + 1,) ending with the final sigma, timesteps float64 (n,)) as the reference computes them:
    1 -> 1/T (or the given sigmas) shifted by flow_shift, stretched to shift_terminal, the first nudged below 1."""
    if sigmas is not None:
        s = np.array(sigmas, dtype=np.float64)
        if s.ndim != 1 or len(s) == 0:
            raise ValueError(f"sigmas must be a non-empty list of numbers, got {sigmas!r}")
    else:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")
        s = np.linspace(1, 1 / config.num_train_timesteps, steps + 1)[:-1]
    shift = config.flow_shift
    s = shift * s / (1 + (shift - 1) * s)
    if config.shift_terminal:
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
    if abs(s[0] - 1) < 1e-6:  # alpha = 0 would make log(alpha) -inf in the first updates
        s[0] -= 1e-6
    timesteps = s * config.num_train_timesteps
    last = 0.0 if config.final_sigmas_type == "zero" else s[-1]
    return np.concatenate([s, [last]]).astype(np.float32), timesteps


def plan_steps(config: UniPCConfig, sig: np.ndarray) -> list[StepPlan]:
    """Every step's coefficients from the float32 sigma table (n + 1 entries), on the host. Orders as the
    reference's: warm-up (step i has i earlier x0s), capped by solver_order, and lowered toward the end with
    lower_order_final; the corrector at step i has the previous step's order."""
    n, so, bh1 = len(sig) - 1, config.solver_order, config.solver_type == "bh1"
    orders = [min(so, n - i if config.lower_order_final else so, i + 1) for i in range(n)]
    plans = []
    with np.errstate(all="ignore"):  # the last step's infinities, as the reference's float math has them
        for i in range(n):
            correct = None
            if i > 0 and i - 1 not in config.disable_corrector:
                hist = [i - 1 - k for k in range(1, orders[i - 1])]
                correct = _update(sig, i, i - 1, hist, corrector=True, bh1=bh1)
            predict = _update(sig, i + 1, i, [i - k for k in range(1, orders[i])], corrector=False, bh1=bh1)
            plans.append(StepPlan(sigma=float(sig[i]), correct=correct, predict=predict))
    for i, p in enumerate(plans):
        for u in (p.predict, p.correct):
            if u is not None:
                assert all(map(math.isfinite, (u.a, u.b, *(c for _, c in u.diffs)))), (i, p)
    return plans


class UniPCScheduler:
    """Drop-in for diffusers' `UniPCMultistepScheduler` where a pipeline uses it: `set_timesteps`, `timesteps`,
    `sigmas` (host), `set_begin_index`, `step`, `scale_model_input`, `config`. `step` counts its calls: the k-th
    call after `set_timesteps` is step k, whatever `timestep` it is passed (the reference does the same once its
    begin index is set to 0, as stages/timesteps.py does)."""

    order = 1  # model calls per step, as diffusers' pipelines read it
    init_noise_sigma = 1.0

    def __init__(self, config: UniPCConfig):
        problems = unsupported(config)
        if problems:
            raise ValueError(f"UniPCScheduler does not support {'; '.join(problems)}")
        self.config = config
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None  # (n + 1,) float32, on the host
        self.num_inference_steps: int | None = None
        self.plans: list[StepPlan] = []
        self._index: int | None = None
        self._x0: list[torch.Tensor] = []  # converted model outputs, newest first
        self._last: torch.Tensor | None = None  # the previous step's (corrected) input sample

    @classmethod
    def from_config(cls, config: dict) -> UniPCScheduler:
        return cls(_from_dict(config))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> UniPCScheduler:
        return cls.from_config(read_json(Path(folder) / "scheduler_config.json"))

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas=None, mu: float | None = None) -> None:
        if mu is not None:
            raise ValueError(f"mu={mu!r} given but use_dynamic_shifting is not supported by UniPCScheduler")
        sig, timesteps = flow_sigmas(self.config, num_inference_steps, sigmas)
        self.sigmas = torch.from_numpy(sig)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)  # truncated, as the reference
        self.num_inference_steps = len(timesteps)
        self.plans = plan_steps(self.config, sig)
        self._index, self._x0, self._last = None, [], None

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Only 0: a schedule entered midway would need the reference's warm-up orders recomputed from there."""
        if begin_index != 0:
            raise ValueError(f"UniPCScheduler starts at step 0, got begin_index={begin_index!r}")

    @property
    def step_index(self) -> int | None:
        return self._index

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """The sample at the next timestep from the model's velocity `model_output` at `sample`."""
        if self.num_inference_steps is None:
            raise RuntimeError("UniPCScheduler.step called before set_timesteps")
        if self._index is None:
            self._index = 0
        if self._index >= self.num_inference_steps:
            raise RuntimeError(f"UniPCScheduler.step called for step {self._index + 1} of a "
                               f"{self.num_inference_steps}-step schedule")
        plan = self.plans[self._index]
        x0 = sample - rounded(plan.sigma, model_output.dtype) * model_output
        xs = [x0, *self._x0]
        if plan.correct is not None:
            sample = plan.correct(self._last, xs)
        self._x0 = xs[: self.config.solver_order]
        self._last = sample
        prev = plan.predict(sample, xs)
        self._index += 1
        return StepOutput(prev) if return_dict else (prev,)


def _from_dict(data: dict) -> UniPCConfig:
    unknown = [k for k in data if not k.startswith("_") and k not in _KEYS]
    if unknown:
        raise ValueError(f"UniPCScheduler does not know the options {unknown}")
    return config_from_dict(UniPCConfig, data)
