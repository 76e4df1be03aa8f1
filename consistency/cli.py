"""`gen consistency run|update`: check outputs against goldens (exit 0 pass, 1 fail, 2 bad input) or (re)make goldens."""
from __future__ import annotations

import argparse
import inspect
import shlex
import time
from pathlib import Path

import numpy as np

from consistency import goldens
from consistency.artifacts import ArtifactWriter, check_artifact_dir, fmt
from consistency.cases import Case, CasesFile, load_cases
from consistency.check import CaseResult, evaluate
from consistency.thresholds import load_thresholds
from gen.types import GenError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ROOT / "assets" / "consistency" / "cases.json"
THRESHOLDS_NAME = "consistency_threshold.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    run_p = sub.add_parser("run", help="generate every case and compare it with its golden")
    update_p = sub.add_parser("update", help="(re)generate the goldens")
    for q in (run_p, update_p):
        q.add_argument("--cases", default=str(DEFAULT_CASES), help="cases file, JSON or YAML (default: %(default)s)")
        q.add_argument("--case", action="append", default=[], metavar="ID", help="only this case; repeatable")
        q.add_argument("--goldens", help="goldens folder (default: 'goldens' next to the cases file)")
        q.add_argument("--device", help="device to generate on (default: the accelerator if present; "
                                        "update --source reference: cpu)")
        q.add_argument("--dtype", help="fp32, bf16 or fp16 (default: bf16 on accelerators, fp32 on cpu)")
    run_p.add_argument("--thresholds", help=f"thresholds file (default: {THRESHOLDS_NAME} next to the cases file)")
    run_p.add_argument("--platform", help="platform override file to apply, e.g. cpu or h100 (default: detected)")
    run_p.add_argument("--artifact-dir", default="consistency-artifacts",
                       help="where failure images, per-case JSON, summary.json and index.html go (default: %(default)s)")
    run_p.add_argument("--all-frames", action="store_true", help="video: compare every frame, not first/middle/last")
    run_p.add_argument("--clip-model", help="CLIP vision checkpoint folder for the clip metric "
                                            "(default: the cases file's clip_model; none: clip is not measured)")
    update_p.add_argument("--source", choices=("gen", "reference"), default="gen",
                          help="make goldens with gen (default) or with the reference diffusers pipeline")
    update_p.add_argument("--force", action="store_true", help="overwrite existing goldens")


def run(args: argparse.Namespace) -> int:
    return {"run": run_cases, "update": update_goldens}[args.action](args)


def _goldens_root(args, cases: CasesFile) -> Path:
    return Path(args.goldens) if args.goldens else cases.path.parent / "goldens"


def update_command(args, case: Case) -> str:
    """The exact `gen consistency update` command that creates `case`'s golden."""
    cmd = ["gen", "consistency", "update"]
    if Path(args.cases).resolve() != DEFAULT_CASES:
        cmd += ["--cases", args.cases]
    if args.goldens:
        cmd += ["--goldens", args.goldens]
    cmd += ["--case", case.id]
    return shlex.join(cmd)


def check_ranks(case: Case) -> dict:
    """Keyword arguments for a multi-rank Generator, or a clear error while multi-rank runs do not exist."""
    if case.ranks == 1:
        return {}
    from gen.generator import Generator

    params = inspect.signature(Generator.from_pretrained).parameters
    if "num_gpus" not in params:
        raise GenError(f"case {case.id!r} asks for ranks={case.ranks}: multi-rank runs are not available yet "
                       "(Generator.from_pretrained has no num_gpus); use ranks 1")
    kw = {"num_gpus": case.ranks}
    for name in ("ulysses_degree", "ring_degree", "cfg_parallel"):
        if name in params and getattr(case, name):
            kw[name] = getattr(case, name)
    return kw


class _Generators:
    """Loads each (model, ranks) once per command."""

    def __init__(self, device, dtype):
        self.device, self.dtype, self.cache = device, dtype, {}

    def __call__(self, case: Case):
        from gen.generator import Generator

        key = (case.model, case.ranks)
        if key not in self.cache:
            self.cache[key] = Generator.from_pretrained(case.model, device=self.device, dtype=self.dtype,
                                                        **check_ranks(case))
        return self.cache[key]


def _generate(gens: _Generators, case: Case):
    """(frames as PIL, result) from gen; the pipeline's modality must be the case's."""
    gen = gens(case)
    if gen.modality != case.modality:
        raise GenError(f"case {case.id!r} says modality {case.modality!r} but {case.model} is a {gen.modality} model")
    result = gen.generate(**case.generate_kwargs())
    return (result.frames if case.modality == "video" else result.images), result, gen


