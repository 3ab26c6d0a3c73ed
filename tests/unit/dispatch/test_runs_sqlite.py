"""Leases and the outbox relay on a migrated SQLite file: the single-process behaviour.

Concurrency (two claimers, two relays) is Postgres's job and is tested in
tests/integration/dispatch; here every rule is checked one transaction at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from shared.db.models import (
    ExperimentState,
    SqlEvent,
    SqlExperiment,
    SqlOutbox,
)
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from shared.dispatch import OutboxMessage, celery_publisher, relay_outbox
from shared.runs import (
    TRAIN_TASK,
    Claim,
    claim_run,
    max_restarts,
    release_run,
    renew_lease,
    requeue_expired,
)
from tests.rows import add_queued_run

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
TTL = 60.0

SPEC: dict[str, Any] = {
    "version": 1,
    "name": "pets",
    "data": {"source": "s3://bucket/pets"},
    "model": {"arch": "resnet34"},
    "resources": {"queue": "gpu", "priority": 5, "max_restarts": 2},
}


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'fitfleet.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def submit(
    engine: Engine,
    *,
    priority: int = 5,
    spec: dict[str, Any] | None = None,
    state: ExperimentState = ExperimentState.QUEUED,
    cancel_requested: bool = False,
) -> str:
    """What the API's submit writes: a run and its outbox row in one transaction."""
    with session_scope(engine) as session:
        return add_queued_run(
            session,
            spec=copy.deepcopy(spec if spec is not None else SPEC),
            priority=priority,
            state=state,
            cancel_requested=cancel_requested,
        )


def get(engine: Engine, experiment_id: str) -> SqlExperiment:
    with session_scope(engine) as session:
        row = session.get(SqlExperiment, experiment_id)
        assert row is not None
        return row


def claim(engine: Engine, experiment_id: str, worker: str, now: datetime) -> Claim | None:
    with session_scope(engine) as session:
        return claim_run(session, experiment_id=experiment_id, worker_id=worker, ttl_s=TTL, now=now)


def events(engine: Engine, experiment_id: str) -> list[str]:
    with session_scope(engine) as session:
        return list(
            session.scalars(
                select(SqlEvent.kind)
                .where(SqlEvent.experiment_id == experiment_id)
                .order_by(SqlEvent.id)
            )
        )


def outbox(engine: Engine, experiment_id: str | None = None) -> list[SqlOutbox]:
    with session_scope(engine) as session:
        query = select(SqlOutbox).order_by(SqlOutbox.id)
        if experiment_id is not None:
            query = query.where(SqlOutbox.experiment_id == experiment_id)
        return list(session.scalars(query))


class FakeBroker:
    """A publish callable that records messages and can be told to fail."""

    def __init__(self, fail_for: set[str] | None = None) -> None:
        self.sent: list[OutboxMessage] = []
        self.fail_for = fail_for or set()

    def __call__(self, message: OutboxMessage) -> None:
        if message.experiment_id in self.fail_for:
            raise ConnectionError("broker down")
        self.sent.append(message)


def relay(engine: Engine, publish: FakeBroker, now: datetime = T0, limit: int = 100) -> int:
    with session_scope(engine) as session:
        return relay_outbox(session, publish, limit=limit, now=now)


# --------------------------------------------------------------------------- claim


def test_claim_takes_a_queued_run_and_a_second_claim_loses(engine: Engine) -> None:
    run = submit(engine)
    won = claim(engine, run, "w1", T0)
    assert won == Claim(
        experiment_id=run,
        worker_id="w1",
        attempt=1,
        spec=SPEC,
        lease_expires_at=T0 + timedelta(seconds=TTL),
    )
    assert not won.is_resume
    assert claim(engine, run, "w2", T0 + timedelta(seconds=1)) is None
    row = get(engine, run)
    assert row.state is ExperimentState.RUNNING
    assert (row.lease_owner, row.attempt) == ("w1", 1)
    assert row.lease_expires_at == T0 + timedelta(seconds=TTL)
    assert row.started_at == T0
    assert events(engine, run) == ["started"]


