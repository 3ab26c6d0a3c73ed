"""Leases and the outbox relay on a real Postgres, where the concurrency claims are tested.

A fresh database is created for this module (see :mod:`tests.integration.pg`);
an unreachable server fails these tests, it never skips them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from shared.db.models import ExperimentState, SqlExperiment, SqlOutbox
from shared.db.session import make_engine, session_scope
from shared.dispatch import OutboxMessage, relay_outbox
from shared.runs import Claim, claim_run, renew_lease, requeue_expired
from tests.integration.pg import temporary_database
from tests.rows import add_queued_run

pytestmark = pytest.mark.integration

TTL = 60.0
THREADS = 8


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with temporary_database("dispatch") as url:
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def submit(engine: Engine, *, max_restarts: int = 3, priority: int = 5) -> str:
    """A queued run and its outbox row, in one transaction (as the API writes them)."""
    spec: dict[str, Any] = {
        "name": "pets",
        "resources": {"queue": "gpu", "priority": priority, "max_restarts": max_restarts},
    }
    with session_scope(engine) as session:
        return add_queued_run(session, spec=spec, priority=priority)


def claim(engine: Engine, run: str, worker: str, now: datetime) -> Claim | None:
    with session_scope(engine) as session:
        return claim_run(session, experiment_id=run, worker_id=worker, ttl_s=TTL, now=now)


def get(engine: Engine, run: str) -> SqlExperiment:
    with session_scope(engine) as session:
        row = session.get(SqlExperiment, run)
        assert row is not None
        return row


def test_concurrent_claims_have_exactly_one_winner(engine: Engine) -> None:
    run = submit(engine)
    now = datetime.now(UTC)
    start = threading.Barrier(THREADS)

    def contend(worker: str) -> Claim | None:
        start.wait()
        return claim(engine, run, worker, now)

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(contend, [f"w{i}" for i in range(THREADS)]))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert winners[0].attempt == 1
    row = get(engine, run)
    assert (row.state, row.attempt, row.lease_owner) == (
        ExperimentState.RUNNING,
        1,
        winners[0].worker_id,
    )


def test_concurrent_claims_of_an_expired_lease_have_exactly_one_winner(engine: Engine) -> None:
    run = submit(engine)
    then = datetime.now(UTC)
    assert claim(engine, run, "dead", then) is not None
    later = then + timedelta(seconds=TTL + 1)
    start = threading.Barrier(THREADS)

    def contend(worker: str) -> Claim | None:
        start.wait()
        return claim(engine, run, worker, later)

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(contend, [f"w{i}" for i in range(THREADS)]))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and winners[0].attempt == 2
    assert get(engine, run).attempt == 2


def test_two_relays_publish_each_row_exactly_once(engine: Engine) -> None:
    with session_scope(engine) as session:  # earlier tests' rows are not this test's business
        for row in session.scalars(select(SqlOutbox).where(SqlOutbox.sent_at.is_(None))):
            row.sent_at = datetime.now(UTC)
    runs = {submit(engine, priority=i % 10) for i in range(50)}
    published: list[OutboxMessage] = []
    lock = threading.Lock()
    start = threading.Barrier(2)

    def publish(message: OutboxMessage) -> None:
        time.sleep(0.002)  # hold the row locks long enough for the relays to overlap
        with lock:
            published.append(message)

    def relay_until_empty() -> int:
        start.wait()
        total = 0
        while True:
            with session_scope(engine) as session:
                sent = relay_outbox(session, publish, limit=10, now=datetime.now(UTC))
            if sent == 0:
                return total
            total += sent

    with ThreadPoolExecutor(2) as pool:
        counts = list(pool.map(lambda _: relay_until_empty(), range(2)))
    assert sum(counts) == 50
    assert Counter(m.experiment_id for m in published) == dict.fromkeys(runs, 1)
    with session_scope(engine) as session:
        unsent = session.scalar(
            select(func.count()).select_from(SqlOutbox).where(SqlOutbox.sent_at.is_(None))
        )
        dispatched = session.scalar(
            select(func.count())
            .select_from(SqlExperiment)
            .where(SqlExperiment.id.in_(runs), SqlExperiment.state == ExperimentState.DISPATCHED)
        )
    assert (unsent, dispatched) == (0, 50)


def test_expired_lease_is_requeued_and_resumed_by_another_worker(engine: Engine) -> None:
    run = submit(engine)
    now = datetime.now(UTC)
    first = claim(engine, run, "w1", now)
    assert first is not None and first.attempt == 1
    expired = now + timedelta(seconds=TTL + 1)
    with session_scope(engine) as session:
        assert run in requeue_expired(session, now=expired)
    assert get(engine, run).state is ExperimentState.QUEUED
    with session_scope(engine) as session:
        rows = session.scalars(select(SqlOutbox).where(SqlOutbox.experiment_id == run)).all()
        assert [r.sent_at is None for r in rows] == [True, True]
        assert not renew_lease(session, experiment_id=run, worker_id="w1", ttl_s=TTL, now=expired)
    second = claim(engine, run, "w2", expired)
    assert second is not None and second.attempt == 2 and second.is_resume
    assert get(engine, run).lease_owner == "w2"


def test_a_run_past_max_restarts_fails_with_the_reason(engine: Engine) -> None:
    run = submit(engine, max_restarts=1)
    now = datetime.now(UTC)
    for attempt in (1, 2):
        won = claim(engine, run, f"w{attempt}", now)
        assert won is not None and won.attempt == attempt
        now += timedelta(seconds=TTL + 1)
        with session_scope(engine) as session:
            assert run in requeue_expired(session, now=now)
    row = get(engine, run)
    assert row.state is ExperimentState.FAILED
    assert row.error == "lost its worker 2 times (max_restarts 1)"
    assert claim(engine, run, "w3", now) is None


def test_two_reconcilers_requeue_each_run_once(engine: Engine) -> None:
    runs = [submit(engine) for _ in range(20)]
    now = datetime.now(UTC)
    for run in runs:
        assert claim(engine, run, "w1", now) is not None
    expired = now + timedelta(seconds=TTL + 1)
    start = threading.Barrier(2)

    def reconcile() -> list[str]:
        start.wait()
        with session_scope(engine) as session:
            return requeue_expired(session, now=expired)

    with ThreadPoolExecutor(2) as pool:
        handled = [run for batch in pool.map(lambda _: reconcile(), range(2)) for run in batch]
    mine = [run for run in handled if run in set(runs)]
    assert sorted(mine) == sorted(runs)
    with session_scope(engine) as session:
        outbox_rows = session.scalar(
            select(func.count()).select_from(SqlOutbox).where(SqlOutbox.experiment_id.in_(runs))
        )
    assert outbox_rows == 2 * len(runs)  # the submission's and exactly one requeue each
