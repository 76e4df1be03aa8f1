"""The job store on PostgreSQL, shared by every `gen serve` replica (`--job-store postgresql://...`): the same SQL as
the SQLite store (gen/server/jobs.py), with claims taken `FOR UPDATE SKIP LOCKED` so that two replicas never take the
same job, the database server's clock for leases, and a small connection pool that reconnects after an outage.

While the server cannot be reached every call raises StoreUnavailable (HTTP 503); nothing needs a restart after.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from gen.server.jobs import JobStore, StoreUnavailable
from gen.types import GenError

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS videos (
    seq BIGSERIAL UNIQUE,
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    completed_at BIGINT,
    size TEXT NOT NULL,
    seconds TEXT NOT NULL,
    error TEXT,
    params TEXT,
    webhook_url TEXT,
    worker TEXT,
    lease_until DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0,
    expires_at BIGINT,
    file TEXT
);
CREATE INDEX IF NOT EXISTS videos_status ON videos (model, status, seq);
CREATE INDEX IF NOT EXISTS videos_expires ON videos (expires_at);
CREATE TABLE IF NOT EXISTS video_inputs (
    video_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (video_id, position)
);
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY,
    video_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    queue_depth INTEGER NOT NULL,
    running INTEGER NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class PostgresJobStore(JobStore):
    """Video jobs in a PostgreSQL database; `url` is a libpq connection URL (postgresql://user:pass@host:port/db)."""

    order_column = "seq"

    def __init__(self, url: str, max_connections: int = 8, connect_timeout: float = 5.0):
        try:
            import psycopg
            from psycopg.rows import dict_row
            from psycopg_pool import ConnectionPool, PoolTimeout
        except ImportError as e:
            raise GenError(f"a PostgreSQL job store needs psycopg ({e.name} is missing): "
                           "pip install -e '.[serve]'", param="job_store") from None
        self._errors = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
        self.url = url
        # reconnect_timeout: a failed background reconnect gives up after connect_timeout instead of backing off
        # for minutes (1, 2, 4, 8 ... s), so that the next request starts a fresh attempt at once: after an outage
        # the store answers again within a couple of seconds of the database, whatever the outage's length.
        self._pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=False, timeout=connect_timeout,
                                    reconnect_timeout=connect_timeout,
                                    check=ConnectionPool.check_connection, name="gen-jobs",
                                    kwargs={"row_factory": dict_row, "connect_timeout": int(connect_timeout)})
        self._pool.open(wait=False)
        try:
            with self._tx() as c:
                c.execute("SELECT pg_advisory_xact_lock(731906)")  # replicas starting together create tables once
                c.execute(_SCHEMA)
        except StoreUnavailable as e:
            self._pool.close()
            raise GenError(f"cannot reach the job store at {_redacted(url)}: {e}", param="job_store") from None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as c:
                yield c
        except self._errors as e:
            raise StoreUnavailable(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}") from e

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _now(self, c) -> float:
        c.execute("SELECT extract(epoch FROM clock_timestamp())::float8 AS now")
        return c.fetchone()["now"]

    def _claim_sql(self) -> str:
        return ("SELECT id FROM videos WHERE model = %s AND status = 'queued' AND params IS NOT NULL "
                "ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED")

    def _webhook_claim_sql(self) -> str:
        return "SELECT * FROM webhooks WHERE next_at <= %s ORDER BY next_at LIMIT 1 FOR UPDATE SKIP LOCKED"

    def close(self) -> None:
        self._pool.close()


def _redacted(url: str) -> str:
    """`url` without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
