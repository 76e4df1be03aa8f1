"""Failure artifacts: side-by-side PNGs with a metrics header and a difference heatmap, per-case JSON, summary.json,
index.html. Not the comparison itself (check.py)."""
from __future__ import annotations

import html
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from consistency.check import CaseResult
from gen.types import GenError

RED, GREEN, GREY, BLACK, WHITE = (200, 0, 0), (0, 130, 0), (110, 110, 110), (0, 0, 0), (255, 255, 255)
STATUS_COLOR = {"pass": GREEN, "fail": RED, "error": RED, "no threshold": GREY, "not configured": GREY}
FONT_SIZE, LINE, GAP, MIN_PANEL = 14, 20, 10, 256
# a perceptual dark-to-bright colour map (inferno-like stops) for the difference heatmap
_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def check_artifact_dir(path: str | Path) -> Path:
    """Create the folder if needed and prove it is writable, before any generation."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise GenError(f"artifact dir {str(path)!r} is not writable ({e.strerror or e}); pass a writable "
                       "--artifact-dir") from None
    return path


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def jsonable(value):
    """inf / nan as strings ("inf"), since JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def heatmap(golden: np.ndarray, output: np.ndarray) -> tuple[np.ndarray, float]:
    """|golden - output| averaged over channels, coloured from black (0) to pale yellow (its max); returns (rgb, max)."""
    d = np.abs(golden.astype(np.float64) - output.astype(np.float64)).mean(axis=-1)  # (H, W)
    vmax = float(d.max())
    t = d / vmax if vmax > 0 else d
    pos = t * (len(_STOPS) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(_STOPS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _STOPS[lo] * (1 - frac) + _STOPS[lo + 1] * frac
    return rgb.round().astype(np.uint8), vmax


def _font(size: int = FONT_SIZE):
    return ImageFont.load_default(size=size)


def _segments(draw: ImageDraw.ImageDraw, xy: tuple[int, int], parts: list[tuple[str, tuple]], font) -> None:
    """Draw coloured text pieces one after another on a line."""
    x, y = xy
    for text, color in parts:
        draw.text((x, y), text, fill=color, font=font)
        x += int(draw.textlength(text, font=font))


def _metric_parts(r: CaseResult, values: dict | None = None) -> list[tuple[str, tuple]]:
    """'psnr 23.41 (>= 40.00) FAIL' pieces for every metric; `values` (one frame's) replaces the worst values."""
    parts = []
    for m in r.metrics:
        if m.status == "not configured":
            parts.append((f"{m.name}: not configured   ", GREY))
            continue
        value = values[m.name] if values is not None else m.value
        ok = m.threshold is None or (value >= m.threshold if m.op == ">=" else value <= m.threshold)
        bar = f" ({m.op} {fmt(m.threshold)})" if m.threshold is not None and values is None else ""
        verdict = "" if values is not None else f" {m.status.upper()}" if m.threshold is not None else ""
        parts.append((f"{m.name} {fmt(value)}{bar}{verdict}   ", BLACK if ok else RED))
    return parts


def side_by_side(r: CaseResult, platform: str) -> tuple[Image.Image, dict]:
    """The failure picture: header, then per compared frame golden | output | heatmap. Returns (image, layout)."""
    h, w = r.golden_frames[0].shape[:2]
    scale = max(1, math.ceil(MIN_PANEL / min(h, w)))
    pw, ph = w * scale, h * scale
    font, bold = _font(), _font(FONT_SIZE + 2)
    meta = r.info.get("golden", {})
    vers = meta.get("versions", {})
    header = [
        [(f"{r.status.upper()}  ", STATUS_COLOR[r.status]), (f"case {r.case.id}", BLACK)],
        [(f"modality {r.case.modality}   ranks {r.case.ranks}   platform {platform}   seed {r.case.seed}", BLACK)],
        [(f"golden: {meta.get('source', '?')} on {meta.get('device', '?')} {meta.get('dtype', '?')} "
          f"(torch {vers.get('torch', '?')}, diffusers {vers.get('diffusers', '?')})   "
          f"output: gen on {r.info.get('device', '?')} {r.info.get('dtype', '?')}", GREY)],
        [("worst over compared frames: ", BLACK)] + _metric_parts(r),
    ]
    rows_top = GAP + LINE * len(header) + GAP + LINE  # header, then the column titles
    row_h = LINE + ph + GAP
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(sum(probe.textlength(t, font=font) for t, _ in line) for line in header)
    width = int(max(3 * pw + 4 * GAP, text_w + 2 * GAP))
    canvas = Image.new("RGB", (width, rows_top + row_h * len(r.golden_frames)), WHITE)
    draw = ImageDraw.Draw(canvas)
    y = GAP
    for i, line in enumerate(header):
        _segments(draw, (GAP, y), line, bold if i == 0 else font)
        y += LINE
    y += GAP
    xs = [GAP + k * (pw + GAP) for k in range(3)]
    for x, title in zip(xs, ("golden", "output (gen)", "|golden - output|")):
        draw.text((x, y), title, fill=BLACK, font=bold)
    panels = []
    for k, (g, o, f) in enumerate(zip(r.golden_frames, r.output_frames, r.frames)):
        top = rows_top + k * row_h
        heat, vmax = heatmap(g, o)
        label = [(f"frame {f['index']}: " if r.case.modality == "video" else "", BLACK)]
        _segments(draw, (GAP, top), label + _metric_parts(r, f["values"]) + [(f"max |diff| {vmax:.0f}", GREY)], font)
        boxes = {}
        for x, name, arr in zip(xs, ("golden", "output", "diff"), (g, o, heat)):
            im = Image.fromarray(arr).resize((pw, ph), Image.NEAREST)
            canvas.paste(im, (x, top + LINE))
            boxes[name] = [x, top + LINE, x + pw, top + LINE + ph]
        panels.append({"frame": f["index"], **boxes, "diff_max": vmax})
    return canvas, {"scale": scale, "panels": panels}


def result_dict(r: CaseResult) -> dict:
    return {
        "case": r.case.id, "safe_id": r.case.safe_id, "modality": r.case.modality, "ranks": r.case.ranks,
        "status": r.status, "error": r.error,
        "metrics": {m.name: {"value": m.value, "threshold": m.threshold, "op": m.op, "status": m.status,
                             "worst_frame": m.worst_frame} for m in r.metrics},
        "frames": r.frames, **r.info,
    }


class ArtifactWriter:
    """Writes <name>.json for every case, <name>.png for failures, and rewrites summary.json and index.html after
    each case (so an interrupted run still leaves a readable report)."""

    def __init__(self, path: Path, run_info: dict):
        self.path = check_artifact_dir(path)
        self.run_info = run_info
        self.results: list[dict] = []

    def add(self, r: CaseResult) -> dict:
        name = f"{r.case.safe_id}.ranks-{r.case.ranks}"
        d = result_dict(r)
        d["artifacts"] = {"json": f"{name}.json"}
        if r.status == "fail":
            image, layout = side_by_side(r, self.run_info.get("platform", "?"))
            image.save(self.path / f"{name}.png", format="PNG")
            d["artifacts"]["side_by_side"] = f"{name}.png"
            d["layout"] = layout
        self._write(f"{name}.json", json.dumps(jsonable(d), indent=2))
        self.results.append(d)
        counts = {s: sum(x["status"] == s for x in self.results) for s in ("pass", "fail", "error")}
        summary = {**self.run_info, "counts": counts, "results": self.results}
        self._write("summary.json", json.dumps(jsonable(summary), indent=2))
        self._write("index.html", index_html(summary))
        return d

    def _write(self, name: str, text: str) -> None:
        try:
            (self.path / name).write_text(text + "\n", encoding="utf-8")
        except OSError as e:
            raise GenError(f"cannot write artifact {self.path / name}: {e.strerror or e}") from None


def index_html(summary: dict) -> str:
    """One page: run info, a table of every case, then each failure with its side-by-side image."""
    e = html.escape
    counts = summary["counts"]
    rows, sections = [], []
    for d in summary["results"]:
        status = d["status"]
        link = f'<a href="#{e(d["safe_id"])}-{d["ranks"]}">{e(d["case"])}</a>' if status != "pass" else e(d["case"])
        worst = ", ".join(f'{k} {fmt(v["value"])}' for k, v in d["metrics"].items() if v["value"] is not None)
        rows.append(f'<tr class="{status}"><td>{link}</td><td>{e(d["modality"])}</td><td>{d["ranks"]}</td>'
                    f'<td>{status.upper()}</td><td>{e(d["error"] or worst)}</td></tr>')
        if status == "pass":
            continue
        body = f'<p class="error">{e(d["error"])}</p>' if d["error"] else ""
        if d["metrics"]:
            mrows = "".join(
                f'<tr class="{v["status"].replace(" ", "-")}"><td>{e(k)}</td><td>{fmt(v["value"])}</td>'
                f'<td>{e(v["op"])} {fmt(v["threshold"])}</td><td>{e(v["status"])}</td>'
                f'<td>{"-" if v["worst_frame"] is None else v["worst_frame"]}</td></tr>'
                for k, v in d["metrics"].items())
            body += ("<table><tr><th>metric</th><th>worst value</th><th>threshold</th><th>result</th>"
                     f"<th>worst frame</th></tr>{mrows}</table>")
        image = d["artifacts"].get("side_by_side")
        if image:
            body += f'<p><a href="{e(image)}"><img src="{e(image)}" alt="golden vs output for {e(d["case"])}"></a></p>'
        body += f'<p><a href="{e(d["artifacts"]["json"])}">all values (JSON)</a></p>'
        sections.append(f'<section id="{e(d["safe_id"])}-{d["ranks"]}"><h2>{e(d["case"])} '
                        f'(ranks {d["ranks"]}): {status.upper()}</h2>{body}</section>')
    info = "".join(f"<li>{e(k)}: {e(str(v))}</li>" for k, v in summary.items() if k not in ("counts", "results"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>gen consistency: {counts['fail']} failed, {counts['error']} errors</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #111; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
tr.fail td, tr.error td, p.error {{ color: #c00; font-weight: bold; }}
tr.pass td {{ color: #070; }}
tr.not-configured td, tr.no-threshold td {{ color: #777; }}
img {{ max-width: 100%; image-rendering: pixelated; border: 1px solid #ccc; }}
section {{ margin-top: 2em; }}
</style></head><body>
<h1>gen consistency: {counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors</h1>
<ul>{info}</ul>
<table><tr><th>case</th><th>modality</th><th>ranks</th><th>result</th><th>worst values / error</th></tr>
{''.join(rows)}</table>
{''.join(sections) or '<p>No failures.</p>'}
</body></html>"""