def test_claim_takes_a_dispatched_run(engine: Engine) -> None:
    run = submit(engine, state=ExperimentState.DISPATCHED)
    assert claim(engine, run, "w1", T0) is not None


def test_claim_after_expiry_resumes_and_keeps_started_at(engine: Engine) -> None:
    run = submit(engine)
    assert claim(engine, run, "w1", T0) is not None
    later = T0 + timedelta(seconds=TTL + 1)
    resumed = claim(engine, run, "w2", later)
    assert resumed is not None and resumed.attempt == 2 and resumed.is_resume
    row = get(engine, run)
    assert row.lease_owner == "w2"
    assert row.started_at == T0
    assert events(engine, run) == ["started", "resumed"]


@pytest.mark.parametrize(
    "state", [ExperimentState.SUCCEEDED, ExperimentState.FAILED, ExperimentState.CANCELLED]
)
def test_claim_refuses_terminal_runs(engine: Engine, state: ExperimentState) -> None:
    run = submit(engine, state=state)
    assert claim(engine, run, "w1", T0) is None
    assert get(engine, run).attempt == 0


def test_claim_refuses_a_run_with_a_cancel_requested(engine: Engine) -> None:
    run = submit(engine, cancel_requested=True)
    assert claim(engine, run, "w1", T0) is None


def test_claim_of_an_unknown_run_is_none(engine: Engine) -> None:
    assert claim(engine, "exp_missing", "w1", T0) is None


def test_naive_now_and_bad_ttl_are_refused(engine: Engine) -> None:
    run = submit(engine)
    with session_scope(engine) as session:
        with pytest.raises(ValueError, match="naive"):
            claim_run(
                session,
                experiment_id=run,
                worker_id="w",
                ttl_s=TTL,
                now=datetime(2026, 1, 1),
            )
        with pytest.raises(ValueError, match="ttl_s"):
            claim_run(session, experiment_id=run, worker_id="w", ttl_s=0, now=T0)


# --------------------------------------------------------------------------- renew / release


def test_renew_extends_only_the_owners_lease(engine: Engine) -> None:
    run = submit(engine)
    assert claim(engine, run, "w1", T0) is not None
    later = T0 + timedelta(seconds=30)
    with session_scope(engine) as session:
        assert renew_lease(session, experiment_id=run, worker_id="w1", ttl_s=TTL, now=later)
        assert not renew_lease(session, experiment_id=run, worker_id="w2", ttl_s=TTL, now=later)
    assert get(engine, run).lease_expires_at == later + timedelta(seconds=TTL)


def test_renew_fails_once_another_worker_took_the_run(engine: Engine) -> None:
    run = submit(engine)
    assert claim(engine, run, "w1", T0) is not None
    assert claim(engine, run, "w2", T0 + timedelta(seconds=TTL + 1)) is not None
    with session_scope(engine) as session:
        assert not renew_lease(
            session, experiment_id=run, worker_id="w1", ttl_s=TTL, now=T0 + timedelta(seconds=62)
        )


def test_release_ends_the_run_and_records_an_event(engine: Engine) -> None:
    run = submit(engine)
    assert claim(engine, run, "w1", T0) is not None
    end = T0 + timedelta(seconds=10)
    with session_scope(engine) as session:
        assert not release_run(
            session, experiment_id=run, worker_id="w2", state=ExperimentState.SUCCEEDED, now=end
        )
        assert release_run(
            session,
            experiment_id=run,
            worker_id="w1",
            state=ExperimentState.FAILED,
            error="CUDA out of memory",
            now=end,
        )
    row = get(engine, run)
    assert row.state is ExperimentState.FAILED
    assert row.error == "CUDA out of memory"
    assert row.finished_at == end
    assert (row.lease_owner, row.lease_expires_at) == (None, None)
    assert events(engine, run) == ["started", "failed"]
    # The lease is gone: renewing or releasing again is refused.
    with session_scope(engine) as session:
        assert not renew_lease(session, experiment_id=run, worker_id="w1", ttl_s=TTL, now=end)


