"""Files under --output-dir: outputs served by opaque name at /outputs/ (`url` images, web UI images and videos),
written atomically and under the job's deadline, and their retention (time to live, total size cap, stale temp files).

Video job files live in `videos/` and are the job store's (gen/server/videos.py); this module only sweeps them through
the callbacks it is given. Not HTTP.
"""
from __future__ import annotations

import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Callable

from gen.types import write_mp4


log = logging.getLogger(__name__)
OUTPUT_NAME = re.compile(r"[0-9a-f]{32}\.(png|jpeg|webp|mp4)")
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "mp4": "video/mp4"}
STALE_TEMP_SECONDS = 3600  # a temp file this old was left by a crashed writer


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into a temp file beside `path`, then rename it into place; the temp file never outlives a
    failure."""
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class Outputs:
    """`<output-dir>/outputs/<128-bit hex>.<ext>`: files a client fetches by the name it was given."""

    def __init__(self, directory: Path):
        self.dir = Path(directory) / "outputs"
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, ext: str) -> str:
        name = f"{uuid.uuid4().hex}.{ext}"
        atomic_write(self.dir / name, lambda tmp: tmp.write_bytes(data))
        return name

    def save_video(self, frames, fps: int, check: Callable[[], None]) -> str:
        name = f"{uuid.uuid4().hex}.mp4"
        atomic_write(self.dir / name, lambda tmp: write_mp4(tmp, frames, fps, check))
        return name

    def path(self, name: str) -> Path | None:
        """The file of an opaque output name (never a path from the request), or None."""
        if not OUTPUT_NAME.fullmatch(name):
            return None
        path = self.dir / name
        return path if path.is_file() else None


class Retention:
    """Removes what has outlived `ttl` seconds (None: kept), then oldest first while everything under the output
    directory's `outputs/` and `videos/` exceeds `max_bytes` (None: no cap), and temp files left by crashed writers.

    `expire_videos()` deletes expired video jobs and returns their files; `drop_video(file)` deletes the job that owns
    a file of `videos/` (when the size cap removes it) and returns the job's other files it removed."""

    def __init__(self, output_dir: Path, ttl: float | None, max_bytes: int | None,
                 expire_videos: Callable[[], list[Path]], drop_video: Callable[[Path], list[Path]], metrics=None):
        self.output_dir = Path(output_dir)
        self.ttl, self.max_bytes = ttl, max_bytes
        self.expire_videos, self.drop_video = expire_videos, drop_video
        self.metrics = metrics

    def sweep(self) -> dict[str, int]:
        """One pass; counts of files removed by reason."""
        now = time.time()
        removed = {"expired": 0, "disk_cap": 0, "stale_temp": 0}
        files: list[tuple[float, int, Path]] = []  # (mtime, size, path) of what remains
        for folder in ("outputs", "videos"):
            for entry in _scan(self.output_dir / folder):
                mtime, size, path = entry
                if path.name.startswith("."):
                    if now - mtime > STALE_TEMP_SECONDS:
                        removed["stale_temp"] += _unlink(path)
                elif folder == "outputs" and self.ttl is not None and now - mtime > self.ttl:
                    removed["expired"] += _unlink(path)
                else:
                    files.append(entry)
        if self.ttl is not None:
            gone = set()
            for path in self.expire_videos():
                removed["expired"] += _unlink(path)
                gone.add(path)
            files = [f for f in files if f[2] not in gone]
        if self.max_bytes is not None:
            total = sum(size for _, size, _ in files)
            sizes = {path: size for _, size, path in files}
            gone: set[Path] = set()
            for _, size, path in sorted(files, key=lambda f: f[0]):
                if total <= self.max_bytes:
                    break
                if path in gone:
                    continue
                if path.parent.name == "videos":
                    for other in self.drop_video(path):  # the job's other files went with it
                        if other in sizes and other not in gone:
                            gone.add(other)
                            total -= sizes[other]
                            removed["disk_cap"] += 1
                removed["disk_cap"] += _unlink(path)
                gone.add(path)
                total -= size
        if self.metrics is not None:
            for reason, n in removed.items():
                if n:
                    self.metrics.removed.labels(reason).inc(n)
        return removed


def _scan(folder: Path) -> list[tuple[float, int, Path]]:
    out = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return out
    for e in entries:
        try:
            st = e.stat()
        except FileNotFoundError:  # removed meanwhile (another replica's sweep, a delete)
            continue
        if e.is_file():
            out.append((st.st_mtime, st.st_size, Path(e.path)))
    return out


def _unlink(path: Path) -> int:
    try:
        path.unlink()
        return 1
    except FileNotFoundError:
        return 0
