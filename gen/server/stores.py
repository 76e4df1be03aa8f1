"""Which job store a server uses: `open_store(url, output_dir)` picks the implementation by URL (gen/server/jobs.py
is the interface and SQLite, gen/server/jobs_pg.py PostgreSQL)."""
from __future__ import annotations

from pathlib import Path

from gen.server.jobs import JobStore, SQLiteJobStore
from gen.types import GenError


def open_store(url: str | None, output_dir: str | Path) -> JobStore:
    """None: SQLite in `output_dir`; `postgresql://...` (or `postgres://`): a shared PostgreSQL store."""
    if url is None:
        return SQLiteJobStore(Path(output_dir) / "jobs.sqlite3")
    if url.startswith(("postgresql://", "postgres://")):
        from gen.server.jobs_pg import PostgresJobStore  # psycopg is imported only for PostgreSQL

        return PostgresJobStore(url)
    raise GenError(f"--job-store must be a postgresql:// URL (or absent: SQLite in --output-dir), got "
                   f"{url.split('://')[0]!r}://...", param="job_store")
