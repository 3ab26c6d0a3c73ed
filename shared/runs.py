"""A run's lease: who may train it, for how long, and what happens when its worker vanishes.

Celery delivers a training message at least once (late acks, a Redis
visibility timeout shorter than a run, a worker killed mid-run), so the queue
cannot decide who trains a run. Postgres does: a worker *claims* the run with
one conditional UPDATE that only one transaction can win, keeps the lease alive
with :func:`renew_lease` while it trains, and gives it up with
:func:`release_run` when the run ends. A duplicate delivery finds the lease held
and walks away. A reconciler calls :func:`requeue_expired` so a run whose worker
died is queued again (and resumes from its last checkpoint) instead of staying
``running`` forever; ``attempt`` counts claims and ``resources.max_restarts``
in the spec stops a run that keeps killing its workers.

Every function works inside the caller's session and never commits: the
caller's transaction decides, so a claim and whatever the caller records with
it land together. ``now`` is always passed in (timezone-aware UTC) so tests and
the reconciler agree on one clock per transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Result, and_, func, literal, or_, select, update
from sqlalchemy.orm import Session

from shared.db.base import UtcDateTime
from shared.db.models import (
    TERMINAL_STATES,
    ExperimentState,
    SqlEvent,
    SqlExperiment,
    SqlOutbox,
    SqlWorker,
    WorkerState,
)

#: The Celery task that trains a run (the api<->worker contract; the API's
#: submission writes the same name into its outbox row).
TRAIN_TASK = "workers.train_run"

#: ``resources.max_restarts`` when a spec does not say (the spec model's default).
DEFAULT_MAX_RESTARTS = 3

#: Who the reconciler writes into events, where a worker would write its id.
SYSTEM_ACTOR = "system"

_CLAIMABLE = (ExperimentState.QUEUED, ExperimentState.DISPATCHED)


@dataclass(frozen=True)
class Claim:
    """A won claim: which attempt this is (1 = first, >1 = resume) and the spec to train."""

    experiment_id: str
    worker_id: str
    attempt: int
    spec: dict[str, Any]
    lease_expires_at: datetime

    @property
    def is_resume(self) -> bool:
        """True when an earlier attempt ran, so the worker should look for a checkpoint."""
        return self.attempt > 1


def _check_aware(now: datetime) -> None:
    # A naive ``now`` would be compared against UTC leases; UtcDateTime refuses
    # naive values on write, but a WHERE clause is where it would bite silently.
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"naive datetime {now!r}: pass an aware UTC datetime")


def _check_ttl(ttl_s: float) -> None:
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s!r}")


def train_message(experiment: SqlExperiment, *, now: datetime | None = None) -> SqlOutbox:
    """The outbox row that asks a worker to train (or resume) ``experiment``."""
    message = SqlOutbox(
        experiment_id=experiment.id,
        task=TRAIN_TASK,
        queue=experiment.queue,
        priority=experiment.priority,
        payload={"experiment_id": experiment.id},
    )
    if now is not None:
        message.created_at = now
    return message


def claim_run(
    session: Session, *, experiment_id: str, worker_id: str, ttl_s: float, now: datetime
) -> Claim | None:
    """Take the run for ``worker_id`` until ``now + ttl_s``, or ``None`` if it is not ours to take.

    One UPDATE with the whole condition in its WHERE clause, so the database
    decides between concurrent claimers: on Postgres the losers wait for the
    winner's row lock, re-check the condition against the committed row (now
    ``running`` with a live lease) and update nothing. A run is claimable when
    it is queued or dispatched, or running with an expired lease (its worker
    died and the reconciler has not noticed yet), and only while no cancel was
    requested. ``None`` also covers terminal runs and unknown ids: in every
    case the caller must not train.
    """
    _check_aware(now)
    _check_ttl(ttl_s)
    expires = now + timedelta(seconds=ttl_s)
    exp = SqlExperiment
    statement = (
        update(exp)
        .where(
            exp.id == experiment_id,
            exp.cancel_requested.is_(False),
            or_(
                # A queued run reserved for a gang (lease_owner set) is only
                # for that gang's nodes: shared.gangs.join_gang.
                and_(exp.state.in_(_CLAIMABLE), exp.lease_owner.is_(None)),
                and_(exp.state == ExperimentState.RUNNING, exp.lease_expires_at < now),
            ),
        )
        .values(
            state=ExperimentState.RUNNING,
            lease_owner=worker_id,
            lease_expires_at=expires,
            attempt=exp.attempt + 1,
            started_at=func.coalesce(exp.started_at, literal(now, UtcDateTime())),
            updated_at=now,
        )
        .returning(exp.attempt, exp.spec)
        .execution_options(synchronize_session="fetch")
    )
    row = session.execute(statement).first()
    if row is None:
        return None
    attempt, spec = int(row[0]), dict(row[1])
    session.add(
        SqlEvent(
            experiment_id=experiment_id,
            kind="resumed" if attempt > 1 else "started",
            message=f"attempt {attempt} claimed by {worker_id}",
            data={"attempt": attempt, "worker": worker_id},
            actor=worker_id,
            created_at=now,
        )
    )
    return Claim(
        experiment_id=experiment_id,
        worker_id=worker_id,
        attempt=attempt,
        spec=spec,
        lease_expires_at=expires,
    )


def renew_lease(
    session: Session, *, experiment_id: str, worker_id: str, ttl_s: float, now: datetime
) -> bool:
    """Extend our lease to ``now + ttl_s``; ``False`` means it is no longer ours: stop training.

    Only the owner of a running run can renew. The lease is lost when the
    reconciler re-queued the run (the lease expired first) or another worker
    claimed it after expiry; continuing then would train the run twice.
    A renewal that arrives after expiry but before anyone else acted still
    succeeds: nobody else holds the run, so keeping it is safe.
    """
    _check_aware(now)
    _check_ttl(ttl_s)
    result = session.execute(
        update(SqlExperiment)
        .where(
            SqlExperiment.id == experiment_id,
            SqlExperiment.state == ExperimentState.RUNNING,
            SqlExperiment.lease_owner == worker_id,
        )
        .values(lease_expires_at=now + timedelta(seconds=ttl_s), updated_at=now)
        .execution_options(synchronize_session="fetch")
    )
    return _rowcount(result) == 1


def release_run(
    session: Session,
    *,
    experiment_id: str,
    worker_id: str,
    state: ExperimentState,
    error: str | None = None,
    now: datetime,
) -> bool:
    """End the run in terminal ``state``, drop the lease and record why; ``False`` if not ours.

    Guarded by the lease like :func:`renew_lease`: a worker that lost its
    lease must not overwrite the outcome of the attempt that replaced it.

    Raises:
        ValueError: ``state`` is not terminal (succeeded, failed or cancelled).
    """
    _check_aware(now)
    state = ExperimentState(state)
    if state not in TERMINAL_STATES:
        raise ValueError(f"release_run needs a terminal state, got {state.value!r}")
    result = session.execute(
        update(SqlExperiment)
        .where(
            SqlExperiment.id == experiment_id,
            SqlExperiment.state == ExperimentState.RUNNING,
            SqlExperiment.lease_owner == worker_id,
        )
        .values(
            state=state,
            error=error,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session="fetch")
    )
    if _rowcount(result) != 1:
        return False
    session.add(
        SqlEvent(
            experiment_id=experiment_id,
            kind=state.value,
            message=error or f"run {state.value}",
            data={"worker": worker_id},
            actor=worker_id,
            created_at=now,
        )
    )
    return True


def max_restarts(spec: dict[str, Any]) -> int:
    """``resources.max_restarts`` from a stored spec, or the default when absent or malformed.

    Stored specs were validated at submission, but the reconciler must never
    crash on one odd row: that would stop every other run from being rescued.
    """
    resources = spec.get("resources")
    value = resources.get("max_restarts") if isinstance(resources, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return DEFAULT_MAX_RESTARTS


def requeue_expired(session: Session, *, now: datetime, limit: int = 100) -> list[str]:
    """Rescue running runs whose lease expired before ``now``; return the ids handled.

    Each is, in order of precedence: ``cancelled`` when a cancel was requested
    (its worker can no longer act on the flag); ``failed`` when it has already
    lost its worker ``attempt > max_restarts`` times (a run that kills its
    worker must not loop forever); otherwise ``queued`` again with a new outbox
    row, so the dispatcher sends it out and the next claim resumes it as
    ``attempt + 1``. Rows are locked ``FOR UPDATE SKIP LOCKED`` so several
    reconcilers share the work instead of queueing twice (SQLite ignores it;
    its writers are serialized anyway). A worker renewing at the same moment
    either wins (its new lease no longer matches) or finds the run re-queued
    and stops.
    """
    _check_aware(now)
    rows = session.scalars(
        select(SqlExperiment)
        .where(
            or_(
                SqlExperiment.state == ExperimentState.RUNNING,
                # A gang that was placed but never formed (shared.gangs).
                and_(
                    SqlExperiment.state == ExperimentState.DISPATCHED,
                    SqlExperiment.lease_owner.is_not(None),
                ),
            ),
            SqlExperiment.lease_expires_at < now,
        )
        .order_by(SqlExperiment.lease_expires_at, SqlExperiment.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    handled: list[str] = []
    for row in rows:
        lost_owner = row.lease_owner
        row.lease_owner = None
        row.lease_expires_at = None
        row.updated_at = now
        data: dict[str, Any] = {"attempt": row.attempt, "worker": lost_owner}
        if row.cancel_requested:
            row.state = ExperimentState.CANCELLED
            row.finished_at = now
            kind, message = "cancelled", f"cancelled after losing worker {lost_owner}"
        elif row.attempt > (limit_restarts := max_restarts(row.spec)):
            row.state = ExperimentState.FAILED
            row.finished_at = now
            row.error = f"lost its worker {row.attempt} times (max_restarts {limit_restarts})"
            kind, message = "failed", row.error
        else:
            row.state = ExperimentState.QUEUED
            session.add(train_message(row, now=now))
            kind = "requeued"
            message = f"lease of {lost_owner} expired during attempt {row.attempt}; requeued"
        session.add(
            SqlEvent(
                experiment_id=row.id,
                kind=kind,
                message=message,
                data=data,
                actor=SYSTEM_ACTOR,
                created_at=now,
            )
        )
        handled.append(row.id)
    if handled:
        # Workers reserved for these runs (a gang that never formed, a worker
        # that vanished) are free again; a vanished one still shows lost.
        session.execute(
            update(SqlWorker)
            .where(
                SqlWorker.current_experiment_id.in_(handled),
                SqlWorker.state == WorkerState.BUSY,
            )
            .values(state=WorkerState.IDLE, current_experiment_id=None)
        )
    session.flush()
    return handled


def _rowcount(result: Result[Any]) -> int:
    # ``Session.execute`` is typed as returning ``Result``; an UPDATE gives a
    # ``CursorResult``, the only kind with ``rowcount``.
    return cast(CursorResult[Any], result).rowcount


def redispatch_lost(
    session: Session,
    *,
    now: datetime,
    stale_after_s: float,
    broker_depths: Mapping[str, int | None],
    limit: int = 100,
) -> list[str]:
    """Queue again dispatched runs whose message the broker no longer holds; their ids.

    A broker that restarts without its data (Redis without persistence, a
    flushed database) loses the messages of runs already marked dispatched:
    their outbox rows are sent, no worker will ever claim them, and without
    this they would wait forever. A run counts as lost when it has been
    dispatched for over ``stale_after_s`` with no lease, no unsent outbox row,
    and its queue is *empty* in the broker (``broker_depths[queue] == 0``; an
    unknown depth, ``None``, is never taken for empty). A run that only waits
    behind a busy fleet has its message in the broker and is left alone. If a
    message was in fact still on its way, the run gets two: the lease keeps it
    from training twice.
    """
    _check_aware(now)
    empty = [queue for queue, depth in broker_depths.items() if depth == 0]
    if not empty:
        return []
    unsent = select(SqlOutbox.experiment_id).where(SqlOutbox.sent_at.is_(None))
    rows = session.scalars(
        select(SqlExperiment)
        .where(
            SqlExperiment.state == ExperimentState.DISPATCHED,
            SqlExperiment.lease_owner.is_(None),
            SqlExperiment.cancel_requested.is_(False),
            SqlExperiment.queue.in_(empty),
            SqlExperiment.updated_at < now - timedelta(seconds=stale_after_s),
            SqlExperiment.id.not_in(unsent),
        )
        .order_by(SqlExperiment.updated_at, SqlExperiment.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for row in rows:
        row.state = ExperimentState.QUEUED
        row.updated_at = now
        session.add(train_message(row, now=now))
        session.add(
            SqlEvent(
                experiment_id=row.id,
                kind="redispatched",
                message=f"queue {row.queue!r} is empty in the broker but the run was never "
                "claimed: its message was lost (a broker restart?); sent again",
                data={"queue": row.queue},
                actor=SYSTEM_ACTOR,
                created_at=now,
            )
        )
    session.flush()
    return [row.id for row in rows]


def stale_dispatched_queues(session: Session, *, now: datetime, stale_after_s: float) -> list[str]:
    """Queues holding runs dispatched over ``stale_after_s`` ago and still unclaimed.

    The broker is asked about these only (see :func:`redispatch_lost`).
    """
    _check_aware(now)
    return sorted(
        session.scalars(
            select(SqlExperiment.queue)
            .where(
                SqlExperiment.state == ExperimentState.DISPATCHED,
                SqlExperiment.lease_owner.is_(None),
                SqlExperiment.updated_at < now - timedelta(seconds=stale_after_s),
            )
            .distinct()
        )
    )