def run_cases(args) -> int:
    cases_file = load_cases(args.cases)
    selected = cases_file.select(args.case)
    thresholds = load_thresholds(args.thresholds or cases_file.path.parent / THRESHOLDS_NAME, args.platform)
    thresholds.check_case_ids({c.id for c in cases_file.cases})
    root = _goldens_root(args, cases_file)
    for case in selected:  # every bad input is reported before any generation
        check_ranks(case)
        if not goldens.exists(root, case):
            raise GenError(f"no golden for case {case.id!r} (ranks {case.ranks}) in "
                           f"{goldens.golden_dir(root, case)}; create it with: {update_command(args, case)}")
        goldens.read_metadata(root, case)
    check_artifact_dir(args.artifact_dir)
    clip_path = args.clip_model or cases_file.clip_model
    gens = _Generators(args.device, args.dtype)
    clip = None
    if clip_path is not None:
        from consistency.metrics import ClipScorer
        from gen.device import resolve_device

        clip = ClipScorer(clip_path, resolve_device(args.device))
    writer = ArtifactWriter(Path(args.artifact_dir), {
        "cases_file": str(cases_file.path), "thresholds_files": [str(f) for f in thresholds.files],
        "platform": thresholds.platform, "goldens": str(root), "all_frames": args.all_frames,
        "clip_model": str(clip_path) if clip_path else "not configured"})
    print(f"platform {thresholds.platform}; thresholds from {', '.join(str(f) for f in thresholds.files)}; "
          f"clip: {clip_path or 'not configured'}")
    print(f"{'case':<28} {'ranks':>5} {'metric':<6} {'value':>10} {'threshold':>12}  {'frame':>5}  result")
    results = []
    for case in selected:
        golden = goldens.read_golden(root, case)
        start = time.perf_counter()
        frames, result, gen = _generate(gens, case)
        output = [np.asarray(f.convert("RGB")) for f in frames]
        r = evaluate(case, golden.frames, output, thresholds.for_case(case.id, case.modality), args.all_frames, clip)
        r.info = {"golden": {"path": str(golden.path), **golden.metadata},
                  "device": str(gen.pipeline.device), "dtype": str(gen.pipeline.dtype).removeprefix("torch."),
                  "seconds": round(time.perf_counter() - start, 3), "timings": result.timings}
        _print_result(r)
        writer.add(r)
        results.append(r)
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "error")}
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors; "
          f"report: {Path(args.artifact_dir) / 'index.html'}")
    return 2 if counts["error"] else 1 if counts["fail"] else 0


def _print_result(r: CaseResult) -> None:
    if r.status == "error":
        print(f"{r.case.id:<28} {r.case.ranks:>5} error: {r.error}")
        return
    for m in r.metrics:
        bar = "-" if m.threshold is None else f"{m.op} {fmt(m.threshold)}"
        frame = "-" if m.worst_frame is None or r.case.modality == "image" else str(m.worst_frame)
        print(f"{r.case.id:<28} {r.case.ranks:>5} {m.name:<6} {fmt(m.value):>10} {bar:>12}  {frame:>5}  "
              f"{m.name + ': ' if m.status == 'not configured' else ''}{m.status}")


def update_goldens(args) -> int:
    cases_file = load_cases(args.cases)
    selected = cases_file.select(args.case)
    root = _goldens_root(args, cases_file)
    existing = [c.id for c in selected if goldens.golden_dir(root, c).exists()]
    if existing and not args.force:
        raise GenError(f"goldens already exist for {existing} under {root}; pass --force to overwrite them")
    if args.source == "gen":
        for case in selected:
            check_ranks(case)
    gens = _Generators(args.device, args.dtype)
    for case in selected:
        start = time.perf_counter()
        if args.source == "reference":
            frames, fps, device, dtype, pipeline = _reference(case, args)
        else:
            frames, result, gen = _generate(gens, case)
            fps, pipeline = result.fps, type(gen.pipeline).__name__
            device, dtype = str(gen.pipeline.device), str(gen.pipeline.dtype).removeprefix("torch.")
        source = "reference-diffusers" if args.source == "reference" else "gen"
        path = goldens.write_golden(root, case, frames, source=source, device=device, dtype=dtype,
                                    pipeline=pipeline, fps=fps, force=args.force)
        print(f"wrote {path} ({source}, {device} {dtype}, {len(frames)} frame(s), "
              f"{time.perf_counter() - start:.1f}s)")
    return 0


def _reference(case: Case, args):
    from component_loaders.model_index import read_model_index
    from consistency.reference import run_reference
    from gen.device import resolve_device, resolve_dtype

    device = resolve_device(args.device or "cpu")
    dtype = resolve_dtype(args.dtype, device)
    class_name = read_model_index(case.model).class_name
    frames, fps = run_reference(case, class_name, device, dtype)
    if case.modality == "image" and len(frames) != 1:
        raise GenError(f"case {case.id!r}: the reference returned {len(frames)} images, expected 1")
    return frames, fps, str(device), str(dtype).removeprefix("torch."), class_name
