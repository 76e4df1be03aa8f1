"""Judges one case: compares the chosen frames of output and golden, applies the thresholds. Not file I/O."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from consistency.cases import Case
from consistency.metrics import ClipScorer, compare
from consistency.thresholds import METRICS, passes


@dataclass
class MetricResult:
    name: str
    value: float | None  # the worst value over the compared frames; None: not measured
    threshold: float | None  # None: no threshold configured (reported, not judged)
    worst_frame: int | None
    status: str  # "pass", "fail", "no threshold" or "not configured"

    @property
    def op(self) -> str:
        return METRICS[self.name]


@dataclass
class CaseResult:
    case: Case
    status: str  # "pass", "fail" or "error"
    error: str | None = None
    metrics: list[MetricResult] = field(default_factory=list)
    frames: list[dict] = field(default_factory=list)  # [{"index": i, "values": {metric: value}}]
    golden_frames: list[np.ndarray] = field(default_factory=list)  # the compared frames only
    output_frames: list[np.ndarray] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # golden metadata, output device / dtype / seconds


def compared_indices(count: int, all_frames: bool) -> list[int]:
    """All frames, or the first, middle and last (one for images)."""
    if all_frames:
        return list(range(count))
    return sorted({0, count // 2, count - 1})


def frame_size_error(golden: list[np.ndarray], output: list[np.ndarray]) -> str | None:
    """Why output and golden cannot be compared (frame count or size), or None."""
    if len(golden) != len(output):
        return f"golden has {len(golden)} frame(s), output has {len(output)}"
    gh, gw = golden[0].shape[:2]
    oh, ow = output[0].shape[:2]
    if (gh, gw) != (oh, ow):
        return (f"golden is {gw}x{gh} but the output is {ow}x{oh} (width x height); "
                "fix the case's size or regenerate the golden with `gen consistency update --force`")
    return None


def evaluate(case: Case, golden: list[np.ndarray], output: list[np.ndarray], bars: dict[str, float],
             all_frames: bool, clip: ClipScorer | None) -> CaseResult:
    """Metrics on every compared frame; the case passes only when every judged metric passes on every frame."""
    error = frame_size_error(golden, output)
    if error is not None:
        return CaseResult(case, "error", error=error)
    idx = compared_indices(len(golden), all_frames)
    frames = [{"index": i, "values": compare(golden[i], output[i], clip)} for i in idx]
    metrics = []
    for name, op in METRICS.items():
        bar = bars.get(name)
        if name == "clip" and clip is None:
            metrics.append(MetricResult(name, None, bar, None, "not configured"))
            continue
        values = [(f["values"][name], f["index"]) for f in frames]
        value, worst = (min if op == ">=" else max)(values, key=lambda v: v[0])  # first worst frame
        status = "no threshold" if bar is None else ("pass" if passes(name, value, bar) else "fail")
        metrics.append(MetricResult(name, value, bar, worst, status))
    failed = any(m.status == "fail" for m in metrics)
    return CaseResult(case, "fail" if failed else "pass", metrics=metrics, frames=frames,
                      golden_frames=[golden[i] for i in idx], output_frames=[output[i] for i in idx])
