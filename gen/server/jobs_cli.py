"""`gen jobs`: the video job store from the command line. `gen jobs migrate --from <output-dir>/jobs.sqlite3 --to
postgresql://...` copies every job (with its input images and owed webhooks, ids kept) from a single server's SQLite
file into a shared PostgreSQL store; running it again copies only what is missing."""
from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path

from gen.types import GenError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="jobs_command", required=True)
    m = sub.add_parser("migrate", help="copy every job of a SQLite job file into a PostgreSQL job store")
    m.add_argument("--from", dest="source", required=True, metavar="PATH",
                   help="the jobs.sqlite3 file of the old server (in its --output-dir)")
    m.add_argument("--to", dest="target", default=os.environ.get("GEN_JOB_STORE"), metavar="URL",
                   help="the postgresql:// URL of the shared store (default: $GEN_JOB_STORE)")


def run(args: argparse.Namespace) -> int:
    from gen.server.app import VOLUME_MARKER
    from gen.server.jobs import COLUMNS, SQLiteJobStore
    from gen.server.stores import open_store
    from gen.server.outputs import atomic_write

    source = Path(args.source)
    if not source.is_file():
        raise GenError(f"--from {str(source)!r} is not a file (the old server's <output-dir>/jobs.sqlite3)",
                       param="source")
    if not args.target or not args.target.startswith(("postgresql://", "postgres://")):
        raise GenError("--to must be a postgresql:// URL (or set $GEN_JOB_STORE)", param="target")
    old = SQLiteJobStore(source)
    new = open_store(args.target, source.parent)
    try:
        marker = source.parent / VOLUME_MARKER  # the files stay where they are: that folder is the volume
        volume, _ = old.volume(marker.read_text().strip() if marker.is_file() else uuid.uuid4().hex)
        stored, _ = new.volume(volume)
        if stored != volume:
            raise GenError(f"the PostgreSQL store already belongs to another output volume ({stored}); the files of "
                           f"{source.parent} ({volume}) would not be where its replicas look", param="target")
        atomic_write(marker, lambda tmp: tmp.write_text(stored + "\n"))
        tables = old.dump()
        inserted = new.load(tables)
        ids = [r["id"] for r in tables["videos"]]
        missing = set(ids) - set(new.statuses(ids))
        if missing:
            raise GenError(f"{len(missing)} jobs did not reach the PostgreSQL store", param="target")
    finally:
        old.close()
        new.close()
    for table in COLUMNS:
        print(f"{table}: {inserted[table]} copied, {len(tables[table]) - inserted[table]} already there")
    print(f"every job of {source} is in the PostgreSQL store; serve its files from {source.parent} (volume {stored})")
    return 0
