"""Three `gen serve` processes on the tiny Wan sharing one PostgreSQL job store and one output directory: any replica
answers for any job, 30 jobs complete exactly once, a full cluster answers 429, a PostgreSQL outage is 503 and then
heals with no job lost, and the jobs of a replica killed mid-run are re-run by another after the lease."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

psycopg = pytest.importorskip("psycopg")
pytest.importorskip("fastapi")

from test_jobs_postgres import PostgresServer, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
V = {"prompt": "waves", "size": "32x32", "num_frames": 5, "num_inference_steps": 2}
TINY = {"prompt": "waves", "size": "16x16", "num_frames": 1, "num_inference_steps": 1}
LEASE = 5


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    server.start()
    yield server
    server.remove()


class Replica:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log
        self.http = httpx.Client(base_url=url, timeout=60)


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared")  # the volume every replica mounts
    logs = tmp_path_factory.mktemp("logs")
    replicas = []
    for i in range(3):
        port = free_port()
        log = open(logs / f"replica{i}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "gen.cli", "serve", "--model-path", "assets/wan-t2v-tiny",
                                 "--port", str(port), "--output-dir", str(shared), "--job-store", postgres.url,
                                 "--no-ui", "--max-queue", "10", "--job-lease", str(LEASE), "--job-retries", "2"],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # three processes share the cores
        replicas.append(Replica(f"http://127.0.0.1:{port}", proc, logs / f"replica{i}.log"))
    try:
        deadline = time.monotonic() + 180
        for r in replicas:
            while True:
                assert r.proc.poll() is None, r.log.read_text()
                assert time.monotonic() < deadline, "a replica did not become ready"
                try:
                    if r.http.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
        for r in replicas:  # every replica counts the three (heartbeats about every second), whatever test runs first
            while not any(line.startswith("gen_cluster_replicas ") and float(line.split()[1]) == 3
                          for line in r.http.get("/metrics").text.splitlines()):
                assert r.proc.poll() is None, r.log.read_text()
                assert time.monotonic() < deadline, "a replica did not see the other two"
                time.sleep(0.3)
        yield replicas
    finally:
        for r in replicas:
            if r.proc.poll() is None:
                r.proc.terminate()
        for r in replicas:
            try:
                r.proc.wait(60)
            except subprocess.TimeoutExpired:
                r.proc.kill()
            r.http.close()


def rows(postgres, ids) -> dict[str, dict]:
    with psycopg.connect(postgres.url) as conn:
        cur = conn.execute("SELECT id, status, attempts, worker FROM videos WHERE id = ANY(%s)", (list(ids),))
        return {r[0]: {"status": r[1], "attempts": r[2], "worker": r[3]} for r in cur.fetchall()}


def wait_all(replica: Replica, ids, timeout=240.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    pending = set(ids)
    done = {}
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} jobs did not finish"
        for vid in list(pending):
            r = replica.http.get(f"/v1/videos/{vid}")
            if r.status_code == 200 and r.json()["status"] in ("completed", "failed"):
                done[vid] = r.json()
                pending.discard(vid)
        time.sleep(0.2)
    return done


def completed_total(replicas) -> float:
    total = 0.0
    for r in replicas:
        if r.proc.poll() is None:
            for line in r.http.get("/metrics").text.splitlines():
                if line.startswith('gen_generations_total{outcome="completed"}'):
                    total += float(line.split()[-1])
    return total


def test_any_replica_answers_for_any_job(cluster):
    a, b, c = cluster
    vid = a.http.post("/v1/videos", json={**V, "seed": 1}).json()["id"]
    video = wait_all(b, [vid])[vid]
    assert video["status"] == "completed", video
    content = c.http.get(f"/v1/videos/{vid}/content")
    assert content.status_code == 200 and content.content[4:8] == b"ftyp"
    assert [v["id"] for v in c.http.get("/v1/videos").json()["data"]] == [vid]
    deadline = time.monotonic() + 10  # each replica sees the others at its next heartbeat (every second)
    while "gen_cluster_replicas 3.0" not in a.http.get("/metrics").text:
        assert time.monotonic() < deadline, a.http.get("/metrics").text
        time.sleep(0.2)
    assert b.http.delete(f"/v1/videos/{vid}").json()["deleted"]
    assert a.http.get(f"/v1/videos/{vid}").status_code == 404


def test_thirty_jobs_across_three_replicas_complete_exactly_once(cluster, postgres):
    before = completed_total(cluster)
    ids = [cluster[i % 3].http.post("/v1/videos", json={**TINY, "seed": i}).json()["id"] for i in range(30)]
    done = wait_all(cluster[0], ids)
    assert all(v["status"] == "completed" for v in done.values()), [v["error"] for v in done.values()]
    assert all(r["attempts"] == 1 for r in rows(postgres, ids).values())  # each claimed once
    # a worker marks its row completed, then counts it: the last count may come a moment after the row
    deadline = time.monotonic() + 30
    while completed_total(cluster) - before < 30:
        assert time.monotonic() < deadline, completed_total(cluster) - before
        time.sleep(0.1)
    assert completed_total(cluster) - before == 30  # and run once, over all replicas
    for i, vid in enumerate(ids[:6]):
        assert cluster[(i + 1) % 3].http.get(f"/v1/videos/{vid}/content").content[4:8] == b"ftyp"


def test_full_cluster_answers_429(cluster):
    created, refused = [], None
    for i in range(60):  # capacity: --max-queue 10 x 3 replicas of queued jobs
        r = cluster[i % 3].http.post("/v1/videos", json={**V, "seed": 1000 + i})
        if r.status_code == 429:
            refused = r
            break
        created.append(r.json()["id"])
    assert refused is not None and refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1 and len(created) >= 30
    for vid in created:
        assert cluster[0].http.delete(f"/v1/videos/{vid}").status_code == 200


def test_postgres_outage_is_503_then_heals_with_no_job_lost(cluster, postgres):
    a, b, _ = cluster
    ids = [a.http.post("/v1/videos", json={**V, "seed": 100 + i}).json()["id"] for i in range(4)]
    postgres.stop()
    try:
        r = b.http.post("/v1/videos", json=V)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
        assert "job store" in r.json()["error"]["message"]
        ready = a.http.get("/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "store_unavailable"
        assert a.http.get("/health").status_code == 200
    finally:
        postgres.start()
    deadline = time.monotonic() + 60
    while a.http.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "the replica did not recover"
        time.sleep(0.3)
    ids.append(b.http.post("/v1/videos", json={**V, "seed": 200}).json()["id"])
    done = wait_all(b, ids)
    assert all(v["status"] == "completed" for v in done.values()), [v["error"] for v in done.values()]


def test_killed_replica_job_is_rerun_by_another(cluster, postgres):
    victim_pids = {r.proc.pid: r for r in cluster}
    survivor = cluster[0]
    ids = [survivor.http.post("/v1/videos", json={**V, "num_frames": 17, "num_inference_steps": 8, "seed": i}).json()
           ["id"] for i in range(3)]
    deadline = time.monotonic() + 120
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, "no job started"
        for vid, row in rows(postgres, ids).items():
            pid = int(row["worker"].split(":")[1]) if row["status"] == "in_progress" and row["worker"] else None
            if pid in victim_pids and victim_pids[pid] is not survivor:
                # frozen, then the row read again: the job is still its own mid-run when it is killed (it may
                # have finished between the two reads on a busy machine)
                os.kill(pid, signal.SIGSTOP)
                if rows(postgres, [vid])[vid] == row:
                    victim, killed_job = victim_pids[pid], vid
                    break
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(30)
    done = wait_all(survivor, ids, timeout=240)
    assert all(v["status"] == "completed" for v in done.values()), [v["error"] for v in done.values()]
    assert rows(postgres, [killed_job])[killed_job]["attempts"] == 2  # re-run once, after the lease
    assert survivor.http.get(f"/v1/videos/{killed_job}/content").content[4:8] == b"ftyp"
