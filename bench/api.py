"""Submission throughput and latency of ``POST /v1/experiments`` on Postgres.

What it measures, in one run (the machine is noisy, so the baseline is taken
in the same run):

1. the API: a real uvicorn server (``fitfleet api``) in a child process on a
   fresh Postgres database; ``--clients`` threads each with its own HTTP
   connection submit a tiny spec ``--requests`` times in all; every submission
   writes the experiment, its outbox row and an audit event in one
   transaction.  Printed: accepted/s, p50 and p99 latency.
2. the baseline: a bare Celery ``send_task`` to Redis from as many threads,
   the cost of publishing a message with nothing else around it.

Target (issue 3): >= 300 submissions/s with 20 clients on this 2-core machine.
"""

from __future__ import annotations

import argparse
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

import httpx
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

        def submit(index: int) -> None:
            client = getattr(local, "client", None)
            if client is None:
                client = local.client = httpx.Client(
                    base_url=base, headers={"Authorization": f"Bearer {secret}"}, timeout=30
                )
            answer = client.post(
                "/v1/experiments",
                content=SPEC,
                headers={"Content-Type": "application/json", "Idempotency-Key": f"k{index}"},
            )
            if answer.status_code != 201:
                raise RuntimeError(f"{answer.status_code} {answer.text}")

        hammer(submit, min(50, total), clients)  # warm-up (connections, caches)
        return hammer(lambda i: submit(i + 1_000_000), total, clients)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


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
    ratio = rows[0][1] / rows[1][1]
    verdict = "meets" if rows[0][1] >= 300 else "misses"
    print(
        f"API / baseline throughput: {ratio:.3f}; {rows[0][1]:.0f}/s {verdict} the target >= 300/s"
    )


if __name__ == "__main__":
    main()
