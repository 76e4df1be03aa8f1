"""The video job store: rows of video jobs (a durable queue that workers claim with leases), their input images, the
webhook deliveries they owe, and the replicas sharing it. One interface, `JobStore` (shared SQL); two implementations:
SQLite (`<output-dir>/jobs.sqlite3`, the default) here, PostgreSQL in jobs_pg.py (stores.open_store picks by URL).

Not the files (gen/server/videos.py writes and removes them; a row only names its file, relative to --output-dir) and
not HTTP. Times are Unix seconds from the store's clock (the database server's, for PostgreSQL).
"""
from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

VIDEO_ID = re.compile(r"video_[0-9a-f]{32}")
STATUSES = ("queued", "in_progress", "completed", "failed")
COLUMNS = {  # what `dump` reads and `load` writes, table by table (the order a migration copies them in)
    "videos": ("id", "model", "prompt", "status", "progress", "created_at", "completed_at", "size", "seconds", "error",
               "params", "webhook_url", "worker", "lease_until", "attempts", "expires_at", "file"),
    "video_inputs": ("video_id", "position", "data"),
    "webhooks": ("id", "video_id", "url", "body", "attempts", "next_at"),
}
LEGACY_ERROR = {"code": "server_restarted",
                "message": "the server stopped before this job finished; submit it again"}


class StoreUnavailable(RuntimeError):
    """The job store cannot be reached (HTTP 503 until it is back)."""


