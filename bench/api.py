"""Submission throughput and latency of ``POST /v1/experiments`` on Postgres.

What it measures, in one run (the machine is noisy, so the baseline is taken
in the same run):

1. the API: a real uvicorn server (as ``fitfleet api --workers N``: ``--workers``
   processes) in a child process on a fresh Postgres database, publishing new
   runs to Redis as in production; ``--clients`` threads each with its own
   keep-alive HTTP connection (``http.client``, light on the shared CPUs)
   submit a tiny spec ``--requests`` times in all, each with its own
   Idempotency-Key; every submission writes the experiment, its outbox row
   and an audit event atomically, and is published right after.  Printed:
   accepted/s, p50 and p99 latency.
2. the baseline: a bare Celery ``send_task`` to Redis from as many threads,
   the cost of publishing a message with nothing else around it.
3. submit-to-claim latency with an idle worker: a real ``celery worker`` on
   Redis (its trainer replaced by a script that exits at once), ``--claims``
   submissions one after the other; latency = the run's ``started_at`` (set by
   the worker's claim) minus the POST's start.  Beside it, the baseline's
   send_task -> task start latency of a no-op task on the same worker.

Targets (issue 3): >= 300 submissions/s with 20 clients; submit-to-claim p50
<= 100 ms, on this 2-core machine. Everything (server, Postgres, Redis, the
load generator) shares those 2 cores, so run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import http.client
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.api.tokens import create_token  # noqa: E402
from shared.db.session import make_engine, normalize_url, session_scope  # noqa: E402
from shared.db.upgrade import upgrade  # noqa: E402

ADMIN_URL = os.environ.get(
    "FITFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
SPEC = (
    '{"version": 1, "name": "bench", "project": "bench", "data": {"source": "digits", '
    '"size": 16}, "model": {"arch": "resnet18", "pretrained": "none"}, '
    '"stages": [{"name": "s", "epochs": 1}], "resources": {"gpus": 0, "queue": "bench"}}'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def hammer(call: Callable[[int], None], total: int, clients: int) -> tuple[float, list[float]]:
    """Run ``call(i)`` ``total`` times from ``clients`` threads; (seconds, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def worker() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            began = time.perf_counter()
            call(index)
            elapsed = time.perf_counter() - began
            with lock:
                latencies.append(elapsed)

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(worker)
    return time.perf_counter() - began, latencies


def bench_api(total: int, clients: int, workdir: Path, workers: int) -> tuple[float, list[float]]:
    admin = (
        normalize_url(ADMIN_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    name = f"fitfleet_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = normalize_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    server = None
    try:
        upgrade(url)
        engine = make_engine(url)
        with session_scope(engine) as session:
            _, secret = create_token(session, "bench")
        engine.dispose()
        (workdir / "data" / "digits").mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "FITFLEET_HOME": str(workdir),
            "FITFLEET_DATABASE_URL": url,
            "FITFLEET_DATA_ROOTS": str(workdir / "data"),
            # Production's broker: the API publishes each new run to Redis.
            "FITFLEET_BROKER_URL": "redis://127.0.0.1:6379/13",
            # Raw capacity: one token submits everything, so no per-token limit.
            "FITFLEET_SUBMIT_RATE_PER_S": "0",
        }
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "services.api.app:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--workers",
                str(workers),
                "--no-access-log",
            ],
            env=env,
        )
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        local = threading.local()
        body = SPEC.encode()

        def submit(index: int) -> None:
            # http.client with one keep-alive connection per client thread: a
            # real HTTP/1.1 client that costs the shared CPUs far less than
            # httpx, so the load generator takes less from the server it measures.
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request(
                "POST",
                "/v1/experiments",
                body=body,
                headers={
                    "Authorization": f"Bearer {secret}",
                    "Content-Type": "application/json",
                    "Idempotency-Key": f"k{index}",
                },
            )
            answer = conn.getresponse()
            text = answer.read()
            if answer.status != 201:
                raise RuntimeError(f"{answer.status} {text!r}")

        hammer(submit, min(50, total), clients)  # warm-up (connections, caches)
        return hammer(lambda i: submit(i + 1_000_000), total, clients)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        import redis as redis_client

        redis_client.Redis.from_url("redis://127.0.0.1:6379/13").flushdb()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def bench_claims(count: int, workdir: Path) -> tuple[list[float], list[float]]:
    """(submit -> claim latencies, bare send_task -> task start latencies) with an idle worker."""
    import json

    import redis as redis_client
    from celery import Celery

    from shared.db.models import SqlExperiment

    broker = "redis://127.0.0.1:6379/12"
    redis_client.Redis.from_url(broker).flushdb()
    admin_url = normalize_url(ADMIN_URL).set(drivername="postgresql")
    admin = admin_url.render_as_string(hide_password=False)
    name = f"fitfleet_claims_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = normalize_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    trainer = workdir / "instant_trainer.py"
    trainer.write_text("import sys\nsys.exit(0)\n")
    stamp = workdir / "noop_tasks.py"
    stamp.write_text(
        "import time\nimport redis\nfrom workers.celery_entry import app\n"
        "@app.task(name='bench.noop_stamp', ignore_result=True)\n"
        "def noop_stamp(url, key):\n    redis.Redis.from_url(url).set(key, time.time())\n"
    )
    (workdir / "data" / "digits").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{workdir}",
        "FITFLEET_HOME": str(workdir),
        "FITFLEET_DATABASE_URL": url,
        "FITFLEET_BROKER_URL": broker,
        "FITFLEET_DATA_ROOTS": str(workdir / "data"),
        "FITFLEET_WORKER_CHILD_COMMAND": json.dumps([sys.executable, str(trainer)]),
    }
    worker = None
    try:
        upgrade(url)
        engine = make_engine(url)
        with session_scope(engine) as session:
            _, secret = create_token(session, "bench")
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.celery_entry", "worker",
             "-Q", "bench", "--pool", "prefork", "--concurrency", "1", "--loglevel", "WARNING",
             "--without-gossip", "--without-mingle", "--without-heartbeat",
             "--include", "noop_tasks"],
            env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        from fastapi.testclient import TestClient

        from services.api.app import create_app
        from shared.settings import Settings

        settings = Settings(
            home=workdir, database_url=url, broker_url=broker, data_roots=[workdir / "data"]
        )
        claims: list[float] = []
        with TestClient(create_app(settings)) as http:
            headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
            for index in range(count + 3):
                began = time.time()
                run_id = http.post("/v1/experiments", content=SPEC, headers=headers).json()["id"]
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    with session_scope(engine) as session:
                        started = session.get(SqlExperiment, run_id).started_at  # type: ignore[union-attr]
                    if started is not None:
                        break
                    time.sleep(0.002)
                else:
                    raise RuntimeError("the worker never claimed a run")
                if index >= 3:  # the first ones warm the worker up
                    claims.append(started.timestamp() - began)
                time.sleep(0.3)  # let the (instant) trainer finish: the worker is idle again
        engine.dispose()
        app = Celery("bench", broker=broker)
        store = redis_client.Redis.from_url(broker)
        starts: list[float] = []
        for index in range(count + 3):
            key = f"bench-noop-{index}"
            sent = time.time()
            app.send_task("bench.noop_stamp", args=[broker, key], queue="bench")
            deadline = time.monotonic() + 30
            while (value := store.get(key)) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker never ran the no-op task")
                time.sleep(0.002)
            if index >= 3:
                starts.append(float(value) - sent)
            time.sleep(0.05)
        return claims, starts
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, 9)
        with psycopg.connect(admin, autocommit=True) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(name)))


