"""The PostgreSQL job store against a real PostgreSQL server (Debian's `postgresql` package, started here in a
temporary data directory as the `postgres` user when run as root): concurrent claims take each job once, lease
recovery from several replicas at once, an outage raises StoreUnavailable and heals without a new store, and
`gen jobs migrate` copies a SQLite job file whole (twice is harmless)."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

psycopg = pytest.importorskip("psycopg")

from gen.server.jobs import SQLiteJobStore, StoreUnavailable  # noqa: E402
from gen.server.jobs_pg import PostgresJobStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BINDIR = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
PARAMS = {"prompt": "waves", "negative_prompt": None, "seed": 3, "num_inference_steps": 2, "guidance_scale": 5.0,
          "true_cfg_scale": 1.0, "height": 32, "width": 32, "num_frames": 5, "fps": 16}


class PostgresServer:
    """A throwaway PostgreSQL server: `initdb` in a temporary directory, `pg_ctl` to start and stop it (as the
    `postgres` user when this process is root: PostgreSQL refuses to run as root), trust auth on 127.0.0.1."""

    def __init__(self):
        if not BINDIR:
            pytest.skip("PostgreSQL is not installed (CI installs it: apt-get install postgresql)")
        self.bin = BINDIR[-1]
        self.dir = Path(tempfile.mkdtemp(prefix="gen-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("postgres")
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "gen", "-E", "UTF8", "--no-sync")
        self.url = f"postgresql://gen@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [f"{self.bin}/{tool}", *args]
        if self.user is not None:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.dir)
        assert out.returncode == 0, f"{tool} failed: {out.stdout}\n{out.stderr}"

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def database(postgres):
    """A fresh database on the server: its URL."""
    name = f"t{time.monotonic_ns()}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


def test_concurrent_claims_take_each_job_once(database):
    stores = [PostgresJobStore(database) for _ in range(3)]  # three replicas
    try:
        ids = {stores[0].create(model="m", prompt="p", params=PARAMS, inputs=[b"\x89PNG"], size="32x32",
                                seconds="1")["id"] for _ in range(30)}
        stores[0].create(model="other", prompt="p", params=PARAMS, inputs=[], size="32x32", seconds="1")
        taken: list[tuple[str, str]] = []

        def worker(store, name):
            while (job := store.claim("m", name, lease=60)) is not None:
                assert job["inputs"] == [b"\x89PNG"]
                taken.append((job["id"], name))

        threads = [threading.Thread(target=worker, args=(stores[i % 3], f"w{i}")) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(i for i, _ in taken) == sorted(ids)  # every job, once
        assert len({w for _, w in taken}) > 1
        assert stores[1].queued("other") == 1  # another model's job is not taken
        rows = [stores[2].row(i) for i in ids]
        assert all(r["status"] == "in_progress" and r["attempts"] == 1 for r in rows)
    finally:
        for s in stores:
            s.close()


def test_recovery_from_several_replicas_requeues_once(database):
    a, b = PostgresJobStore(database), PostgresJobStore(database)
    try:
        jobs = [a.create(model="m", prompt="p", params=PARAMS, inputs=[], size="32x32", seconds="1")["id"]
                for _ in range(10)]
        for _ in jobs:
            a.claim("m", "dead", lease=0.0)
        results = []
        threads = [threading.Thread(target=lambda s=s: results.append(s.recover(1, None))) for s in (a, b, a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        requeued = [i for r, _ in results for i in r]
        assert sorted(requeued) == sorted(jobs)  # each once, whichever replica did it
        assert a.queued("m") == 10
        live = a.claim("m", "alive", lease=60)["id"]
        assert a.recover(1, None) == ([], [])  # a live lease is left alone
        assert a.renew(live, "alive", 60) and not a.renew(live, "dead", 60)
    finally:
        a.close()
        b.close()


def test_outage_raises_then_heals(postgres, database):
    store = PostgresJobStore(database)
    try:
        vid = store.create(model="m", prompt="p", params=PARAMS, inputs=[], size="32x32", seconds="1")["id"]
        postgres.stop()
        try:
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                store.get(vid)
            with pytest.raises(StoreUnavailable):
                store.ping()
            assert time.monotonic() - start < 30
            with pytest.raises(StoreUnavailable):  # a longer outage: the pool's reconnect backoff has grown
                store.ping()
        finally:
            postgres.start()
        healed = time.monotonic()
        assert store.get(vid)["status"] == "queued"  # the same store object, reconnected
        assert time.monotonic() - healed < 4.5  # within one request's wait, not after the backoff of the outage
    finally:
        store.close()


def test_gen_jobs_migrate_keeps_every_job(database, tmp_path):
    old = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    done = old.create(model="m", prompt="done", params=PARAMS, inputs=[], size="32x32", seconds="1",
                      webhook_url="http://hooks.example/h")
    old.claim("m", "w", 60)
    (tmp_path / "videos").mkdir(exist_ok=True)
    (tmp_path / "videos" / f"{done['id']}.mp4").write_bytes(b"mp4")
    assert old.complete(done["id"], "w", f"videos/{done['id']}.mp4", 3600)
    failed = old.create(model="m", prompt="bad", params=PARAMS, inputs=[], size="32x32", seconds="1")
    old.claim("m", "w", 60)
    old.fail(failed["id"], "w", {"code": "generation_failed", "message": "x"}, None)
    queued = old.create(model="m", prompt="é \U0001f30a", params=PARAMS, inputs=[b"png-1", b"png-2"],
                        size="32x32", seconds="1")
    before = {v["id"]: v for v in old.list(100)[0]}
    old.close()
    cmd = [sys.executable, "-m", "gen.cli", "jobs", "migrate", "--from", str(tmp_path / "jobs.sqlite3"), "--to",
           database]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "videos: 3 copied, 0 already there" in out.stdout and "webhooks: 1 copied" in out.stdout
    new = PostgresJobStore(database)
    try:
        after = {v["id"]: v for v in new.list(100)[0]}
        assert after == before  # every job, field for field
        assert [v["id"] for v in new.list(100, order="asc")[0]] == [done["id"], failed["id"], queued["id"]]
        assert new.claim("m", "w2", 60)["inputs"] == [b"png-1", b"png-2"]
        assert new.claim_webhook(60)["video_id"] == done["id"]
        assert new.volume("ignored") == ((tmp_path / ".gen-volume").read_text().strip(), False)
    finally:
        new.close()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "videos: 0 copied, 3 already there" in again.stdout
    bad = subprocess.run([*cmd[:-1], "sqlite:///x"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "postgresql://" in bad.stderr


def test_a_replica_on_another_volume_is_refused(database, tmp_path):
    from gen.generator import Generator
    from gen.server.app import create_app
    from gen.types import GenError

    wan = Generator.from_pretrained(ROOT / "assets" / "wan-t2v-tiny")
    shared, own = tmp_path / "shared", tmp_path / "own"
    app = create_app(wan, output_dir=shared, job_store=database, ui=False)  # the first replica names the volume
    app.state.service.queue.shutdown(1)
    app.state.upkeep.close()
    app.state.store.close()
    with pytest.raises(GenError, match="not the volume"):  # an empty folder of its own
        create_app(wan, output_dir=own, job_store=database, ui=False)
    (own / ".gen-volume").write_text("0" * 32)
    with pytest.raises(GenError, match="not the volume"):  # another volume
        create_app(wan, output_dir=own, job_store=database, ui=False)
    with pytest.raises(GenError, match="cannot reach the job store"):
        create_app(wan, output_dir=tmp_path / "x", job_store="postgresql://gen@127.0.0.1:1/none", ui=False)
