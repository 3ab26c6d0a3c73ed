"""The dashboard's queries on 10,000 runs of 50 epochs: p50/p95 latency over HTTP.

    PYTHONPATH=. python bench/dashboard.py                      # 10,000 x 50, MLflow too: ~20 min
    PYTHONPATH=. python bench/dashboard.py --mlflow-runs 2000   # MLflow filled with 2,000 only
    PYTHONPATH=. python bench/dashboard.py --runs 200 --epochs 5 --requests 10 --no-mlflow  # smoke

What it does, in one run (the machine is shared and noisy, so the baseline is
taken in the same run, request by request):

1. generates ``--runs`` runs of ``--epochs`` epochs (seeded): 4 datasets, 4
   archs, 2 stages (``head`` then ``all``), metrics ``error_rate`` and
   ``accuracy``, noisy train/valid loss curves; most runs succeeded, some
   failed part-way (a few distinct error texts with ids and numbers in them),
   some still running or queued.  Into a fresh Postgres database (migrated to
   head, dropped at the end unless ``--keep-db``) with COPY: ``experiments``,
   ``stages``, ``epoch_metrics``, and ``run_metrics`` computed from the same
   rows by :func:`shared.db.summaries.summarise` (the epoch upsert's rule);
   then VACUUM ANALYZE (what autovacuum leaves behind).  Generation and load
   times are printed.
2. starts the real API (``python -m cli api --workers 1``) on it and asks, over
   HTTP with httpx, one keep-alive connection, sequentially, ``--requests``
   rounds after a warm-up; each round asks every question once, in turn, so a
   burst of load from other processes hits all of them alike:

   * ``GET /healthz``: the baseline, the server's floor (routing, no database);
   * the runs page: default sort, ``sort=best:error_rate``, and one dataset
     ``sort=-final:accuracy`` (50 runs a page, each with every metric's final
     and best);
   * the leaderboard of one dataset by best ``error_rate`` (20 entries);
   * a 10-run comparison ``GET /v1/compare?ids=...`` (a different seeded set
     of 10 finished runs each round: spec differences and 10 x 50 epoch rows);
   * ``GET /v1/failures`` (failed runs grouped by reason) and ``GET /v1/datasets``.

   Printed per question: p50, p95 and max ms, p95 / the baseline's p95, and
   PASS or FAIL against the target (p95 < 100 ms); nothing is asserted.  Then
   EXPLAIN ANALYZE summaries (the plan's scans and indexes, rows, execution
   ms) of the statements the runs page and the leaderboard send.
3. with ``--mlflow`` (on by default when MLflow's venv is found, see
   ``scripts/mlflow-venv.sh``; MLflow is not a dependency of fitfleet): an
   MLflow tracking server (``mlflow server --workers 1``) on another fresh
   Postgres database, filled through its REST API with the same runs (one
   experiment; dataset and arch as tags and params; the 4 series as metrics
   with step = epoch over both stages; final status), and asked the same
   questions: ``runs/search`` (50, default order / ``metrics.error_rate ASC``
   / one dataset by ``metrics.accuracy ASC``), the leaderboard as
   ``runs/search`` of one dataset by ``metrics.error_rate ASC`` (20) -- MLflow
   orders by a metric's *last* value, not its best, so it is not the same
   ranking --, and the comparison as its compare page fetches it: ``runs/get``
   and ``metrics/get-history`` of each of the 4 metrics for each of the 10
   runs (50 requests, 6 at a time like a browser).  Failed runs: a
   ``runs/search`` of status FAILED (no grouping in MLflow).  Ratios are
   MLflow p95 / fitfleet p95.  Filling MLflow is slow (thousands of REST
   calls); ``--mlflow-runs N`` fills it with the first N runs only, and
   fitfleet is then measured again on a database of the same N runs, so the
   ratio compares equal sizes.

Targets (the issue): with 10,000 runs of 50 epochs, the leaderboard, the runs
page and a 10-run comparison each answer in under 100 ms at p95.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.api.crud import spec_hash  # noqa: E402
from services.api.tokens import create_token  # noqa: E402
from shared.db.session import make_engine, normalize_url, session_scope  # noqa: E402
from shared.db.summaries import summarise  # noqa: E402
from shared.db.upgrade import upgrade  # noqa: E402
from shared.results import higher_is_better  # noqa: E402
from shared.spec import ExperimentSpec  # noqa: E402

ADMIN_URL = os.environ.get(
    "FITFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
TARGET_MS = 100.0
PROJECT = "bench"
DATASETS = ("cifar10", "imagenette", "oxford-pets", "food101")
# (arch, how much lower its error is than resnet18's, trainable params)
ARCHS = (
    ("resnet18", 1.0, 11_200_000),
    ("resnet34", 0.9, 21_300_000),
    ("resnet50", 0.8, 23_500_000),
    ("mobilenet_v3_large", 1.05, 5_400_000),
)
BASE_ERROR = {"cifar10": 0.07, "imagenette": 0.12, "oxford-pets": 0.09, "food101": 0.22}
ERRORS = (
    "CUDA out of memory. Tried to allocate {n}.00 MiB (GPU 0; 79.15 GiB total capacity; "
    "{m}.31 GiB already allocated)",
    "loss diverged: valid_loss is nan in stage all epoch {n}",
    "FileNotFoundError: [Errno 2] No such file or directory: '/data/pets/images/img_{n}.jpg'",
    "worker wrk_{id} lost: lease expired after {n} s",
    "DataLoader worker (pid {n}) is killed by signal: Killed.",
)
MLFLOW_SEARCH_PAGE = 1000


# ----------------------------------------------------------------------------------------
# generated data


@dataclass
class Run:
    """One generated run: its experiment row's fields and its epoch rows, in run order."""

    id: str
    name: str
    dataset: str
    arch: str
    params: int
    max_lr: float
    spec: dict[str, Any]
    state: str
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # (stage, epoch, train_loss, valid_loss, error_rate, accuracy, seconds, lr)
    epochs: list[tuple[str, int, float, float | None, float, float, float, float]] = field(
        default_factory=list
    )


