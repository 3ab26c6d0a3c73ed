"""Load: many concurrent clients submit with retries; every run accepted once, none lost.

One run, end to end, on real servers:

1. a fresh Postgres database (created here, dropped at the end), migrated, with
   an admin token;
2. the API as in production: ``uvicorn --workers 2`` in a child process,
   publishing each new run to Redis (db 11) right after its commit;
3. ``--workers`` real Celery worker processes (one pool process each) on a
   queue of this run only, their trainer replaced by a script that exits at
   once (the run is about delivery, not training), and ``fitfleet dispatch``
   (outbox relay + lease reconciler) in a child process;  the API's per-token
   submit limit is off (one token submits everything; ``--rate-limit`` sets it,
   and a 429 is then retried after its Retry-After with the same key);
4. ``--clients`` threads, each with its own keep-alive ``http.client``
   connection, submit ``--submissions`` tiny specs (``gpus: 0``), each with its
   own Idempotency-Key.  A request that times out (``--client-timeout-s``), loses
   its connection or gets a 5xx is sent again with the *same* key on a new
   connection: if the first one had in fact committed, the API answers 200 with
   the same id, never a second run;
5. then it waits until every run is terminal and reads the database.

Printed: accepted/s over the submit phase, p50/p99 submission latency (retries
included), retries, duplicates (runs beyond one per key: must be 0), lost (keys
accepted but missing from the database, answered with another id, or not
terminal at the end: must be 0), runs trained twice (``attempt > 1`` or more
than one ``started`` event: must be 0), and the time to drain.  Exit 1 if any of
those (or a submission never accepted) is non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sqlalchemy import Engine, func, select  # noqa: E402

from services.api.tokens import create_token  # noqa: E402
from shared.db.models import TERMINAL_STATES, SqlEvent, SqlExperiment, SqlWorker  # noqa: E402
from shared.db.session import make_engine, normalize_url, session_scope  # noqa: E402
from shared.db.upgrade import upgrade  # noqa: E402

ADMIN_URL = os.environ.get(
    "FITFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
BROKER_URL = os.environ.get("FITFLEET_LOAD_BROKER_URL", "redis://127.0.0.1:6379/11")
TERMINAL = [str(state) for state in TERMINAL_STATES]


def spec_for(queue: str) -> bytes:
    """A tiny valid spec on ``queue``; ``gpus: 0`` so a CPU-only worker takes it."""
    return json.dumps(
        {
            "version": 1,
            "name": "load",
            "project": "load",
            "data": {"source": "digits", "size": 16},
            "model": {"arch": "resnet18", "pretrained": "none"},
            "stages": [{"name": "s", "epochs": 1}],
            "resources": {"gpus": 0, "queue": queue},
        }
    ).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class LoadResult:
    submissions: int
    clients: int
    workers: int
    submit_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    retries: int = 0
    created: int = 0  # 201 answers
    replayed: int = 0  # 200 answers (a retry whose first attempt had committed)
    unaccepted: int = 0  # keys that never got an id within the retry budget
    errors: list[str] = field(default_factory=list)  # why, for the first few of them
    rate_limited: int = 0  # 429 answers (retried after Retry-After, same key)
    conflicting_ids: int = 0  # a key answered with two different ids
    runs_in_db: int = 0
    duplicates: int = 0
    lost: int = 0
    trained_twice: int = 0
    drain_s: float | None = None  # submit end -> every run terminal; None: timed out
    states: dict[str, int] = field(default_factory=dict)

    unanswered_runs: int = 0  # runs in the database under a key no client got an id for

    @property
    def accepted(self) -> int:
        return self.created + self.replayed

    @property
    def ok(self) -> bool:
        return not (
            self.duplicates
            or self.lost
            or self.trained_twice
            or self.unaccepted
            or self.accepted != self.submissions
            or self.conflicting_ids
            or self.drain_s is None
        )

    def report(self) -> str:
        lat = self.latencies
        rows = [
            ("submissions", f"{self.submissions}"),
            ("clients", f"{self.clients}"),
            ("celery workers", f"{self.workers}"),
            ("accepted", f"{self.accepted} ({self.created} x 201, {self.replayed} x 200 replay)"),
            ("submit phase s", f"{self.submit_s:.2f}"),
            ("accepted/s", f"{self.accepted / self.submit_s:.1f}" if self.submit_s else "-"),
            ("p50 submit ms", f"{statistics.median(lat) * 1e3:.1f}" if lat else "-"),
            ("p99 submit ms", f"{percentile(lat, 0.99) * 1e3:.1f}"),
            ("retries", f"{self.retries} ({self.rate_limited} after a 429)"),
            ("unaccepted", f"{self.unaccepted}" + "".join(f"\n  {e}" for e in self.errors)),
            ("runs in db", f"{self.runs_in_db}"),
            ("duplicates", f"{self.duplicates}"),
            ("lost", f"{self.lost}"),
            ("trained twice", f"{self.trained_twice}"),
            ("unanswered runs", f"{self.unanswered_runs}"),
            ("drain s", f"{self.drain_s:.2f}" if self.drain_s is not None else "TIMED OUT"),
            ("final states", ", ".join(f"{k} {v}" for k, v in sorted(self.states.items()))),
        ]
        return "\n".join(f"{label:16} {value}" for label, value in rows)


# -- the stack ---------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    admin = (
        normalize_url(ADMIN_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    name = f"fitfleet_load_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = normalize_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(name)))


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM (warm shutdown), then SIGKILL the process group (it has its own session)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the API never became healthy")


def wait_workers(engine: Engine, count: int, timeout: float = 120) -> None:
    """Until ``count`` workers registered (the fleet table is of this database only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(engine) as session:
            if (session.scalar(select(func.count()).select_from(SqlWorker)) or 0) >= count:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{count} workers never registered")


def clean_redis(queue: str) -> None:
    """Delete this run's keys in the broker db (its queue, its workers' bindings).

    The db is this benchmark's (11): once no other load run's queue is left in
    it, kombu's shared bookkeeping keys there go too; nothing else is touched.
    """
    import redis

    client = redis.Redis.from_url(BROKER_URL)
    try:
        for raw in list(client.scan_iter(count=1000)):
            key = raw.decode()
            if queue in key:
                client.delete(key)
            elif key.startswith("_kombu.binding"):
                mine = queue.encode()
                if client.type(key) == b"set":
                    found = [m for m in client.smembers(key) if mine in m]
                    if found:
                        client.srem(key, *found)
                else:
                    found = [m for m in client.zrange(key, 0, -1) if mine in m]
                    if found:
                        client.zrem(key, *found)
        if not any(b"load-" in raw for raw in client.scan_iter(count=1000)):
            others = list(client.scan_iter(match="_kombu.*", count=1000))
            if others:
                client.delete(*others)
    finally:
        client.close()


# -- the clients -------------------------------------------------------------------------


def submit_all(
    *,
    port: int,
    token: str,
    body: bytes,
    keys: list[str],
    clients: int,
    client_timeout_s: float,
    max_attempts: int,
    result: LoadResult,
) -> dict[str, str]:
    """Submit one run per key from ``clients`` threads; {key: run id} of the accepted ones."""
    ids: dict[str, str] = {}
    lock = threading.Lock()
    pending = iter(keys)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def one(conn_box: list[http.client.HTTPConnection | None], key: str) -> None:
        began = time.perf_counter()
        seen: set[str] = set()
        retries = limited = 0
        pause = 0.0
        why = "no attempt"
        for attempt in range(max_attempts):
            if attempt:
                retries += 1
                time.sleep(pause or min(1.0, 0.05 * 2**attempt))
                pause = 0.0
            conn = conn_box[0]
            if conn is None:
                conn = conn_box[0] = http.client.HTTPConnection(
                    "127.0.0.1", port, timeout=client_timeout_s
                )
            try:
                conn.request(
                    "POST",
                    "/v1/experiments",
                    body=body,
                    headers={**headers, "Idempotency-Key": key},
                )
                answer = conn.getresponse()
                text = answer.read()
            except (OSError, http.client.HTTPException) as exc:
                # A timeout, a reset, a half-read answer: the request may or may not
                # have committed.  A new connection, and the same key again.
                why = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn_box[0] = None
                continue
            why = f"{answer.status} {text[:200]!r}"
            if answer.status in (429, 503) or answer.status >= 500:
                if answer.status == 429:
                    limited += 1
                with contextlib.suppress(TypeError, ValueError):
                    pause = min(5.0, float(answer.getheader("Retry-After")))  # type: ignore[arg-type]
                continue
            if answer.status not in (200, 201):
                break  # a 4xx is an answer: sending it again would not change it
            seen.add(json.loads(text)["id"])
            with lock:
                result.retries += retries
                result.rate_limited += limited
                result.latencies.append(time.perf_counter() - began)
                if answer.status == 201:
                    result.created += 1
                else:
                    result.replayed += 1
                if len(seen) > 1:
                    result.conflicting_ids += 1
                ids[key] = seen.pop()
            return
        with lock:
            result.retries += retries
            result.rate_limited += limited
            result.unaccepted += 1
            if len(result.errors) < 5:
                result.errors.append(f"{key}: {why}")

    def client() -> None:
        conn_box: list[http.client.HTTPConnection | None] = [None]
        try:
            while True:
                with lock:
                    key = next(pending, None)
                if key is None:
                    return
                try:
                    one(conn_box, key)
                except Exception as exc:  # a bug here must not drop the thread's other keys
                    with lock:
                        result.unaccepted += 1
                        if len(result.errors) < 5:
                            result.errors.append(f"{key}: {type(exc).__name__}: {exc}")
        finally:
            if conn_box[0] is not None:
                conn_box[0].close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.submit_s = time.perf_counter() - began
    return ids


# -- the whole run -----------------------------------------------------------------------


def run_load(
    *,
    submissions: int = 2000,
    clients: int = 50,
    workers: int = 2,
    timeout_s: float = 600.0,
    client_timeout_s: float = 2.0,
    max_attempts: int = 20,
    api_workers: int = 2,
    rate_limit: float = 0.0,
    workdir: Path | None = None,
    progress: bool = False,
) -> LoadResult:
    """Start the stack, submit, wait for every run to be terminal, count; clean everything up."""
    result = LoadResult(submissions=submissions, clients=clients, workers=workers)
    queue = f"load-{os.getpid()}-{secrets.token_hex(3)}"
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        url = stack.enter_context(fresh_database())
        stack.callback(clean_redis, queue)
        engine = make_engine(url)
        stack.callback(engine.dispose)
        with session_scope(engine) as session:
            _, token = create_token(session, "load")
        (workdir / "data" / "digits").mkdir(parents=True, exist_ok=True)
        trainer = workdir / "instant_trainer.py"
        trainer.write_text("")
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "FITFLEET_HOME": str(workdir / "home"),
            "FITFLEET_DATABASE_URL": url,
            "FITFLEET_BROKER_URL": BROKER_URL,
            "FITFLEET_DATA_ROOTS": str(workdir / "data"),
            "FITFLEET_WORKER_CHILD_COMMAND": json.dumps([sys.executable, "-S", str(trainer)]),
            "FITFLEET_WORKER_POLL_S": "0.05",
            "FITFLEET_WORKER_GPUS": "0",
            # Raw capacity: one token submits everything, so no per-token limit
            # (a 429 would be retried after its Retry-After anyway).
            "FITFLEET_SUBMIT_RATE_PER_S": "0" if not rate_limit else str(rate_limit),
        }
        port = free_port()
        api = start(
            [
                sys.executable, "-m", "uvicorn", "--factory", "services.api.app:create_app",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                "--workers", str(api_workers), "--no-access-log",
            ],
            env,
            workdir / "api.log",
        )  # fmt: skip
        stack.callback(stop, api)
        for index in range(workers):
            worker = start(
                [
                    sys.executable, "-m", "celery", "-A", "workers.celery_entry", "worker",
                    "-Q", queue, "-n", f"load{index}-{queue}@%h", "--pool", "prefork",
                    "--concurrency", "1", "--loglevel", "WARNING",
                    "--without-gossip", "--without-mingle", "--without-heartbeat",
                ],
                {**env, "FITFLEET_WORKER_NAME": f"load{index}-{queue}"},
                workdir / f"worker{index}.log",
            )  # fmt: skip
            stack.callback(stop, worker)
        dispatcher = start(
            [sys.executable, "-m", "cli", "dispatch", "--interval", "0.5"],
            env,
            workdir / "dispatch.log",
        )
        stack.callback(stop, dispatcher)
        wait_healthy(f"http://127.0.0.1:{port}", api)
        wait_workers(engine, workers)

        run_tag = secrets.token_hex(4)
        keys = [f"load-{run_tag}-{index}" for index in range(submissions)]
        ids = submit_all(
            port=port,
            token=token,
            body=spec_for(queue),
            keys=keys,
            clients=clients,
            client_timeout_s=client_timeout_s,
            max_attempts=max_attempts,
            result=result,
        )
        if progress:
            print(f"submitted in {result.submit_s:.1f} s; draining", file=sys.stderr, flush=True)

        drained_at = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        last_report = 0.0
        while True:
            with session_scope(engine) as session:
                open_runs = session.scalar(
                    select(func.count())
                    .select_from(SqlExperiment)
                    .where(SqlExperiment.state.not_in(TERMINAL))
                )
            if not open_runs:
                result.drain_s = time.perf_counter() - drained_at
                break
            if time.monotonic() > deadline:
                break
            if progress and time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                print(f"  {open_runs} runs not terminal yet", file=sys.stderr, flush=True)
            time.sleep(0.5)

        with session_scope(engine) as session:
            rows = session.execute(
                select(
                    SqlExperiment.id,
                    SqlExperiment.idempotency_key,
                    SqlExperiment.state,
                    SqlExperiment.attempt,
                )
            ).all()
            started = dict(
                session.execute(
                    select(SqlEvent.experiment_id, func.count())
                    .where(SqlEvent.kind == "started")
                    .group_by(SqlEvent.experiment_id)
                ).all()
            )
        result.runs_in_db = len(rows)
        by_key: dict[str | None, list[str]] = {}
        terminal: set[str] = set()
        for run_id, key, state, attempt in rows:
            by_key.setdefault(key, []).append(run_id)
            result.states[str(state)] = result.states.get(str(state), 0) + 1
            if state in TERMINAL_STATES:
                terminal.add(run_id)
            if attempt > 1 or started.get(run_id, 0) > 1:
                result.trained_twice += 1
        # Runs beyond one per key (and, apart, runs under a key no client got an id for).
        result.duplicates = sum(len(found) - 1 for found in by_key.values())
        result.unanswered_runs = sum(len(found) for key, found in by_key.items() if key not in ids)
        # Accepted, yet not in the database under its key, or not terminal at the end.
        result.lost = sum(
            1
            for key, run_id in ids.items()
            if run_id not in by_key.get(key, []) or run_id not in terminal
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--submissions", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--api-workers", type=int, default=2, help="uvicorn processes")
    parser.add_argument(
        "--timeout-s", type=float, default=600.0, help="how long to wait for every run to end"
    )
    parser.add_argument("--client-timeout-s", type=float, default=2.0)
    parser.add_argument("--max-attempts", type=int, default=20, help="per submission")
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=0.0,
        help="the API's submissions/s per token and process (default 0: off)",
    )
    args = parser.parse_args()
    result = run_load(
        submissions=args.submissions,
        clients=args.clients,
        workers=args.workers,
        timeout_s=args.timeout_s,
        client_timeout_s=args.client_timeout_s,
        max_attempts=args.max_attempts,
        api_workers=args.api_workers,
        rate_limit=args.rate_limit,
        progress=True,
    )
    print(f"{os.cpu_count()} CPUs, {args.api_workers} API processes")
    print(result.report())
    print("OK" if result.ok else "FAILED")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
