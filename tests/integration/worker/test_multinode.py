"""Multi-node DDP on one machine: two real Celery workers act as two nodes (loopback).

A run with ``resources.nodes: 2`` (one gloo rank per node, world size 2) is
placed by the dispatcher on both workers at once; each runs torchrun with the
gang's c10d rendezvous. Then the same with one node's worker killed (SIGKILL
to its Celery processes and its torchrun) after the first epoch: the
surviving node puts the run back in the queue, a fresh gang (the survivor and
a new worker) resumes it from the checkpoint in the store, and it succeeds
with every epoch row exactly once.

Real Postgres, Redis and processes; each worker has its own FITFLEET_HOME, as
separate machines would, and they share only the database, the broker and
the artifact store.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from shared.db.models import (
    ExperimentState,
    SqlEpochMetric,
    SqlEvent,
    SqlExperiment,
    SqlOutbox,
    SqlProject,
)
from shared.db.session import make_engine, session_scope
from shared.runs import train_message
from shared.settings import Settings
from shared.spec import ExperimentSpec
from shared.spec_io import dump_spec
from shared.storage.registry import open_store
from tests.faults.harness import Dispatcher, kill_tree, wait_for
from tests.integration.celery_worker import celery_worker, redis_or_fail, unique_queue
from tests.integration.pg import temporary_database

pytestmark = [pytest.mark.integration, pytest.mark.distributed, pytest.mark.slow]

REDIS_URL = os.environ.get("FITFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
HEARTBEAT_S = 0.5
EPOCHS = (2, 2)  # head, all


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with temporary_database("multinode") as url:
        yield url


def _submit(engine: Any, queue: str, data_root: Path, name: str) -> str:
    spec = ExperimentSpec.model_validate(
        {
            "version": 1,
            "name": name,
            "project": "nodes",
            "data": {
                "source": str(data_root / "digits"),
                "split": {"by": "folder"},
                "size": 16,
                "batch_size": 32,
                "augment": "none",
            },
            "model": {"arch": "resnet18", "pretrained": "none"},
            "stages": [
                {"name": "head", "train": "head", "epochs": EPOCHS[0], "max_lr": 1e-2},
                {"name": "all", "train": "all", "epochs": EPOCHS[1], "max_lr": [1e-4, 1e-3]},
            ],
            "interpret": {"show_batch": None, "confusion_matrix": False},
            "resources": {"queue": queue, "gpus": 1, "nodes": 2, "max_restarts": 3},
        }
    )
    with session_scope(engine) as session:
        if session.get(SqlProject, "nodes") is None:
            session.add(SqlProject(id="nodes"))
            session.flush()
        run = SqlExperiment(
            project_id="nodes",
            name=name,
            spec=dump_spec(spec),
            spec_hash="0" * 64,
            state=ExperimentState.QUEUED,
            queue=queue,
            priority=5,
            arch="resnet18",
            dataset="digits",
        )
        session.add(run)
        session.flush()
        session.add(train_message(run))
        return run.id


def _state(engine: Any, run_id: str) -> SqlExperiment:
    with session_scope(engine) as session:
        row = session.get(SqlExperiment, run_id)
        assert row is not None
        session.expunge(row)
        return row


def _epoch_rows(engine: Any, run_id: str) -> list[tuple[str, int]]:
    with session_scope(engine) as session:
        return [
            (stage, epoch)
            for stage, epoch in session.execute(
                select(SqlEpochMetric.stage, SqlEpochMetric.epoch).where(
                    SqlEpochMetric.experiment_id == run_id
                )
            )
        ]


def test_two_workers_train_one_run_then_survive_a_lost_node(
    database_url: str, tmp_path: Path, digits_root: Path
) -> None:
    redis_url = redis_or_fail(REDIS_URL)
    queue = unique_queue("nodes")
    artifacts = (tmp_path / "artifacts").as_uri()
    settings = Settings(
        home=tmp_path / "dispatcher",
        database_url=database_url,
        broker_url=redis_url,
        artifacts_url=artifacts,
        worker_heartbeat_s=HEARTBEAT_S,
    )
    engine = make_engine(database_url)

    def env(name: str) -> dict[str, str]:
        return {
            "FITFLEET_HOME": str(tmp_path / name),
            "FITFLEET_BROKER_URL": redis_url,
            "FITFLEET_DATABASE_URL": database_url,
            "FITFLEET_ARTIFACTS_URL": artifacts,
            "FITFLEET_DATA_ROOTS": str(digits_root),
            "FITFLEET_WORKER_NAME": f"{queue}-{name}",
            "FITFLEET_WORKER_GPUS": "1",  # one gloo rank per node on this CPU
            "FITFLEET_WORKER_HEARTBEAT_S": str(HEARTBEAT_S),
            "FITFLEET_WORKER_POLL_S": "0.5",
            "FITFLEET_WORKER_LEASE_TTL_S": "20",
            "FITFLEET_WORKER_GRACE_S": "5",
            "OMP_NUM_THREADS": "1",
        }

    expected = [("head", e) for e in range(EPOCHS[0])] + [("all", e) for e in range(EPOCHS[1])]
    try:
        with ExitStack() as stack:
            stack.enter_context(celery_worker(env("a"), queue=queue, log=tmp_path / "a.log"))
            node_b = stack.enter_context(
                celery_worker(env("b"), queue=queue, log=tmp_path / "b.log")
            )
            stack.enter_context(Dispatcher(engine, settings, lost_after_s=3 * HEARTBEAT_S))

            # 1. One run on two nodes, world size 2.
            first = _submit(engine, queue, digits_root, "two-nodes")
            wait_for(
                lambda: (
                    _state(engine, first).state
                    in (ExperimentState.SUCCEEDED, ExperimentState.FAILED)
                ),
                timeout=300,
                what="the two-node run to finish",
            )
            row = _state(engine, first)
            assert row.state == ExperimentState.SUCCEEDED, (row.error, _logs(tmp_path))
            assert row.attempt == 1
            assert sorted(_epoch_rows(engine, first)) == sorted(expected)
            store = open_store(artifacts)
            import json

            report = json.loads(store.get_bytes(f"runs/{first}/report.json"))
            assert report["world_size"] == 2
            assert report["counts"]["valid"] == report["stages"][-1]["rows"][-1]["valid_count"]
            with session_scope(engine) as session:
                placed = session.scalars(
                    select(SqlEvent).where(
                        SqlEvent.experiment_id == first, SqlEvent.kind == "placed"
                    )
                ).one()
                assert sorted(placed.data["workers"]) == [f"{queue}-a", f"{queue}-b"]

            # 2. The same, and node b dies after the first epoch.
            second = _submit(engine, queue, digits_root, "lose-a-node")
            wait_for(
                lambda: len(_epoch_rows(engine, second)) >= 1,
                timeout=300,
                what="the first epoch of the second run",
            )
            kill_tree(node_b.pid)
            stack.enter_context(celery_worker(env("c"), queue=queue, log=tmp_path / "c.log"))
            wait_for(
                lambda: (
                    _state(engine, second).state
                    in (ExperimentState.SUCCEEDED, ExperimentState.FAILED)
                ),
                timeout=400,
                what="the run to resume on a fresh gang and finish",
            )
            row = _state(engine, second)
            assert row.state == ExperimentState.SUCCEEDED, (row.error, _logs(tmp_path))
            assert row.attempt >= 2
            rows = _epoch_rows(engine, second)
            assert sorted(rows) == sorted(expected), rows  # each epoch once, none missing
            with session_scope(engine) as session:
                kinds = list(
                    session.scalars(
                        select(SqlEvent.kind)
                        .where(SqlEvent.experiment_id == second)
                        .order_by(SqlEvent.id)
                    )
                )
                assert "requeued" in kinds and "resumed" in kinds, kinds
                assert kinds.count("placed") >= 2
                unsent = session.scalar(
                    select(func.count())
                    .select_from(SqlOutbox)
                    .where(SqlOutbox.experiment_id == second, SqlOutbox.sent_at.is_(None))
                )
                assert unsent == 0
            assert datetime.now(UTC)  # the run ended; workers stop below
    finally:
        engine.dispose()


def _logs(tmp_path: Path) -> str:
    parts = []
    for name in ("a", "b", "c"):
        log = tmp_path / f"{name}.log"
        if log.exists():
            parts.append(f"--- {name}\n" + log.read_text(errors="replace")[-4000:])
    return "\n".join(parts)
