"""The relay and the fleet: runs the fleet cannot place wait; gangs are all or nothing (SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from shared import fleet
from shared.db.models import ExperimentState, SqlExperiment, SqlOutbox, SqlWorker, WorkerState
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from shared.dispatch import OutboxMessage, relay_outbox
from shared.gangs import GANG_TASK, join_gang, node_queue, requeue_gang_run
from shared.runs import requeue_expired
from tests.rows import add_queued_run


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'fitfleet.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _worker(engine: Engine, name: str, queue: str, gpus: int) -> None:
    with session_scope(engine) as session:
        fleet.register_worker(
            session,
            worker_id=name,
            hostname="node-" + name,
            queues=[queue],
            gpus=gpus,
            gpu_model=None,
            memory_bytes=None,
            versions={},
            now=datetime.now(UTC),
        )


def _run(engine: Engine, queue: str, gpus: int, nodes: int = 1) -> str:
    spec = {"resources": {"queue": queue, "gpus": gpus, "nodes": nodes, "max_restarts": 1}}
    with session_scope(engine) as session:
        return add_queued_run(session, spec=spec, queue=queue)


def _relay(engine: Engine) -> list[OutboxMessage]:
    sent: list[OutboxMessage] = []
    with session_scope(engine) as session:
        relay_outbox(session, sent.append, now=datetime.now(UTC), lost_after_s=60)
    return sent


def test_a_run_too_big_for_the_live_fleet_waits_and_a_fitting_one_goes(engine: Engine) -> None:
    _worker(engine, "cpu-1", "q", gpus=0)
    too_big = _run(engine, "q", gpus=2)
    fits = _run(engine, "q", gpus=0)
    nobody = _run(engine, "empty", gpus=8)  # no worker yet: it waits in the broker
    sent = _relay(engine)
    assert sorted(m.experiment_id for m in sent) == sorted([fits, nobody])
    with session_scope(engine) as session:
        row = session.get(SqlExperiment, too_big)
        assert row is not None and row.state == ExperimentState.QUEUED
        unsent = session.scalars(select(SqlOutbox.experiment_id).where(SqlOutbox.sent_at.is_(None)))
        assert list(unsent) == [too_big]
    _worker(engine, "gpu-2", "q", gpus=2)  # the fleet grows: now it goes
    assert [m.experiment_id for m in _relay(engine)] == [too_big]


def test_a_gang_is_all_or_nothing_then_joined_and_requeued(engine: Engine) -> None:
    _worker(engine, "w1", "g", gpus=1)
    run = _run(engine, "g", gpus=1, nodes=2)
    assert _relay(engine) == []  # one idle worker is not a gang of two
    _worker(engine, "w2", "g", gpus=1)
    sent = _relay(engine)
    assert {m.task for m in sent} == {GANG_TASK}
    assert sorted(m.queue for m in sent) == [node_queue("w1"), node_queue("w2")]
    ranks = sorted(m.payload["node_rank"] for m in sent)
    assert ranks == [0, 1]
    gang = sent[0].payload["gang_id"]
    assert {m.payload["endpoint"] for m in sent} == {sent[0].payload["endpoint"]}
    assert sent[0].payload["endpoint"].startswith("node-w1:")
    with session_scope(engine) as session:
        workers = session.scalars(select(SqlWorker)).all()
        assert {(w.state, w.current_experiment_id) for w in workers} == {(WorkerState.BUSY, run)}
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        assert (
            join_gang(session, experiment_id=run, gang_id="gang-other", ttl_s=30, now=now) is None
        )
        first = join_gang(session, experiment_id=run, gang_id=gang, ttl_s=30, now=now)
        second = join_gang(session, experiment_id=run, gang_id=gang, ttl_s=30, now=now)
    assert first is not None and second is not None
    assert first.attempt == second.attempt == 1  # one attempt for the whole gang
    with session_scope(engine) as session:
        assert requeue_gang_run(
            session, experiment_id=run, gang_id=gang, reason="node 1 lost a peer", now=now
        )
        # The other survivor finds nothing left to do.
        assert not requeue_gang_run(
            session, experiment_id=run, gang_id=gang, reason="node 0 lost a peer", now=now
        )
        row = session.get(SqlExperiment, run)
        assert row is not None and row.state == ExperimentState.QUEUED and row.lease_owner is None
    with session_scope(engine) as session:  # the old gang can no longer join
        assert join_gang(session, experiment_id=run, gang_id=gang, ttl_s=30, now=now) is None


def test_a_gang_that_never_forms_goes_back_to_the_queue(engine: Engine) -> None:
    _worker(engine, "w1", "g", gpus=0)
    _worker(engine, "w2", "g", gpus=0)
    run = _run(engine, "g", gpus=0, nodes=2)
    assert len(_relay(engine)) == 2
    later = datetime.now(UTC) + timedelta(hours=1)  # past the join timeout
    with session_scope(engine) as session:
        assert requeue_expired(session, now=later) == [run]
        row = session.get(SqlExperiment, run)
        assert row is not None and row.state == ExperimentState.QUEUED and row.attempt == 0
        states = set(session.scalars(select(SqlWorker.state)))
        assert states == {WorkerState.IDLE}  # the reservation is lifted