def stage_sizes(epochs: int) -> tuple[int, int]:
    head = max(1, epochs // 5) if epochs > 1 else 1
    return head, max(0, epochs - head)


def base_specs(epochs: int) -> dict[tuple[str, str], dict[str, Any]]:
    head, rest = stage_sizes(epochs)
    stages = [{"name": "head", "train": "head", "epochs": head}]
    if rest:
        stages.append({"name": "all", "train": "all", "epochs": rest})
    out = {}
    for dataset in DATASETS:
        for arch, _, _ in ARCHS:
            spec = ExperimentSpec.model_validate(
                {
                    "name": "x",
                    "project": PROJECT,
                    "data": {"source": dataset, "size": 224},
                    "model": {"arch": arch, "pretrained": "imagenet"},
                    "metrics": ["error_rate", "accuracy"],
                    "stages": stages,
                    "resources": {"gpus": 1, "queue": "gpu"},
                }
            )
            out[dataset, arch] = spec.model_dump(mode="json")
    return out


def generate(count: int, epochs: int, seed: int = 0) -> list[Run]:
    """``count`` runs, their states and curves, the same for the same seed."""
    rng = random.Random(seed)
    specs = base_specs(epochs)
    head, _ = stage_sizes(epochs)
    now = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    start = now - timedelta(days=90)
    step = timedelta(days=90) / max(1, count)
    id_alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    runs: list[Run] = []
    for index in range(count):
        dataset = DATASETS[index % len(DATASETS)]
        arch, arch_factor, params = ARCHS[(index // len(DATASETS)) % len(ARCHS)]
        max_lr = 10 ** rng.uniform(-4, -2)
        created = start + step * index + timedelta(seconds=rng.uniform(0, 60))
        draw = rng.random()
        state = (
            "succeeded"
            if draw < 0.80
            else "failed"
            if draw < 0.92
            else "running"
            if draw < 0.97
            else "cancelled"
            if draw < 0.985
            else "queued"
        )
        if index >= count - 5:  # the newest few are always in flight
            state = "running"
        spec = copy.deepcopy(specs[dataset, arch])
        spec["name"] = f"{dataset}-{arch}-{index}"
        spec["seed"] = index
        for stage in spec["stages"]:
            stage["max_lr"] = round(max_lr if stage["name"] == "all" else max_lr * 10, 8)
        run = Run(
            id="exp_" + "".join(rng.choice(id_alphabet) for _ in range(12)),
            name=spec["name"],
            dataset=dataset,
            arch=arch,
            params=params,
            max_lr=max_lr,
            spec=spec,
            state=state,
            error=None,
            created_at=created,
            started_at=None,
            finished_at=None,
        )
        if state == "queued":
            runs.append(run)
            continue
        done = epochs
        diverged = False
        if state == "failed":
            kind = rng.randrange(len(ERRORS))
            diverged = kind == 1
            done = rng.randrange(0, epochs)
            run.error = ERRORS[kind].format(
                n=rng.randrange(10, 9999),
                m=rng.randrange(10, 79),
                id="".join(rng.choice(id_alphabet) for _ in range(8)),
            )
        elif state in {"running", "cancelled"}:
            done = rng.randrange(1, epochs + 1) if epochs > 1 else 1
        # a curve: error falls from ~0.9 towards this run's floor, the valid loss
        # follows it and creeps up again late in some runs (overfitting)
        floor = min(0.9, BASE_ERROR[dataset] * arch_factor * math.exp(rng.gauss(0, 0.2)))
        floor *= 1 + 2 * abs(math.log10(max_lr) + 3) / 3  # far from lr 1e-3 trains worse
        floor = min(0.85, floor)
        tau = max(1.0, epochs * rng.uniform(0.1, 0.3))
        overfit = rng.uniform(0, 0.02)
        seconds_per_epoch = rng.uniform(20, 90)
        started = created + timedelta(seconds=rng.uniform(5, 600))
        run.started_at = started
        at = started
        for t in range(done):
            stage, epoch = ("head", t) if t < head else ("all", t - head)
            err = floor + (0.9 - floor) * math.exp(-t / tau) + rng.gauss(0, 0.008)
            err = min(1.0, max(0.0, err))
            late = max(0.0, t - 0.6 * epochs)
            valid: float | None = 0.05 + 2.2 * err + overfit * late + abs(rng.gauss(0, 0.02))
            train = 0.03 + 2.0 * err * math.exp(-t / (3 * tau)) + abs(rng.gauss(0, 0.03))
            if diverged and t >= done - 2:
                valid = None
            seconds = seconds_per_epoch * rng.uniform(0.95, 1.05)
            at += timedelta(seconds=seconds)
            run.epochs.append(
                (stage, epoch, train, valid, err, 1.0 - err, seconds, max_lr * rng.random())
            )
        if state in {"succeeded", "failed", "cancelled"}:
            run.finished_at = at + timedelta(seconds=rng.uniform(1, 30))
        runs.append(run)
    return runs


def epoch_values(row: tuple[Any, ...]) -> dict[str, float | None]:
    return {"valid_loss": row[3], "train_loss": row[2], "error_rate": row[4], "accuracy": row[5]}


# ----------------------------------------------------------------------------------------
# Postgres


def admin_dsn() -> str:
    return (
        normalize_url(ADMIN_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    )


def create_database(prefix: str) -> tuple[str, str]:
    """A fresh empty database: (its name, its psycopg DSN)."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = normalize_url(ADMIN_URL).set(drivername="postgresql", database=name)
    return name, dsn.render_as_string(hide_password=False)


def drop_database(name: str) -> None:
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def load_fitfleet(dsn: str, runs: list[Run], token_id: str) -> dict[str, float]:
    """COPY the runs into a migrated database; seconds per phase."""
    timings: dict[str, float] = {}
    began = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO projects (id, description, created_at) VALUES (%s, '', now()) "
                "ON CONFLICT DO NOTHING",
                (PROJECT,),
            )
            columns = (
                "id, project_id, name, spec, spec_hash, state, attempt, queue, priority, "
                "submitted_by, tags, arch, dataset, created_at, updated_at, started_at, "
                "finished_at, error, current_stage, current_epoch, lease_owner, "
                "lease_expires_at, cancel_requested"
            )
            with cur.copy(f"COPY experiments ({columns}) FROM STDIN") as copy_in:
                for run in runs:
                    last = run.epochs[-1] if run.epochs else None
                    running = run.state == "running"
                    document = run.spec
                    copy_in.write_row(
                        (
                            run.id,
                            PROJECT,
                            run.name,
                            json.dumps(document),
                            spec_hash(document),
                            run.state,
                            0 if run.state == "queued" else 1,
                            "gpu",
                            5,
                            token_id,
                            json.dumps([run.dataset, run.arch]),
                            run.arch,
                            run.dataset,
                            run.created_at,
                            run.finished_at or run.started_at or run.created_at,
                            run.started_at,
                            run.finished_at,
                            run.error,
                            last[0] if last else None,
                            last[1] if last else None,
                            "wrk_bench" if running else None,
                            run.created_at + timedelta(days=365) if running else None,
                            run.state == "cancelled",
                        )
                    )
            timings["experiments"] = time.perf_counter() - began
            mark = time.perf_counter()
            columns = (
                "experiment_id, name, position, train, epochs, schedule, lrs, started_at, "
                "finished_at, kept, kept_epoch, reverted, diverged, trainable_params, seconds"
            )
            with cur.copy(f"COPY stages ({columns}) FROM STDIN") as copy_in:
                for run in runs:
                    if run.started_at is None:
                        continue
                    for position, stage in enumerate(run.spec["stages"]):
                        rows = [r for r in run.epochs if r[0] == stage["name"]]
                        if not rows and position > 0:
                            continue
                        copy_in.write_row(
                            (
                                run.id,
                                stage["name"],
                                position,
                                stage["train"],
                                stage["epochs"],
                                "one_cycle",
                                json.dumps([stage["max_lr"]]),
                                run.started_at,
                                run.finished_at if rows and len(rows) == stage["epochs"] else None,
                                "last",
                                rows[-1][1] if rows else None,
                                False,
                                any(r[3] is None for r in rows),
                                run.params if stage["train"] == "all" else 600_000,
                                sum(r[6] for r in rows),
                            )
                        )
            timings["stages"] = time.perf_counter() - mark
            mark = time.perf_counter()
            columns = (
                "experiment_id, stage, epoch, attempt, train_loss, valid_loss, metrics, "
                "seconds, images_per_second, lr, batch_size, recorded_at"
            )
            with cur.copy(f"COPY epoch_metrics ({columns}) FROM STDIN") as copy_in:
                for run in runs:
                    at = run.started_at
                    for stage, epoch, train, valid, err, acc, seconds, lr in run.epochs:
                        assert at is not None
                        at += timedelta(seconds=seconds)
                        copy_in.write_row(
                            (
                                run.id,
                                stage,
                                epoch,
                                1,
                                train,
                                valid,
                                f'{{"error_rate": {err!r}, "accuracy": {acc!r}}}',
                                seconds,
                                50_000 / seconds,
                                lr,
                                64,
                                at,
                            )
                        )
            timings["epoch_metrics"] = time.perf_counter() - mark
            mark = time.perf_counter()
            columns = (
                "experiment_id, metric, final, best, best_stage, best_epoch, "
                "higher_is_better, epochs"
            )
            with cur.copy(f"COPY run_metrics ({columns}) FROM STDIN") as copy_in:
                for run in runs:
                    rows = ((r[0], r[1], epoch_values(r)) for r in run.epochs)
                    for name, s in summarise(rows).items():
                        copy_in.write_row(
                            (
                                run.id,
                                name,
                                s.final,
                                s.best,
                                s.best_stage,
                                s.best_epoch,
                                higher_is_better(name),
                                s.epochs,
                            )
                        )
            timings["run_metrics"] = time.perf_counter() - mark
        conn.commit()
    mark = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        # VACUUM too: autovacuum does it to a table after enough inserts, and
        # index-only scans (counts) need the visibility map it sets.
        conn.execute("VACUUM ANALYZE")
    timings["vacuum_analyze"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - began
    return timings


# ----------------------------------------------------------------------------------------
# measuring


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_http(url: str, seconds: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}) before answering {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"no answer from {url} in {seconds:.0f} s")


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, 15)
        process.wait(20)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        process.wait(5)


Question = Callable[[int], None]


def measure(questions: dict[str, Question], requests: int, warmup: int) -> dict[str, list[float]]:
    """Round-robin: each round asks every question once; seconds per answer."""
    for index in range(warmup):
        for ask in questions.values():
            ask(-1 - index)
    latencies: dict[str, list[float]] = {label: [] for label in questions}
    for index in range(requests):
        for label, ask in questions.items():
            began = time.perf_counter()
            ask(index)
            latencies[label].append(time.perf_counter() - began)
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(latencies) * 1e3,
        "p95_ms": percentile(latencies, 0.95) * 1e3,
        "max_ms": max(latencies) * 1e3,
        "n": len(latencies),
    }


def comparison_sets(runs: list[Run], rounds: int, seed: int = 1) -> list[list[Run]]:
    rng = random.Random(seed)
    finished = [r for r in runs if r.state == "succeeded"] or runs
    return [rng.sample(finished, min(10, len(finished))) for _ in range(rounds)]


def fitfleet_questions(
    client: httpx.Client, runs: list[Run], sets: list[list[Run]]
) -> dict[str, Question]:
    dataset = DATASETS[0]

    def get(path: str, params: dict[str, Any] | None = None) -> Question:
        def ask(_: int) -> None:
            answer = client.get(path, params=params)
            if answer.status_code != 200:
                raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:300]}")

        return ask

    def compare(index: int) -> None:
        ids = ",".join(r.id for r in sets[index % len(sets)])
        answer = client.get("/v1/compare", params={"ids": ids})
        if answer.status_code != 200:
            raise RuntimeError(f"/v1/compare: {answer.status_code} {answer.text[:300]}")

    return {
        "baseline: GET /healthz": get("/healthz"),
        "runs page, default sort": get("/v1/runs", {"limit": 50}),
        "runs page, best:error_rate": get("/v1/runs", {"sort": "best:error_rate", "limit": 50}),
        f"runs page, {dataset}, -final:accuracy": get(
            "/v1/runs", {"dataset": dataset, "sort": "-final:accuracy", "limit": 50}
        ),
        f"leaderboard {dataset} error_rate": get(
            "/v1/leaderboard", {"metric": "error_rate", "dataset": dataset, "limit": 20}
        ),
        "compare 10 runs": compare,
        "failures": get("/v1/failures"),
        "datasets": get("/v1/datasets"),
    }


#: Questions the target applies to (the issue's three).
TARGETED = ("runs page", "leaderboard", "compare")


def plan_nodes(node: dict[str, Any]) -> list[str]:
    """A JSON plan's nodes, depth first: type, index or table, actual rows."""
    kind = node["Node Type"]
    if "Index Name" in node:
        kind += f" {node['Index Name']}"
    elif "Relation Name" in node:
        kind += f" {node['Relation Name']}"
    out = [f"{kind} ({node.get('Actual Rows', '?')} rows)"]
    for child in node.get("Plans", []):
        out.extend(plan_nodes(child))
    return out


def explain_plans(url: str, dsn: str) -> list[dict[str, Any]]:
    """EXPLAIN ANALYZE of each statement the runs page and the leaderboard send."""
    from sqlalchemy import event

    from services.api import queries
    from services.api.auth import Caller

    engine = make_engine(url)
    captured: list[tuple[str, str, Any]] = []
    label = [""]

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        captured.append((label[0], statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    caller = Caller(token_id="tok_bench", project=None, is_admin=True)
    try:
        label[0] = "runs page default sort"
        queries.list_runs(engine=engine, caller=caller, filters=queries.RunFilters(), limit=50)
        label[0] = "runs page best:error_rate"
        queries.list_runs(
            engine=engine,
            caller=caller,
            filters=queries.RunFilters(),
            sort="best:error_rate",
            limit=50,
        )
        label[0] = f"runs page {DATASETS[0]} -final:accuracy"
        queries.list_runs(
            engine=engine,
            caller=caller,
            filters=queries.RunFilters(dataset=DATASETS[0]),
            sort="-final:accuracy",
            limit=50,
        )
        label[0] = "leaderboard"
        queries.leaderboard(
            engine=engine, caller=caller, metric="error_rate", dataset=DATASETS[0], limit=20
        )
    finally:
        engine.dispose()
    plans: list[dict[str, Any]] = []
    with psycopg.connect(dsn) as conn:
        for what, statement, parameters in captured:
            if not statement.lstrip().upper().startswith("SELECT"):
                continue
            text = "EXPLAIN (ANALYZE, FORMAT JSON) " + statement
            row = conn.execute(text, parameters).fetchone()
            assert row is not None
            plan = row[0][0]
            nodes = plan_nodes(plan["Plan"])
            first = " ".join(statement.split())[:60]
            plans.append(
                {
                    "query": what,
                    "statement": first,
                    "execution_ms": plan["Execution Time"],
                    "nodes": nodes,
                }
            )
        conn.rollback()
    return plans


def bench_fitfleet(
    runs: list[Run], requests: int, warmup: int, keep_db: bool, plans: bool
) -> dict[str, Any]:
    """Load ``runs`` into a fresh database, start the API, measure; results."""
    name, dsn = create_database("fitfleet_dash")
    url = normalize_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    server = None
    result: dict[str, Any] = {"database": name, "runs": len(runs)}
    try:
        began = time.perf_counter()
        upgrade(url)
        engine = make_engine(url)
        with session_scope(engine) as session:
            token_id, secret = create_token(session, None, admin=True, name="bench")
        engine.dispose()
        result["migrate_s"] = time.perf_counter() - began
        result["load_s"] = load_fitfleet(dsn, runs, token_id)
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT pg_database_size(current_database()), "
                "(SELECT count(*) FROM epoch_metrics), (SELECT count(*) FROM run_metrics)"
            ).fetchone()
        assert row is not None
        result["db_bytes"], result["epoch_rows"], result["run_metric_rows"] = row
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(tmp)
            (home / "data").mkdir()
            port = free_port()
            env = {
                **os.environ,
                "PYTHONPATH": str(REPO),
                "FITFLEET_HOME": str(home),
                "FITFLEET_DATABASE_URL": url,
                "FITFLEET_DATA_ROOTS": str(home / "data"),
                "FITFLEET_PUBLISH_ON_SUBMIT": "0",
            }
            server = subprocess.Popen(
                [sys.executable, "-m", "cli", "api", "--port", str(port), "--workers", "1"],
                env=env,
                cwd=REPO,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/healthz", 60, server)
            sets = comparison_sets(runs, max(requests, 1))
            headers = {"Authorization": f"Bearer {secret}"}
            with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
                questions = fitfleet_questions(client, runs, sets)
                latencies = measure(questions, requests, warmup)
            result["latencies"] = {label: summary(lat) for label, lat in latencies.items()}
            if plans:
                result["plans"] = explain_plans(url, dsn)
    finally:
        stop(server)
        if not keep_db:
            drop_database(name)
    return result


# ----------------------------------------------------------------------------------------
# MLflow


def find_mlflow() -> Path | None:
    """The MLflow venv's ``mlflow`` executable: $FITFLEET_MLFLOW_VENV or the script's default."""
    venv = os.environ.get("FITFLEET_MLFLOW_VENV") or str(
        Path.home() / ".cache" / "fitfleet" / "mlflow-venv"
    )
    executable = Path(venv) / "bin" / "mlflow"
    return executable if executable.exists() else None


def mlflow_version(executable: Path) -> str:
    python = executable.parent / "python"
    out = subprocess.run(
        [str(python), "-c", "import mlflow; print(mlflow.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "?"


class MlflowFiller:
    """Writes the generated runs into an MLflow server through its REST API."""

    def __init__(self, base: str, threads: int) -> None:
        self.base = base
        self.threads = threads
        self.local = threading.local()
        self.requests = 0
        self.lock = threading.Lock()

    def client(self) -> httpx.Client:
        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = httpx.Client(base_url=self.base, timeout=120)
        return client

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = self.client().post(f"/api/2.0/mlflow/{path}", json=body)
        with self.lock:
            self.requests += 1
        if answer.status_code != 200:
            raise RuntimeError(f"MLflow {path}: {answer.status_code} {answer.text[:300]}")
        return dict(answer.json())

    def fill(self, runs: list[Run], experiment_id: str) -> dict[str, str]:
        """Run id -> MLflow run id."""
        mapping: dict[str, str] = {}

        def one(run: Run) -> None:
            start_ms = int((run.started_at or run.created_at).timestamp() * 1000)
            created = self.post(
                "runs/create",
                {
                    "experiment_id": experiment_id,
                    "run_name": run.name,
                    "start_time": start_ms,
                    "tags": [
                        {"key": "dataset", "value": run.dataset},
                        {"key": "arch", "value": run.arch},
                        {"key": "fitfleet_id", "value": run.id},
                    ],
                },
            )
            mlflow_id = created["run"]["info"]["run_id"]
            params = [
                {"key": "dataset", "value": run.dataset},
                {"key": "arch", "value": run.arch},
                {"key": "max_lr", "value": repr(run.max_lr)},
                {"key": "seed", "value": str(run.spec["seed"])},
            ] + [
                {"key": f"stages.{s['name']}.epochs", "value": str(s["epochs"])}
                for s in run.spec["stages"]
            ]
            metrics: list[dict[str, Any]] = []
            at = start_ms
            for step, row in enumerate(run.epochs):
                at += int(row[6] * 1000)
                for key, value in epoch_values(row).items():
                    if value is None:
                        continue  # a diverged loss: not logged (JSON has no NaN)
                    metrics.append({"key": key, "value": value, "timestamp": at, "step": step})
            tags = [{"key": "error", "value": run.error[:5000]}] if run.error else []
            first = True
            for offset in range(0, max(1, len(metrics)), 1000):
                body: dict[str, Any] = {
                    "run_id": mlflow_id,
                    "metrics": metrics[offset : offset + 1000],
                }
                if first:
                    body["params"], body["tags"] = params, tags
                    first = False
                self.post("runs/log-batch", body)
            status = {
                "succeeded": "FINISHED",
                "failed": "FAILED",
                "cancelled": "KILLED",
                "running": "RUNNING",
                "queued": "SCHEDULED",
            }[run.state]
            update: dict[str, Any] = {"run_id": mlflow_id, "status": status}
            if run.finished_at is not None:
                update["end_time"] = int(run.finished_at.timestamp() * 1000)
            if status != "RUNNING":
                self.post("runs/update", update)
            mapping[run.id] = mlflow_id

        with ThreadPoolExecutor(self.threads) as pool:
            for future in [pool.submit(one, run) for run in runs]:
                future.result()
        return mapping


def mlflow_questions(
    client: httpx.Client,
    experiment_id: str,
    sets: list[list[Run]],
    mapping: dict[str, str],
    browser: ThreadPoolExecutor,
) -> dict[str, Question]:
    dataset = DATASETS[0]

    def search(body: dict[str, Any]) -> Question:
        full = {"experiment_ids": [experiment_id], **body}

        def ask(_: int) -> None:
            answer = client.post("/api/2.0/mlflow/runs/search", json=full)
            if answer.status_code != 200:
                raise RuntimeError(f"runs/search: {answer.status_code} {answer.text[:300]}")

        return ask

    local = threading.local()
    base = str(client.base_url)

    def browser_get(path: str, params: dict[str, Any]) -> None:
        own = getattr(local, "client", None)
        if own is None:
            own = local.client = httpx.Client(base_url=base, timeout=60)
        answer = own.get(path, params=params)
        if answer.status_code != 200:
            raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:300]}")

    def compare(index: int) -> None:
        jobs = []
        for run in sets[index % len(sets)]:
            run_id = mapping[run.id]
            jobs.append(browser.submit(browser_get, "/api/2.0/mlflow/runs/get", {"run_id": run_id}))
            for metric in ("valid_loss", "train_loss", "error_rate", "accuracy"):
                jobs.append(
                    browser.submit(
                        browser_get,
                        "/api/2.0/mlflow/metrics/get-history",
                        {"run_id": run_id, "metric_key": metric},
                    )
                )
        for job in jobs:
            job.result()

    def health(_: int) -> None:
        client.get("/health").raise_for_status()

    return {
        "baseline: GET /health": health,
        "runs page, default sort": search({"max_results": 50}),
        "runs page, best:error_rate": search(
            {"max_results": 50, "order_by": ["metrics.error_rate ASC"]}
        ),
        f"runs page, {dataset}, -final:accuracy": search(
            {
                "max_results": 50,
                "filter": f"tags.dataset = '{dataset}'",
                "order_by": ["metrics.accuracy ASC"],
            }
        ),
        f"leaderboard {dataset} error_rate": search(
            {
                "max_results": 20,
                "filter": f"params.dataset = '{dataset}'",
                "order_by": ["metrics.error_rate ASC"],
            }
        ),
        "compare 10 runs": compare,
        "failures": search(
            {"max_results": MLFLOW_SEARCH_PAGE, "filter": "attributes.status = 'FAILED'"}
        ),
    }


def bench_mlflow(
    executable: Path, runs: list[Run], requests: int, warmup: int, threads: int, keep_db: bool
) -> dict[str, Any]:
    name, dsn = create_database("mlflow_dash")
    server = None
    result: dict[str, Any] = {"database": name, "runs": len(runs)}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            command = [
                str(executable),
                "server",
                "--backend-store-uri",
                # psycopg2 named: MLflow's SQLAlchemy (2.1) defaults to psycopg 3
                dsn.replace("postgresql://", "postgresql+psycopg2://", 1),
                "--default-artifact-root",
                f"{tmp}/artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ]
            log = open(Path(tmp) / "mlflow.log", "wb")  # noqa: SIM115
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            began = time.perf_counter()
            server = subprocess.Popen(
                command, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
            )
            base = f"http://127.0.0.1:{port}"
            try:
                wait_http(f"{base}/health", 300, server)
            except RuntimeError:
                log.close()
                print((Path(tmp) / "mlflow.log").read_text()[-3000:], file=sys.stderr)
                raise
            result["start_s"] = time.perf_counter() - began
            filler = MlflowFiller(base, threads)
            experiment_id = filler.post("experiments/create", {"name": "bench"})["experiment_id"]
            began = time.perf_counter()
            mapping = filler.fill(runs, experiment_id)
            result["fill_s"] = time.perf_counter() - began
            result["fill_requests"] = filler.requests
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")
                row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
            assert row is not None
            result["db_bytes"] = row[0]
            sets = comparison_sets(runs, max(requests, 1))
            with (
                httpx.Client(base_url=base, timeout=120) as client,
                ThreadPoolExecutor(6) as browser,
            ):
                questions = mlflow_questions(client, experiment_id, sets, mapping, browser)
                latencies = measure(questions, requests, warmup)
            result["latencies"] = {label: summary(lat) for label, lat in latencies.items()}
            log.close()
    finally:
        stop(server)
        if not keep_db:
            drop_database(name)
    return result


# ----------------------------------------------------------------------------------------
# report


def print_table(title: str, result: dict[str, Any]) -> None:
    lat = result["latencies"]
    baseline_label = next(label for label in lat if label.startswith("baseline"))
    floor = lat[baseline_label]["p95_ms"]
    print(title)
    print(f"  {'question':42} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'p95/base':>9}  target")
    for label, s in lat.items():
        verdict = ""
        if any(label.startswith(t) for t in TARGETED):
            verdict = "PASS" if s["p95_ms"] < TARGET_MS else "FAIL"
        ratio = s["p95_ms"] / floor if floor else float("nan")
        print(
            f"  {label:42} {s['p50_ms']:8.1f} {s['p95_ms']:8.1f} {s['max_ms']:8.1f} "
            f"{ratio:9.1f}  {verdict}"
        )


def print_ratio(fitfleet: dict[str, Any], mlflow: dict[str, Any]) -> None:
    print(f"MLflow / fitfleet, p95, both on {mlflow['runs']} runs:")
    for label, s in mlflow["latencies"].items():
        key = label if not label.startswith("baseline") else "baseline: GET /healthz"
        mine = fitfleet["latencies"].get(key)
        if mine is None:
            continue
        ratio = s["p95_ms"] / mine["p95_ms"]
        note = ""
        if label.startswith("leaderboard"):
            note = "  (MLflow ranks by the LAST value, fitfleet by the best)"
        if label == "failures":
            note = "  (MLflow: a search of FAILED runs, no grouping by reason)"
        if label.startswith("compare"):
            note = "  (MLflow: 10 runs/get + 40 metrics/get-history, 6 at a time)"
        print(f"  {label:42} {s['p95_ms']:8.1f} / {mine['p95_ms']:6.1f} = {ratio:6.2f}{note}")


def print_load(result: dict[str, Any]) -> None:
    load = result["load_s"]
    phases = ", ".join(f"{k} {v:.1f}" for k, v in load.items() if k != "total")
    print(
        f"  loaded {result['runs']} runs, {result['epoch_rows']} epoch rows, "
        f"{result['run_metric_rows']} run_metrics rows in {load['total']:.1f} s ({phases}); "
        f"migrate {result['migrate_s']:.1f} s; database {result['db_bytes'] / 2**20:.0f} MiB"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=50, help="per run, over both stages")
    parser.add_argument("--requests", type=int, default=100, help="timed rounds per question")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--keep-db", action="store_true", help="do not drop the databases")
    parser.add_argument("--no-plans", action="store_true", help="skip EXPLAIN ANALYZE")
    parser.add_argument(
        "--mlflow",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare with an MLflow server (default: when its venv is found)",
    )
    parser.add_argument(
        "--mlflow-runs", type=int, default=None, help="fill MLflow with this many runs only"
    )
    parser.add_argument("--mlflow-threads", type=int, default=4, help="concurrent fill requests")
    args = parser.parse_args(argv)

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a file
    started = time.perf_counter()
    load_start = os.getloadavg()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "runs": args.runs,
        "epochs": args.epochs,
        "requests": args.requests,
        "target_p95_ms": TARGET_MS,
    }
    began = time.perf_counter()
    runs = generate(args.runs, args.epochs, args.seed)
    results["generate_s"] = time.perf_counter() - began
    states: dict[str, int] = {}
    for run in runs:
        states[run.state] = states.get(run.state, 0) + 1
    print(
        f"fitfleet dashboard benchmark  {results['date']}  {os.cpu_count()} CPUs  "
        f"load 1m/5m {load_start[0]:.1f}/{load_start[1]:.1f} at start"
    )
    print(
        f"generated {len(runs)} runs x {args.epochs} epochs in {results['generate_s']:.1f} s: "
        + ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
    )
    results["states"] = states
    fitfleet = bench_fitfleet(runs, args.requests, args.warmup, args.keep_db, not args.no_plans)
    results["fitfleet"] = fitfleet
    print_load(fitfleet)
    print_table(
        f"fitfleet, {len(runs)} runs, {args.requests} requests each after {args.warmup} "
        "warm-up rounds, sequential, one keep-alive connection:",
        fitfleet,
    )
    for plan in fitfleet.get("plans", []):
        print(
            f"  plan {plan['query']}: {plan['statement']!r} {plan['execution_ms']:.1f} ms: "
            + " > ".join(plan["nodes"][:6])
        )

    executable = find_mlflow()
    want = args.mlflow if args.mlflow is not None else executable is not None
    if want and executable is None:
        print("MLflow: no venv found (scripts/mlflow-venv.sh): skipped")
        results["mlflow"] = None
    elif want:
        assert executable is not None
        count = min(args.runs, args.mlflow_runs or args.runs)
        subset = runs[:count]
        print(f"MLflow {mlflow_version(executable)}: filling {count} runs ...", flush=True)
        mlflow = bench_mlflow(
            executable, subset, args.requests, args.warmup, args.mlflow_threads, args.keep_db
        )
        results["mlflow"] = mlflow
        print(
            f"  server up in {mlflow['start_s']:.1f} s; filled {count} runs "
            f"({mlflow['fill_requests']} REST calls, {args.mlflow_threads} threads) in "
            f"{mlflow['fill_s']:.1f} s; database {mlflow['db_bytes'] / 2**20:.0f} MiB"
        )
        if count < args.runs:
            print(f"  MLflow holds {count} of the {args.runs} runs: fitfleet again at {count}")
            same = bench_fitfleet(subset, args.requests, args.warmup, args.keep_db, False)
            results["fitfleet_same_size"] = same
            print_load(same)
            print_table(f"fitfleet, {count} runs (MLflow's size):", same)
        else:
            same = fitfleet
        print_table(f"MLflow tracking server, {count} runs, same questions:", mlflow)
        print_ratio(same, mlflow)
    else:
        results["mlflow"] = None
        print("MLflow: not asked (--no-mlflow)")
    results["wall_s"] = time.perf_counter() - started
    load_end = os.getloadavg()
    results["load"] = {"start": load_start[:2], "end": load_end[:2]}
    misses = [
        label
        for label, s in fitfleet["latencies"].items()
        if any(label.startswith(t) for t in TARGETED) and s["p95_ms"] >= TARGET_MS
    ]
    verdict = "all meet" if not misses else f"{len(misses)} miss ({', '.join(misses)})"
    print(
        f"target p95 < {TARGET_MS:.0f} ms for the runs page, leaderboard and 10-run comparison "
        f"at {len(runs)} runs: {verdict}"
    )
    print(
        f"total wall time {results['wall_s']:.0f} s; load 1m/5m "
        f"{load_end[0]:.1f}/{load_end[1]:.1f} at end"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