class JobStore:
    """Video jobs in SQL. Subclasses give the connection, the dialect and `_now`; everything else is shared SQL with
    `?` placeholders (the subclass's `_sql` rewrites them if its driver wants another style)."""

    order_column = "rowid"  # creation order

    # --- the dialect: a subclass fills these in

    def _tx(self) -> contextlib.AbstractContextManager:
        """A transaction yielding a cursor-like object with execute / fetchone / fetchall."""
        raise NotImplementedError

    def _now(self, c) -> float:
        """The store's clock, inside transaction `c`."""
        raise NotImplementedError

    def _claim_sql(self) -> str:
        """SELECT the id of the oldest queued job of model ? (and nothing else a concurrent claimer holds)."""
        raise NotImplementedError

    def _upsert_replica_sql(self) -> str:
        return ("INSERT INTO replicas (id, model, queue_depth, running, seen_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET model = excluded.model, queue_depth = excluded.queue_depth, "
                "running = excluded.running, seen_at = excluded.seen_at")

    def _sql(self, sql: str) -> str:
        return sql

    def close(self) -> None:
        raise NotImplementedError

    def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot be reached."""
        with self._tx() as c:
            c.execute("SELECT 1")

    def _run(self, c, sql: str, args: tuple = ()):
        c.execute(self._sql(sql), args)
        return c

    # --- jobs

    def create(self, *, model: str, prompt: str, params: dict, inputs: list[bytes], size: str, seconds: str,
               webhook_url: str | None = None) -> dict:
        """A new queued job with a fresh opaque id; `params` is the validated request a worker will run."""
        job_id = f"video_{uuid.uuid4().hex}"
        with self._tx() as c:
            self._run(c, "INSERT INTO videos (id, model, prompt, status, progress, created_at, size, seconds, params, "
                         "webhook_url, attempts) VALUES (?, ?, ?, 'queued', 0, ?, ?, ?, ?, ?, 0)",
                      (job_id, model, prompt, int(self._now(c)), size, seconds, json.dumps(params), webhook_url))
            for i, data in enumerate(inputs):
                self._run(c, "INSERT INTO video_inputs (video_id, position, data) VALUES (?, ?, ?)", (job_id, i, data))
            row = self._run(c, "SELECT * FROM videos WHERE id = ?", (job_id,)).fetchone()
        return as_video(row)

    def get(self, job_id: str) -> dict | None:
        with self._tx() as c:
            row = self._run(c, "SELECT * FROM videos WHERE id = ?", (job_id,)).fetchone()
        return as_video(row) if row is not None else None

    def row(self, job_id: str) -> dict | None:
        """The raw row (worker, lease, file, ...), for the worker and tests."""
        with self._tx() as c:
            row = self._run(c, "SELECT * FROM videos WHERE id = ?", (job_id,)).fetchone()
        return dict(row) if row is not None else None

    def list(self, limit: int = 20, after: str | None = None, order: str = "desc") -> tuple[list[dict], bool]:
        """One page of jobs in creation order, and whether more follow."""
        assert order in ("asc", "desc"), order
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        col = self.order_column
        where, args = "", []
        if after is not None:
            where = f"WHERE {col} {op} (SELECT {col} FROM videos WHERE id = ?)"
            args.append(after)
        with self._tx() as c:
            rows = self._run(c, f"SELECT * FROM videos {where} ORDER BY {col} {direction} LIMIT ?",
                             (*args, limit + 1)).fetchall()
        return [as_video(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, job_id: str) -> tuple[bool, str | None]:
        """Remove the job, its inputs and undelivered webhooks: (whether it existed, its file relative to the output
        directory or None)."""
        with self._tx() as c:
            row = self._run(c, "SELECT file FROM videos WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return False, None
            self._run(c, "DELETE FROM video_inputs WHERE video_id = ?", (job_id,))
            self._run(c, "DELETE FROM webhooks WHERE video_id = ?", (job_id,))
            self._run(c, "DELETE FROM videos WHERE id = ?", (job_id,))
        return True, row["file"]

    def queued(self, model: str) -> int:
        with self._tx() as c:
            row = self._run(c, "SELECT COUNT(*) AS n FROM videos WHERE model = ? AND status = 'queued'",
                            (model,)).fetchone()
        return int(row["n"])

    # --- the worker's side: claim, renew, finish

    def claim(self, model: str, worker: str, lease: float) -> dict | None:
        """Take the oldest queued job of `model` for `worker` until now + `lease` (renewed by `renew`): its row with
        `inputs` (bytes of each input image), or None."""
        with self._tx() as c:
            row = self._run(c, self._claim_sql(), (model,)).fetchone()
            if row is None:
                return None
            job_id = row["id"]
            now = self._now(c)
            self._run(c, "UPDATE videos SET status = 'in_progress', worker = ?, lease_until = ?, progress = 0, "
                         "attempts = attempts + 1 WHERE id = ?", (worker, now + lease, job_id))
            job = dict(self._run(c, "SELECT * FROM videos WHERE id = ?", (job_id,)).fetchone())
            job["inputs"] = [bytes(r["data"]) for r in self._run(
                c, "SELECT data FROM video_inputs WHERE video_id = ? ORDER BY position", (job_id,)).fetchall()]
        return job

    def renew(self, job_id: str, worker: str, lease: float, progress: int | None = None) -> bool:
        """Extend `worker`'s lease (and set progress); False when the job is gone or no longer `worker`'s."""
        with self._tx() as c:
            sets, args = "lease_until = ?", [self._now(c) + lease]
            if progress is not None:
                sets += ", progress = ?"
                args.append(progress)
            n = self._run(c, f"UPDATE videos SET {sets} WHERE id = ? AND worker = ? AND status = 'in_progress'",
                          (*args, job_id, worker)).rowcount
        return n > 0

    def complete(self, job_id: str, worker: str, file: str, ttl: float | None) -> bool:
        """Mark `worker`'s job completed with its file written; False when it was deleted or taken (then the caller
        removes the file)."""
        return self._finish(job_id, worker, "completed", ttl, file=file)

    def fail(self, job_id: str, worker: str, error: dict, ttl: float | None) -> bool:
        return self._finish(job_id, worker, "failed", ttl, error=error)

    def release(self, job_id: str, worker: str) -> bool:
        """Put `worker`'s job back in the queue (shutdown): not counted as an attempt."""
        with self._tx() as c:
            n = self._run(c, "UPDATE videos SET status = 'queued', worker = NULL, lease_until = NULL, progress = 0, "
                             "attempts = attempts - 1 WHERE id = ? AND worker = ? AND status = 'in_progress'",
                          (job_id, worker)).rowcount
        return n > 0

    def _finish(self, job_id: str, worker: str | None, status: str, ttl: float | None, *, file: str | None = None,
                error: dict | None = None, lease_ended_by: float | None = None, c=None) -> bool:
        """End a queued or running job: `worker`'s own (when given), or one whose lease ended by `lease_ended_by`."""
        if c is None:
            with self._tx() as c:
                return self._finish(job_id, worker, status, ttl, file=file, error=error, lease_ended_by=lease_ended_by,
                                    c=c)
        now = int(self._now(c))
        expires = now + int(ttl) if ttl else None
        where, args = "", []
        if worker is not None:
            where, args = " AND worker = ?", [worker]
        if lease_ended_by is not None:
            where, args = where + " AND (lease_until IS NULL OR lease_until < ?)", args + [lease_ended_by]
        n = self._run(c, "UPDATE videos SET status = ?, progress = ?, completed_at = ?, expires_at = ?, file = ?, "
                         f"error = ?, worker = NULL, lease_until = NULL WHERE id = ? "
                         f"AND status IN ('queued', 'in_progress'){where}",
                      (status, 100 if status == "completed" else self._progress_of(c, job_id), now, expires, file,
                       json.dumps(error) if error else None, job_id, *args)).rowcount
        if n and (url := self._run(c, "SELECT webhook_url FROM videos WHERE id = ?",
                                   (job_id,)).fetchone()["webhook_url"]):
            event = {"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": f"video.{status}",
                     "created_at": now, "data": {"id": job_id}}
            self._run(c, "INSERT INTO webhooks (id, video_id, url, body, attempts, next_at) VALUES (?, ?, ?, ?, 0, ?)",
                      (event["id"], job_id, url, json.dumps(event), self._now(c)))
        return n > 0

    def _progress_of(self, c, job_id: str) -> int:
        row = self._run(c, "SELECT progress FROM videos WHERE id = ?", (job_id,)).fetchone()
        return row["progress"] if row is not None else 0

    def recover(self, retries: int, ttl: float | None) -> tuple[list[str], list[str]]:
        """Jobs whose worker's lease ran out: back to the queue while they have run at most `retries` + 1 times, else
        failed (`worker_lost`); jobs of an older version of the store that cannot be re-run fail as
        `server_restarted`. Returns (requeued ids, failed ids)."""
        with self._tx() as c:
            now = self._now(c)
            legacy = [r["id"] for r in self._run(
                c, "SELECT id FROM videos WHERE status IN ('queued', 'in_progress') AND params IS NULL").fetchall()]
            for job_id in legacy:
                self._finish(job_id, None, "failed", ttl, error=LEGACY_ERROR, c=c)
            lost = self._run(c, "SELECT id, attempts FROM videos WHERE status = 'in_progress' AND "
                                "(lease_until IS NULL OR lease_until < ?)", (now,)).fetchall()
            requeued, failed = [], list(legacy)
            for r in lost:  # each change again conditional on the lease: another replica may be recovering too
                if r["attempts"] <= retries:
                    if self._run(c, "UPDATE videos SET status = 'queued', worker = NULL, lease_until = NULL, "
                                    "progress = 0 WHERE id = ? AND status = 'in_progress' AND "
                                    "(lease_until IS NULL OR lease_until < ?)", (r["id"], now)).rowcount:
                        requeued.append(r["id"])
                else:
                    error = {"code": "worker_lost", "message": f"the server running this job stopped {r['attempts']} "
                                                               "time(s) before it finished"}
                    if self._finish(r["id"], None, "failed", ttl, error=error, lease_ended_by=now, c=c):
                        failed.append(r["id"])
        return requeued, failed

    # --- retention and reconciliation

    def take_expired(self, limit: int = 100) -> list[tuple[str, str | None]]:
        """Delete up to `limit` finished jobs whose expires_at has passed; their (id, file)."""
        with self._tx() as c:
            rows = self._run(c, "SELECT id, file FROM videos WHERE expires_at IS NOT NULL AND expires_at < ? "
                                "ORDER BY expires_at LIMIT ?", (self._now(c), limit)).fetchall()
            for r in rows:
                for table, col in (("video_inputs", "video_id"), ("webhooks", "video_id"), ("videos", "id")):
                    self._run(c, f"DELETE FROM {table} WHERE {col} = ?", (r["id"],))
        return [(r["id"], r["file"]) for r in rows]

    def statuses(self, ids: list[str]) -> dict[str, str]:
        """id -> status of those of `ids` that exist."""
        out: dict[str, str] = {}
        with self._tx() as c:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ", ".join("?" * len(chunk))
                for r in self._run(c, f"SELECT id, status FROM videos WHERE id IN ({marks})", tuple(chunk)).fetchall():
                    out[r["id"]] = r["status"]
        return out

    def completed_files(self) -> list[tuple[str, str | None]]:
        """(id, file) of every completed job."""
        with self._tx() as c:
            rows = self._run(c, "SELECT id, file FROM videos WHERE status = 'completed'").fetchall()
        return [(r["id"], r["file"]) for r in rows]

    def mark_lost(self, job_id: str, error: dict) -> None:
        """A completed job whose file is gone becomes failed with `error`."""
        with self._tx() as c:
            self._run(c, "UPDATE videos SET status = 'failed', progress = 0, file = NULL, error = ? "
                         "WHERE id = ? AND status = 'completed'", (json.dumps(error), job_id))

    # --- webhooks owed

    def claim_webhook(self, hold: float) -> dict | None:
        """A webhook due now (hidden from other senders for `hold` seconds), or None."""
        with self._tx() as c:
            now = self._now(c)
            row = self._run(c, self._webhook_claim_sql(), (now,)).fetchone()
            if row is None:
                return None
            self._run(c, "UPDATE webhooks SET next_at = ?, attempts = attempts + 1 WHERE id = ?",
                      (now + hold, row["id"]))
            return {**dict(row), "attempts": row["attempts"] + 1}

    def _webhook_claim_sql(self) -> str:
        return "SELECT * FROM webhooks WHERE next_at <= ? ORDER BY next_at LIMIT 1"

    def webhook_done(self, webhook_id: str) -> None:
        with self._tx() as c:
            self._run(c, "DELETE FROM webhooks WHERE id = ?", (webhook_id,))

    def webhook_retry(self, webhook_id: str, delay: float) -> None:
        with self._tx() as c:
            self._run(c, "UPDATE webhooks SET next_at = ? WHERE id = ?", (self._now(c) + delay, webhook_id))

    # --- migration

    def dump(self) -> dict[str, list[dict]]:
        """Every row of the job tables (videos in creation order)."""
        out = {}
        with self._tx() as c:
            for table, columns in COLUMNS.items():
                order = self.order_column if table == "videos" else ", ".join(columns[:2])
                rows = self._run(c, f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}").fetchall()
                out[table] = [dict(r) for r in rows]
        return out

    def load(self, tables: dict[str, list[dict]]) -> dict[str, int]:
        """Insert `dump()`ed rows, keeping ids; rows whose id is already here are left as they are. Returns the
        rows inserted per table. One transaction: all or nothing."""
        inserted = {}
        with self._tx() as c:
            for table, columns in COLUMNS.items():
                sql = (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
                       "ON CONFLICT DO NOTHING")
                n = 0
                for row in tables.get(table, []):
                    n += self._run(c, sql, tuple(bytes(row[k]) if k == "data" else row[k] for k in columns)).rowcount
                inserted[table] = n
        return inserted

    # --- the replicas sharing the store, and the output volume they share

    def beat(self, replica: str, model: str, queue_depth: int, running: int) -> None:
        """`replica` is alive with this much work waiting and running."""
        with self._tx() as c:
            self._run(c, self._upsert_replica_sql(), (replica, model, queue_depth, running, self._now(c)))

    def leave(self, replica: str) -> None:
        with self._tx() as c:
            self._run(c, "DELETE FROM replicas WHERE id = ?", (replica,))

    def cluster(self, model: str, alive: float) -> dict:
        """Replicas of `model` seen in the last `alive` seconds: {replicas, waiting (their queues plus the video jobs
        queued in the store), running}; rows silent for an hour are dropped."""
        with self._tx() as c:
            now = self._now(c)
            self._run(c, "DELETE FROM replicas WHERE seen_at < ?", (now - 3600,))
            r = self._run(c, "SELECT COUNT(*) AS n, COALESCE(SUM(queue_depth), 0) AS waiting, "
                             "COALESCE(SUM(running), 0) AS running FROM replicas WHERE model = ? AND seen_at >= ?",
                          (model, now - alive)).fetchone()
            videos = self._run(c, "SELECT COUNT(*) AS n FROM videos WHERE model = ? AND status = 'queued'",
                               (model,)).fetchone()
        return {"replicas": int(r["n"]), "waiting": int(r["waiting"]) + int(videos["n"]), "running": int(r["running"])}

    def volume(self, marker: str) -> tuple[str, bool]:
        """The id of the output volume this store's files live on: the stored one, else `marker`, then stored; and
        whether it was stored by this call."""
        with self._tx() as c:
            row = self._run(c, "SELECT value FROM meta WHERE key = 'volume'").fetchone()
            if row is not None:
                return row["value"], False
            n = self._run(c, "INSERT INTO meta (key, value) VALUES ('volume', ?) ON CONFLICT (key) DO NOTHING",
                          (marker,)).rowcount
            return self._run(c, "SELECT value FROM meta WHERE key = 'volume'").fetchone()["value"], n > 0


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
);
CREATE TABLE IF NOT EXISTS video_inputs (
    video_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (video_id, position)
);
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY,
    video_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    queue_depth INTEGER NOT NULL,
    running INTEGER NOT NULL,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
