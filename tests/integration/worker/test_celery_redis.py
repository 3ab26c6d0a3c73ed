"""A real Celery worker on Redis and Postgres: a published run is trained once, even if redelivered.

The worker is a subprocess (``celery -A workers.celery_entry worker``, prefork,
one process) on Redis db 15 and a fresh Postgres database; the trainer is a
stand-in script (``FITFLEET_WORKER_CHILD_COMMAND``) that exits 0 after 1 s.
Redis or Postgres unreachable fails the test; it never skips.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from shared.celery import make_celery
from shared.db.models import ExperimentState, SqlEvent, SqlExperiment
from shared.db.session import make_engine, session_scope
from shared.dispatch import OutboxMessage, celery_publisher, relay_outbox
from shared.runs import TRAIN_TASK
from shared.settings import Settings
from tests.integration.celery_worker import celery_worker, redis_or_fail, unique_queue
from tests.integration.pg import temporary_database
from tests.rows import add_queued_run

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("FITFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
QUEUE = unique_queue("testq")
REPO = Path(__file__).resolve().parents[3]
FAKE_TRAINER = "import sys, time\ntime.sleep(1)\nsys.exit(0)\n"


@pytest.fixture(scope="module")
def redis_url() -> str:
    """Redis db 15 (this run has its own queue); unreachable Redis fails the test."""
    return redis_or_fail(REDIS_URL)


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with temporary_database("worker") as url:
        yield url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def worker_log(redis_url: str, database_url: str, tmp_path: Path) -> Iterator[Path]:
    """A Celery worker subprocess (its own process group), stopped and checked gone at the end."""
    trainer = tmp_path / "fake_trainer.py"
    trainer.write_text(FAKE_TRAINER)
    log = tmp_path / "worker.log"
    env = {
        "FITFLEET_HOME": str(tmp_path / "home"),
        "FITFLEET_BROKER_URL": redis_url,
        "FITFLEET_DATABASE_URL": database_url,
        "FITFLEET_WORKER_CHILD_COMMAND": json.dumps([sys.executable, str(trainer)]),
        "FITFLEET_WORKER_POLL_S": "0.2",
    }
    with celery_worker(env, queue=QUEUE, log=log):
        yield log


def submit(engine: Engine) -> str:
    """A queued run and its outbox row, in one transaction (as the API writes them)."""
    with session_scope(engine) as session:
        spec = {"resources": {"queue": QUEUE, "timeout": "5m"}}
        return add_queued_run(session, spec=spec, queue=QUEUE)


def read(engine: Engine, run_id: str) -> SqlExperiment:
    with session_scope(engine) as session:
        row = session.get(SqlExperiment, run_id)
        assert row is not None
        return row


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; worker log:\n{log.read_text()}")
        time.sleep(0.2)


def test_published_run_is_trained_once_even_when_redelivered(
    engine: Engine, redis_url: str, database_url: str, worker_log: Path
) -> None:
    app = make_celery(Settings(broker_url=redis_url, database_url=database_url))
    try:
        run_id = submit(engine)
        publish = celery_publisher(app)
        with session_scope(engine) as session:
            assert relay_outbox(session, publish, now=datetime.now(UTC)) == 1

        wait_for(
            lambda: read(engine, run_id).state is ExperimentState.SUCCEEDED,
            60,
            "the run to succeed",
            worker_log,
        )
        first = read(engine, run_id)
        assert first.attempt == 1 and first.lease_owner is None and first.error is None

        # The same message again, as Redis would redeliver it.
        publish(
            OutboxMessage(
                task=TRAIN_TASK,
                queue=QUEUE,
                priority=5,
                payload={"experiment_id": run_id},
                outbox_id=0,
                experiment_id=run_id,
            )
        )
        wait_for(
            lambda: "already claimed or finished" in worker_log.read_text(),
            30,
            "the duplicate to be refused",
            worker_log,
        )
        again = read(engine, run_id)
        assert (again.state, again.attempt) == (ExperimentState.SUCCEEDED, 1)
        with session_scope(engine) as session:
            started = session.scalar(
                select(func.count())
                .select_from(SqlEvent)
                .where(SqlEvent.experiment_id == run_id, SqlEvent.kind == "started")
            )
        assert started == 1
    finally:
        app.close()
