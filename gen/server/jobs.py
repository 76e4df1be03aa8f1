"""The video job store: one SQLite table under --output-dir, plus the MP4 files it points at (by opaque id only)."""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path

_ID = re.compile(r"video_[0-9a-f]{32}")
STATUSES = ("queued", "in_progress", "completed", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS videos (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    size TEXT NOT NULL,
    seconds TEXT NOT NULL,
    error TEXT
)
"""


class JobStore:
    """Video jobs in `<dir>/jobs.sqlite3`; content in `<dir>/videos/<id>.mp4`, written before the row says completed."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.video_dir = self.dir / "videos"
        self.video_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def video_path(self, job_id: str) -> Path:
        assert _ID.fullmatch(job_id), job_id  # ids are ours (video_<uuid hex>), never a user path
        return self.video_dir / f"{job_id}.mp4"

    def fail_unfinished(self, reason: str) -> int:
        """Mark jobs left queued or in progress by a previous process as failed; returns how many."""
        error = json.dumps({"code": "server_restarted", "message": reason})
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM videos WHERE status IN ('queued', 'in_progress')")]
            self._db.execute("UPDATE videos SET status = 'failed', error = ?, completed_at = ? "
                             "WHERE status IN ('queued', 'in_progress')", (error, int(time.time())))
        for job_id in ids:  # a file written just before a crash, with its row not yet completed
            self.video_path(job_id).unlink(missing_ok=True)
        return len(ids)

    def create(self, model: str, prompt: str, size: str, seconds: str) -> dict:
        """A new queued job with a fresh opaque id."""
        job_id = f"video_{uuid.uuid4().hex}"
        with self._lock:
            self._db.execute("INSERT INTO videos (id, model, prompt, status, created_at, size, seconds) "
                             "VALUES (?, ?, ?, 'queued', ?, ?, ?)", (job_id, model, prompt, int(time.time()), size,
                                                                      seconds))
        return self.get(job_id)

    def update(self, job_id: str, *, status: str | None = None, progress: int | None = None,
               error: dict | None = None) -> None:
        assert status is None or status in STATUSES, status
        fields: dict[str, object] = {}
        if status is not None:
            fields["status"] = status
            if status in ("completed", "failed"):
                fields["completed_at"] = int(time.time())
        if progress is not None:
            fields["progress"] = progress
        if error is not None:
            fields["error"] = json.dumps(error)
        if not fields:
            return
        sets = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE videos SET {sets} WHERE id = ?", (*fields.values(), job_id))

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM videos WHERE id = ?", (job_id,)).fetchone()
        return _as_video(row) if row is not None else None

    def list(self, limit: int = 20, after: str | None = None, order: str = "desc") -> tuple[list[dict], bool]:
        """One page of jobs by creation time (rowid breaks ties), and whether more follow."""
        assert order in ("asc", "desc"), order
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, args = "", []
        if after is not None:
            where = f"WHERE rowid {op} (SELECT rowid FROM videos WHERE id = ?)"
            args.append(after)
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM videos {where} ORDER BY rowid {direction} LIMIT ?",
                                    (*args, limit + 1)).fetchall()
        return [_as_video(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, job_id: str) -> bool:
        with self._lock:
            deleted = self._db.execute("DELETE FROM videos WHERE id = ?", (job_id,)).rowcount > 0
        if deleted:
            self.video_path(job_id).unlink(missing_ok=True)
        return deleted

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _as_video(row: sqlite3.Row) -> dict:
    """A row as OpenAI's Video object."""
    return {"id": row["id"], "object": "video", "model": row["model"], "prompt": row["prompt"],
            "status": row["status"], "progress": row["progress"], "created_at": row["created_at"],
            "completed_at": row["completed_at"], "expires_at": None, "size": row["size"], "seconds": row["seconds"],
            "remixed_from_video_id": None, "error": json.loads(row["error"]) if row["error"] else None}