def bench_send_task(total: int, clients: int) -> tuple[float, list[float]]:
    from celery import Celery

    app = Celery("bench", broker="redis://127.0.0.1:6379/14")
    app.conf.broker_pool_limit = clients
    with app.connection_for_write() as conn:
        conn.default_channel.client.flushdb()

    def send(index: int) -> None:
        app.send_task("bench.noop", kwargs={"i": index}, queue="bench")

    hammer(send, min(50, total), clients)
    try:
        return hammer(send, total, clients)
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.client.flushdb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn processes")
    parser.add_argument("--claims", type=int, default=20, help="submit-to-claim samples")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        api_seconds, api_lat = bench_api(args.requests, args.clients, Path(tmp), args.workers)
    base_seconds, base_lat = bench_send_task(args.requests, args.clients)
    rows = [
        ("POST /v1/experiments (Postgres)", args.requests / api_seconds, api_lat),
        ("bare celery send_task (Redis)", args.requests / base_seconds, base_lat),
    ]
    print(
        f"{args.requests} requests, {args.clients} concurrent clients, "
        f"{args.workers} API processes, {os.cpu_count()} CPUs"
    )
    print(f"{'':34} {'per s':>9} {'p50 ms':>9} {'p99 ms':>9}")
    for label, rate, lat in rows:
        p50, p99 = statistics.median(lat) * 1e3, percentile(lat, 0.99) * 1e3
        print(f"{label:34} {rate:9.1f} {p50:9.2f} {p99:9.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        claims, starts = bench_claims(args.claims, Path(tmp))
    for label, lat in (
        ("submit -> claim, idle worker", claims),
        ("send_task -> task start (baseline)", starts),
    ):
        p50, p99 = statistics.median(lat) * 1e3, percentile(lat, 0.99) * 1e3
        print(f"{label:34} {'':>9} {p50:9.2f} {p99:9.2f}")
    claim_p50 = statistics.median(claims) * 1e3
    claim_verdict = "meets" if claim_p50 <= 100 else "misses"
    print(f"submit -> claim p50 {claim_p50:.1f} ms {claim_verdict} the target <= 100 ms")
    ratio = rows[0][1] / rows[1][1]
    verdict = "meets" if rows[0][1] >= 300 else "misses"
    print(
        f"API / baseline throughput: {ratio:.3f}; {rows[0][1]:.0f}/s {verdict} the target >= 300/s"
    )


if __name__ == "__main__":
    main()