def test_release_refuses_a_non_terminal_state(engine: Engine) -> None:
    run = submit(engine)
    with session_scope(engine) as session, pytest.raises(ValueError, match="terminal"):
        release_run(
            session, experiment_id=run, worker_id="w1", state=ExperimentState.RUNNING, now=T0
        )


# --------------------------------------------------------------------------- requeue


def test_requeue_leaves_live_leases_alone(engine: Engine) -> None:
    run = submit(engine)
    assert claim(engine, run, "w1", T0) is not None
    with session_scope(engine) as session:
        assert requeue_expired(session, now=T0 + timedelta(seconds=TTL - 1)) == []
    assert get(engine, run).state is ExperimentState.RUNNING


def test_requeue_expired_queues_again_with_a_new_outbox_row(engine: Engine) -> None:
    run = submit(engine)
    broker = FakeBroker()
    assert relay(engine, broker) == 1
    assert claim(engine, run, "w1", T0) is not None
    expired = T0 + timedelta(seconds=TTL + 1)
    with session_scope(engine) as session:
        assert requeue_expired(session, now=expired) == [run]
    row = get(engine, run)
    assert row.state is ExperimentState.QUEUED
    assert (row.lease_owner, row.lease_expires_at) == (None, None)
    rows = outbox(engine, run)
    assert len(rows) == 2 and rows[1].sent_at is None
    assert (rows[1].task, rows[1].payload) == (TRAIN_TASK, {"experiment_id": run})
    assert events(engine, run) == ["started", "requeued"]
    # The old owner notices it lost the lease; the relay sends the run again.
    with session_scope(engine) as session:
        assert not renew_lease(session, experiment_id=run, worker_id="w1", ttl_s=TTL, now=expired)
    assert relay(engine, broker, now=expired) == 1
    assert [m.experiment_id for m in broker.sent] == [run, run]
    resumed = claim(engine, run, "w2", expired)
    assert resumed is not None and resumed.attempt == 2


def test_requeue_fails_a_run_past_max_restarts(engine: Engine) -> None:
    run = submit(engine)  # max_restarts 2: attempts 1..3 may run, losing the third fails it
    now = T0
    for attempt in (1, 2, 3):
        won = claim(engine, run, f"w{attempt}", now)
        assert won is not None and won.attempt == attempt
        now += timedelta(seconds=TTL + 1)
        with session_scope(engine) as session:
            assert requeue_expired(session, now=now) == [run]
    row = get(engine, run)
    assert row.state is ExperimentState.FAILED
    assert row.error == "lost its worker 3 times (max_restarts 2)"
    assert row.finished_at == now
    assert events(engine, run)[-1] == "failed"
    assert len(outbox(engine, run)) == 3  # the submission's, then two requeues
    assert claim(engine, run, "w4", now) is None


def test_requeue_cancels_a_run_whose_cancel_was_pending(engine: Engine) -> None:
    run = submit(engine)
    assert claim(engine, run, "w1", T0) is not None
    with session_scope(engine) as session:
        row = session.get(SqlExperiment, run)
        assert row is not None
        row.cancel_requested = True
    with session_scope(engine) as session:
        assert requeue_expired(session, now=T0 + timedelta(seconds=TTL + 1)) == [run]
    assert get(engine, run).state is ExperimentState.CANCELLED
    assert len(outbox(engine, run)) == 1


def test_requeue_respects_limit(engine: Engine) -> None:
    runs = [submit(engine) for _ in range(3)]
    for run in runs:
        assert claim(engine, run, "w1", T0) is not None
    with session_scope(engine) as session:
        assert len(requeue_expired(session, now=T0 + timedelta(seconds=TTL + 1), limit=2)) == 2


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"resources": {"max_restarts": 0}}, 0),
        ({"resources": {"max_restarts": 7}}, 7),
        ({"resources": {}}, 3),
        ({}, 3),
        ({"resources": {"max_restarts": "many"}}, 3),
        ({"resources": {"max_restarts": True}}, 3),
        ({"resources": None}, 3),
    ],
)
def test_max_restarts_reads_the_spec_with_a_default(spec: dict[str, Any], expected: int) -> None:
    assert max_restarts(spec) == expected