# columns added since the first version of the table (an existing jobs.sqlite3 gains them on open)
_ADDED = {"params": "TEXT", "webhook_url": "TEXT", "worker": "TEXT", "lease_until": "REAL",
          "attempts": "INTEGER NOT NULL DEFAULT 0", "expires_at": "INTEGER", "file": "TEXT"}


class SQLiteJobStore(JobStore):
    """`<dir>/jobs.sqlite3` (WAL): one process, or several on one machine sharing the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(videos)")}
        for name, decl in _ADDED.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE videos ADD COLUMN {name} {decl}")
        self._db.execute("CREATE INDEX IF NOT EXISTS videos_status ON videos (model, status)")
        self._db.execute("CREATE INDEX IF NOT EXISTS videos_expires ON videos (expires_at)")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock:
            c = self._db.cursor()
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    def _now(self, c) -> float:
        return time.time()

    def _claim_sql(self) -> str:
        return ("SELECT id FROM videos WHERE model = ? AND status = 'queued' AND params IS NOT NULL "
                "ORDER BY rowid LIMIT 1")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def as_video(row) -> dict:
    """A row as OpenAI's Video object."""
    return {"id": row["id"], "object": "video", "model": row["model"], "prompt": row["prompt"],
            "status": row["status"], "progress": row["progress"], "created_at": row["created_at"],
            "completed_at": row["completed_at"], "expires_at": row["expires_at"], "size": row["size"],
            "seconds": row["seconds"], "remixed_from_video_id": None,
            "error": json.loads(row["error"]) if row["error"] else None}
