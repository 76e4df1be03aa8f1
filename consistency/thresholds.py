"""The thresholds file: per-modality defaults and per-case overrides for each metric, with per-platform override files."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from consistency.documents import Document, load_document
from gen.types import GenError

# metric -> ">=" (similarity: higher is better) or "<=" (distance: lower is better)
METRICS = {"psnr": ">=", "ssim": ">=", "mad": "<=", "clip": ">="}
SECTIONS = ("defaults", "cases")


@dataclass(frozen=True)
class Thresholds:
    """Merged thresholds: base file, then the platform file on top (metric by metric)."""

    files: tuple[Path, ...]  # the files read, base first
    platform: str
    defaults: dict[str, dict[str, float]]  # modality -> metric -> bar
    cases: dict[str, dict[str, float]]  # case id -> metric -> bar

    def for_case(self, case_id: str, modality: str) -> dict[str, float]:
        return {**self.defaults.get(modality, {}), **self.cases.get(case_id, {})}

    def check_case_ids(self, known: set[str]) -> None:
        """A per-case override for a case that does not exist is most likely a typo."""
        unknown = sorted(set(self.cases) - known)
        if unknown:
            raise GenError(f"thresholds in {', '.join(map(str, self.files))} name unknown case(s) {unknown}; "
                           f"known: {sorted(known)}")


def passes(metric: str, value: float, bar: float) -> bool:
    return value >= bar if METRICS[metric] == ">=" else value <= bar


def detect_platform() -> str:
    """'cpu' without an accelerator, else a short name of the accelerator ('h100', 'a100', ...) or its type."""
    if not torch.accelerator.is_available():
        return "cpu"
    accel = torch.accelerator.current_accelerator()
    backend = getattr(torch, accel.type, None)  # torch.cuda, torch.xpu, ... when they can name the device
    name = backend.get_device_name(accel) if hasattr(backend, "get_device_name") else ""
    m = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name.lower().replace("nvidia", ""))
    return m.group(1) if m else accel.type


def platform_file(base: Path, platform: str) -> Path:
    """consistency_threshold.json -> consistency_threshold.<platform>.json (same folder, same suffix)."""
    return base.with_name(f"{base.stem}.{platform}{base.suffix}")


def load_thresholds(path: str | Path, platform: str | None = None) -> Thresholds:
    """Read the base file and, if present, its platform override (`platform` None: detected; an explicitly
    named platform must have its file)."""
    base = Path(path)
    explicit = platform is not None
    platform = platform or detect_platform()
    if not re.fullmatch(r"[A-Za-z0-9_-]+", platform):
        raise GenError(f"--platform must be a short name like 'cpu' or 'h100', got {platform!r}")
    defaults: dict[str, dict[str, float]] = {}
    cases: dict[str, dict[str, float]] = {}
    files = [base]
    _merge(load_document(base, "thresholds"), defaults, cases)
    override = platform_file(base, platform)
    if override.is_file():
        _merge(load_document(override, "thresholds"), defaults, cases)
        files.append(override)
    elif explicit:
        present = sorted(p.name for p in base.parent.glob(f"{base.stem}.*{base.suffix}"))
        raise GenError(f"no thresholds file for platform {platform!r}: {str(override)!r} does not exist "
                       f"(present: {present or 'none'})")
    return Thresholds(tuple(files), platform, defaults, cases)


def _merge(doc: Document, defaults: dict, cases: dict) -> None:
    """Validate `doc` ({"defaults": {modality: {metric: bar}}, "cases": {id: {metric: bar}}}) and merge it in."""
    if not isinstance(doc.data, dict):
        raise doc.error((), "a thresholds file must be a mapping with 'defaults' and/or 'cases'")
    for section in doc.data:
        if section not in SECTIONS:
            raise doc.error((section,), f"unknown section; expected {list(SECTIONS)}")
    for section, target in (("defaults", defaults), ("cases", cases)):
        entries = doc.data.get(section) or {}
        if not isinstance(entries, dict):
            raise doc.error((section,), "must be a mapping")
        for name, bars in entries.items():
            if section == "defaults" and name not in ("image", "video"):
                raise doc.error((section, name), "defaults are per modality: 'image' or 'video'")
            if not isinstance(bars, dict):
                raise doc.error((section, name), f"must be a mapping of metric -> threshold, got {bars!r}")
            for metric, bar in bars.items():
                if metric not in METRICS:
                    raise doc.error((section, name, metric), f"unknown metric; known: {sorted(METRICS)}")
                if isinstance(bar, bool) or not isinstance(bar, (int, float)):
                    raise doc.error((section, name, metric), f"threshold must be a number, got {bar!r}")
                target.setdefault(str(name), {})[metric] = float(bar)
