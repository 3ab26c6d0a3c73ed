"""The broker dies and comes back, with its data and without: every run still runs, once.

A private ``redis-server`` (see :mod:`tests.faults.servers`) is the broker of
a real Celery worker and of the dispatcher (relay + reconcile, in a thread);
runs are queued while it is up, while it is down, and across a SIGKILL and a
restart. The trainer is a stand-in that exits at once, so the test is about
delivery, not training. Postgres is real (a fresh database).

What makes it work is the design, not luck: the outbox keeps every run until
a publish succeeds (runs queued while Redis is down are sent after it comes
back), the dispatcher sends again a run whose message a data-less restart
lost (its queue is empty in the broker, yet nobody claimed it), and the lease
keeps any duplicate message from training a run twice.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from shared.db.models import ExperimentState, SqlExperiment, SqlOutbox
from shared.db.session import make_engine, session_scope
from shared.settings import Settings
from tests.faults.harness import Dispatcher, count_events, wait_for
from tests.faults.servers import PrivateRedis
from tests.integration.celery_worker import celery_worker
from tests.integration.pg import temporary_database
from tests.rows import add_queued_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUEUE = "faults"
REDISPATCH_AFTER_S = 3.0


@pytest.fixture
def database_url() -> Iterator[str]:
    with temporary_database("broker") as url:
        yield url


def _queue_runs(engine: Engine, count: int) -> list[str]:
    with session_scope(engine) as session:
        spec = {"resources": {"queue": QUEUE, "gpus": 0}}
        return [add_queued_run(session, queue=QUEUE, spec=spec) for _ in range(count)]


def _states(engine: Engine, ids: list[str]) -> dict[str, ExperimentState]:
    with session_scope(engine) as session:
        rows = session.scalars(select(SqlExperiment).where(SqlExperiment.id.in_(ids))).all()
        return {row.id: row.state for row in rows}


@pytest.mark.parametrize("persistent", [False, True], ids=["without-data", "with-data"])
def test_every_run_runs_once_across_a_broker_crash(
    database_url: str, tmp_path: Path, persistent: bool
) -> None:
    broker = PrivateRedis(tmp_path / "redis", persistent=persistent)
    broker.start()
    trainer = tmp_path / "instant_trainer.py"
    trainer.write_text("import time\ntime.sleep(0.2)\n")
    settings = Settings(
        home=tmp_path / "dispatcher", database_url=database_url, broker_url=broker.url
    )
    engine = make_engine(database_url)
    worker_env = {
        "FITFLEET_HOME": str(tmp_path / "worker"),
        "FITFLEET_BROKER_URL": broker.url,
        "FITFLEET_DATABASE_URL": database_url,
        "FITFLEET_WORKER_CHILD_COMMAND": f'["{sys.executable}", "{trainer}"]',
        "FITFLEET_WORKER_POLL_S": "0.2",
    }
    try:
        with ExitStack() as stack:
            stack.enter_context(Dispatcher(engine, settings, redispatch_after_s=REDISPATCH_AFTER_S))
            # 1. Runs published while the broker is up (no worker yet: they wait in Redis).
            before = _queue_runs(engine, 3)
            wait_for(
                lambda: set(_states(engine, before).values()) == {ExperimentState.DISPATCHED},
                timeout=30,
                what="the first runs to be published",
            )
            # 2. The broker crashes; runs queued now cannot be published.
            broker.kill()
            during = _queue_runs(engine, 2)
            wait_for(
                lambda: _failed_publishes(engine, during) >= 2,
                timeout=30,
                what="the relay to try and fail while the broker is down",
            )
            assert set(_states(engine, during).values()) == {ExperimentState.QUEUED}
            # 3. The broker comes back (with or without its data) and a worker starts.
            broker.start()
            stack.enter_context(celery_worker(worker_env, queue=QUEUE, log=tmp_path / "w.log"))
            everything = before + during
            wait_for(
                lambda: set(_states(engine, everything).values()) == {ExperimentState.SUCCEEDED},
                timeout=180,
                what="every run to succeed",
            )
        with session_scope(engine) as session:
            rows = session.scalars(select(SqlExperiment).where(SqlExperiment.id.in_(everything)))
            assert {row.attempt for row in rows} == {1}  # trained once, never twice
        for run_id in everything:
            assert count_events(engine, run_id, "started") == 1
        redispatched = [run_id for run_id in before if count_events(engine, run_id, "redispatched")]
        if persistent:
            assert redispatched == []  # the messages survived: nothing to send again
        else:
            assert redispatched == before  # lost with the broker's memory, sent again
    finally:
        broker.stop()
        engine.dispose()


def _failed_publishes(engine: Engine, ids: list[str]) -> int:
    with session_scope(engine) as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(SqlOutbox)
                .where(SqlOutbox.experiment_id.in_(ids), SqlOutbox.attempts > 0)
            )
            or 0
        )
