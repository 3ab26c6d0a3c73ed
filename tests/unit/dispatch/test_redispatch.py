"""Runs whose messages a broker restart lost are sent again; nothing else is (SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, update

from shared.db.models import ExperimentState, SqlEvent, SqlExperiment, SqlOutbox
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from shared.runs import redispatch_lost, stale_dispatched_queues
from tests.rows import add_queued_run

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
STALE = 60.0


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'fitfleet.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _dispatched(engine: Engine, queue: str, age_s: float, *, sent: bool = True) -> str:
    with session_scope(engine) as session:
        run_id = add_queued_run(session, queue=queue)
        session.flush()
        session.execute(
            update(SqlExperiment)
            .where(SqlExperiment.id == run_id)
            .values(state=ExperimentState.DISPATCHED, updated_at=NOW - timedelta(seconds=age_s))
        )
        if sent:
            session.execute(
                update(SqlOutbox).where(SqlOutbox.experiment_id == run_id).values(sent_at=NOW)
            )
    return run_id


def test_only_old_unclaimed_runs_of_empty_queues_are_sent_again(engine: Engine) -> None:
    lost = _dispatched(engine, "a", age_s=120)
    fresh = _dispatched(engine, "a", age_s=5)
    waiting = _dispatched(engine, "b", age_s=120)  # its queue still holds messages
    unknown = _dispatched(engine, "c", age_s=120)  # the broker did not answer
    unsent = _dispatched(engine, "a", age_s=120, sent=False)  # the relay will send it
    with session_scope(engine) as session:
        queues = stale_dispatched_queues(session, now=NOW, stale_after_s=STALE)
        assert queues == ["a", "b", "c"]
        ids = redispatch_lost(
            session,
            now=NOW,
            stale_after_s=STALE,
            broker_depths={"a": 0, "b": 3, "c": None},
        )
    assert ids == [lost]
    with session_scope(engine) as session:
        states = {
            run_id: session.get(SqlExperiment, run_id).state  # type: ignore[union-attr]
            for run_id in (lost, fresh, waiting, unknown, unsent)
        }
        new_rows = session.scalar(
            select(func.count())
            .select_from(SqlOutbox)
            .where(SqlOutbox.experiment_id == lost, SqlOutbox.sent_at.is_(None))
        )
        kinds = list(session.scalars(select(SqlEvent.kind).where(SqlEvent.experiment_id == lost)))
    assert states[lost] == ExperimentState.QUEUED
    assert {states[r] for r in (fresh, waiting, unknown, unsent)} == {ExperimentState.DISPATCHED}
    assert new_rows == 1
    assert kinds == ["redispatched"]
    with session_scope(engine) as session:  # nothing more to do on the next pass
        again = redispatch_lost(
            session, now=NOW, stale_after_s=STALE, broker_depths={"a": 0, "b": 0, "c": 0}
        )
    assert sorted(again) == sorted([waiting, unknown])  # the lost one is queued, not dispatched