# --------------------------------------------------------------------------- relay


def test_relay_publishes_once_and_marks_dispatched(engine: Engine) -> None:
    run = submit(engine, priority=4)
    broker = FakeBroker()
    assert relay(engine, broker) == 1
    assert broker.sent == [
        OutboxMessage(
            task=TRAIN_TASK,
            queue="gpu",
            priority=4,
            payload={"experiment_id": run},
            outbox_id=outbox(engine, run)[0].id,
            experiment_id=run,
        )
    ]
    assert outbox(engine, run)[0].sent_at == T0
    assert get(engine, run).state is ExperimentState.DISPATCHED
    assert relay(engine, broker) == 0
    assert len(broker.sent) == 1


def test_relay_orders_by_priority_then_age_and_honours_limit(engine: Engine) -> None:
    low = submit(engine, priority=1)
    high_old = submit(engine, priority=9)
    mid = submit(engine, priority=5)
    high_new = submit(engine, priority=9)
    broker = FakeBroker()
    assert relay(engine, broker, limit=3) == 3
    assert [m.experiment_id for m in broker.sent] == [high_old, high_new, mid]
    assert relay(engine, broker) == 1
    assert broker.sent[-1].experiment_id == low


def test_relay_failure_leaves_the_row_unsent_and_continues(engine: Engine) -> None:
    bad = submit(engine, priority=9)
    good = submit(engine, priority=1)
    broker = FakeBroker(fail_for={bad})
    assert relay(engine, broker) == 1
    assert [m.experiment_id for m in broker.sent] == [good]
    row = outbox(engine, bad)[0]
    assert row.sent_at is None
    assert row.attempts == 1
    assert row.last_error == "ConnectionError: broker down"
    assert get(engine, bad).state is ExperimentState.QUEUED
    # The broker recovers: the next pass sends it.
    broker.fail_for.clear()
    assert relay(engine, broker) == 1
    assert outbox(engine, bad)[0].attempts == 1
    assert get(engine, bad).state is ExperimentState.DISPATCHED


@pytest.mark.parametrize(
    ("state", "cancel_requested"),
    [
        (ExperimentState.CANCELLED, False),
        (ExperimentState.SUCCEEDED, False),
        (ExperimentState.FAILED, False),
        (ExperimentState.QUEUED, True),
    ],
)
def test_relay_never_publishes_cancelled_or_finished_runs(
    engine: Engine, state: ExperimentState, cancel_requested: bool
) -> None:
    run = submit(engine, state=state, cancel_requested=cancel_requested)
    broker = FakeBroker()
    assert relay(engine, broker) == 0
    assert broker.sent == []
    assert outbox(engine, run)[0].sent_at == T0
    assert get(engine, run).state is state


def test_relay_does_not_move_a_run_that_a_worker_already_claimed(engine: Engine) -> None:
    run = submit(engine)
    assert claim(engine, run, "w1", T0) is not None
    broker = FakeBroker()
    assert relay(engine, broker) == 1
    assert get(engine, run).state is ExperimentState.RUNNING


def test_relay_refuses_a_naive_now(engine: Engine) -> None:
    with session_scope(engine) as session, pytest.raises(ValueError, match="naive"):
        relay_outbox(session, FakeBroker(), now=datetime(2026, 1, 1))


def test_celery_publisher_sends_the_task_with_its_routing() -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    class App:
        def send_task(self, name: str, *args: Any, **kwargs: Any) -> None:
            calls.append((name, kwargs))

    publish = celery_publisher(App())
    publish(
        OutboxMessage(
            task=TRAIN_TASK,
            queue="gpu",
            priority=7,
            payload={"experiment_id": "exp_x"},
            outbox_id=1,
            experiment_id="exp_x",
        )
    )
    # Spec priority 7 (higher first) is Redis priority 2 (0 is the highest there).
    assert calls == [
        (TRAIN_TASK, {"kwargs": {"experiment_id": "exp_x"}, "queue": "gpu", "priority": 2})
    ]
