"""The fleet: which workers exist, what they offer, whether they are alive, and why runs wait.

Every worker's Celery *main* process keeps one ``workers`` row (see
:mod:`workers.heartbeat`): it registers on start-up (an upsert, so a restart
with the same name reuses the row) and refreshes ``last_heartbeat`` every
``worker_heartbeat_s`` seconds; the training task in a pool process marks the
row busy with the run it trains, and idle again afterwards.

Lost: a worker whose last heartbeat is older than ``lost_after_s`` (three
heartbeats by default) is *shown* lost at read time
(:func:`effective_state`), so a killed worker turns lost without anyone
having to notice; the dispatcher's reconcile pass also writes it down
(:func:`mark_lost`), with an event, so history and SQL queries agree. A
lost worker that heartbeats again (it was only cut off from the database)
comes back idle or busy. A clean stop (:func:`deregister`) also leaves the row
``lost`` (rows are kept for history; the event ``worker.stopped`` tells a stop
from a crash), which needs no fourth state and no schema change.

Placement (:func:`placement`) answers, for one waiting run, whether the live
fleet of its queue could ever run it, whether it could now, and if not, why,
in words shown by ``GET /v1/admin/queues``. A run that no live worker can take
stays queued with that reason; nothing fails it. ``resources.gpus`` is
processes per node (0 = CPU): a worker with ``gpus >= needed`` can be one of
its nodes, so a CPU worker (0 GPUs) takes only CPU runs. Each worker counts as
one node.

Pure SQLAlchemy: no celery, no torch; every function takes ``now`` (aware
UTC) so tests control time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.db.models import (
    ExperimentState,
    SqlEvent,
    SqlExperiment,
    SqlWorker,
    WorkerState,
)

#: States of a run that is waiting for a worker: in the database only, or also in the broker.
WAITING_STATES: tuple[ExperimentState, ...] = (
    ExperimentState.QUEUED,
    ExperimentState.DISPATCHED,
)

#: At most this many waiting runs are listed (with reasons) per queue.
WAITING_LIMIT = 50


def _check_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"naive datetime {now!r}: pass an aware UTC datetime")


@dataclass(frozen=True)
class WorkerView:
    """A worker as readers see it: its row, with the state it has *now* (lost if silent)."""

    id: str
    hostname: str
    queues: list[str]
    gpus: int
    gpu_model: str | None
    memory_bytes: int | None
    versions: dict[str, Any]
    state: WorkerState
    current_experiment_id: str | None
    started_at: datetime
    last_heartbeat: datetime
    seconds_since_heartbeat: float

    @property
    def live(self) -> bool:
        """Whether the worker is heartbeating (idle or busy)."""
        return self.state is not WorkerState.LOST


def effective_state(row: SqlWorker, now: datetime, lost_after_s: float) -> WorkerState:
    """The row's state, or ``lost`` when its last heartbeat is older than ``lost_after_s``.

    Read-time, so a killed worker (which can write nothing) is reported lost
    within ``lost_after_s`` even if no reconciler runs.
    """
    _check_aware(now)
    if (now - row.last_heartbeat).total_seconds() > lost_after_s:
        return WorkerState.LOST
    return WorkerState(row.state)


def view(row: SqlWorker, now: datetime, lost_after_s: float) -> WorkerView:
    """The :class:`WorkerView` of ``row`` at ``now``."""
    return WorkerView(
        id=row.id,
        hostname=row.hostname,
        queues=list(row.queues),
        gpus=row.gpus,
        gpu_model=row.gpu_model,
        memory_bytes=row.memory_bytes,
        versions=dict(row.versions),
        state=effective_state(row, now, lost_after_s),
        current_experiment_id=row.current_experiment_id,
        started_at=row.started_at,
        last_heartbeat=row.last_heartbeat,
        seconds_since_heartbeat=max(0.0, (now - row.last_heartbeat).total_seconds()),
    )


def register_worker(
    session: Session,
    *,
    worker_id: str,
    hostname: str,
    queues: Sequence[str],
    gpus: int,
    gpu_model: str | None,
    memory_bytes: int | None,
    versions: Mapping[str, Any],
    now: datetime,
) -> SqlWorker:
    """Insert or refresh ``worker_id``'s row: idle, nothing running, started and beating ``now``.

    An upsert by primary key: a worker restarted under the same name
    (``FITFLEET_WORKER_NAME``) takes its old row over instead of leaving a lost
    twin. Not a dialect ``ON CONFLICT``: one worker registers its own id, so a
    concurrent insert of the same id is a configuration error worth an error.
    """
    _check_aware(now)
    row = session.get(SqlWorker, worker_id)
    if row is None:
        row = SqlWorker(id=worker_id)
        session.add(row)
    row.hostname = hostname
    row.queues = list(queues)
    row.gpus = gpus
    row.gpu_model = gpu_model
    row.memory_bytes = memory_bytes
    row.versions = dict(versions)
    row.state = WorkerState.IDLE
    row.current_experiment_id = None
    row.started_at = now
    row.last_heartbeat = now
    session.add(
        SqlEvent(
            kind="worker.registered",
            message=f"worker {worker_id} on {hostname}: queues {', '.join(queues)}; {gpus} GPUs",
            data={"queues": list(queues), "gpus": gpus, "gpu_model": gpu_model},
            actor=worker_id,
            created_at=now,
        )
    )
    session.flush()
    return row


def heartbeat(session: Session, *, worker_id: str, now: datetime) -> bool:
    """Refresh ``last_heartbeat``; False when the row is gone (the caller registers again).

    A row marked lost (the worker was cut off from the database for a while,
    not dead) comes back busy if it still has a run, else idle. The state is
    otherwise left alone: busy/idle belong to the training task.
    """
    _check_aware(now)
    result = session.execute(
        update(SqlWorker).where(SqlWorker.id == worker_id).values(last_heartbeat=now)
    )
    if not _rowcount(result):
        return False
    for has_run, state in ((True, WorkerState.BUSY), (False, WorkerState.IDLE)):
        condition = (
            SqlWorker.current_experiment_id.is_not(None)
            if has_run
            else SqlWorker.current_experiment_id.is_(None)
        )
        session.execute(
            update(SqlWorker)
            .where(SqlWorker.id == worker_id, SqlWorker.state == WorkerState.LOST, condition)
            .values(state=state)
        )
    return True


def mark_busy(session: Session, *, worker_id: str, experiment_id: str, now: datetime) -> bool:
    """The worker trains ``experiment_id`` now; False when it has no row (not registered)."""
    _check_aware(now)
    result = session.execute(
        update(SqlWorker)
        .where(SqlWorker.id == worker_id)
        .values(state=WorkerState.BUSY, current_experiment_id=experiment_id, last_heartbeat=now)
    )
    return bool(_rowcount(result))


def mark_idle(session: Session, *, worker_id: str, experiment_id: str, now: datetime) -> bool:
    """The worker finished ``experiment_id``; a row now showing another run is left alone.

    Matching on the run keeps a worker with two pool processes from being
    shown idle while its other process still trains.
    """
    _check_aware(now)
    result = session.execute(
        update(SqlWorker)
        .where(SqlWorker.id == worker_id, SqlWorker.current_experiment_id == experiment_id)
        .values(state=WorkerState.IDLE, current_experiment_id=None, last_heartbeat=now)
    )
    return bool(_rowcount(result))


def deregister(session: Session, *, worker_id: str, now: datetime) -> bool:
    """A clean stop: the row becomes ``lost`` with nothing running, kept for history.

    ``lost`` because the worker takes no work any more (placement must not
    count it); the ``worker.stopped`` event tells a stop from a crash.
    """
    _check_aware(now)
    result = session.execute(
        update(SqlWorker)
        .where(SqlWorker.id == worker_id)
        .values(state=WorkerState.LOST, current_experiment_id=None)
    )
    if not _rowcount(result):
        return False
    session.add(
        SqlEvent(
            kind="worker.stopped",
            message=f"worker {worker_id} stopped",
            actor=worker_id,
            created_at=now,
        )
    )
    return True


def mark_lost(session: Session, *, now: datetime, lost_after_s: float) -> list[str]:
    """Write ``lost`` on every idle/busy worker silent for over ``lost_after_s``; their ids.

    For the dispatcher's reconcile pass. ``current_experiment_id`` is kept (what
    the worker was running when it vanished); the run itself is rescued by its
    lease expiring (:func:`shared.runs.requeue_expired`), not here.
    """
    _check_aware(now)
    cutoff = now - timedelta(seconds=lost_after_s)
    ids = list(
        session.scalars(
            select(SqlWorker.id)
            .where(SqlWorker.state != WorkerState.LOST, SqlWorker.last_heartbeat < cutoff)
            .with_for_update(skip_locked=True)
        )
    )
    if not ids:
        return []
    session.execute(
        update(SqlWorker)
        .where(SqlWorker.id.in_(ids), SqlWorker.last_heartbeat < cutoff)
        .values(state=WorkerState.LOST)
    )
    for worker_id in ids:
        session.add(
            SqlEvent(
                kind="worker.lost",
                message=f"worker {worker_id}: no heartbeat for over {lost_after_s:g} s",
                actor="system",
                created_at=now,
            )
        )
    return ids


def list_workers(session: Session, *, now: datetime, lost_after_s: float) -> list[WorkerView]:
    """Every worker (lost ones too), live first, then by id."""
    rows = session.scalars(select(SqlWorker).order_by(SqlWorker.id)).all()
    views = [view(row, now, lost_after_s) for row in rows]
    return sorted(views, key=lambda v: (not v.live, v.id))


def live_workers(
    session: Session, queue: str, *, now: datetime, lost_after_s: float
) -> list[WorkerView]:
    """Idle or busy workers (by heartbeat) consuming ``queue``."""
    return [
        v
        for v in list_workers(session, now=now, lost_after_s=lost_after_s)
        if v.live and queue in v.queues
    ]


# --- placement ---------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Whether a run fits the live fleet of its queue, ever and now; ``reason`` when not now."""

    placeable_ever: bool
    placeable_now: bool
    reason: str | None


def _plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _is_are(count: int) -> str:
    return "is" if count == 1 else "are"


def describe_need(gpus: int, nodes: int) -> str:
    """``'2 nodes with 8 GPUs'`` / ``'1 CPU node'``: what a run asks for, in words."""
    if gpus == 0:
        return _plural(nodes, "CPU node")
    return f"{_plural(nodes, 'node')} with {_plural(gpus, 'GPU')}"


def placement(
    gpus: int,
    nodes: int,
    workers: Iterable[WorkerView],
    *,
    queue: str,
    idle_taken: int = 0,
) -> Placement:
    """Whether a run needing ``nodes`` workers with ``gpus`` GPUs each fits ``workers``.

    Args:
        gpus: ``resources.gpus``, processes per node (0 = a CPU run).
        nodes: ``resources.nodes``.
        workers: the live workers of ``queue`` (lost ones are ignored anyway).
        queue: the run's queue, for the reason text.
        idle_taken: idle fitting workers already promised to runs ahead of this
            one in the queue (:func:`queue_status`); they do not count as free.
    """
    live = [w for w in workers if w.live]
    if not live:
        return Placement(False, False, f"no live worker on queue '{queue}'")
    fitting = [w for w in live if w.gpus >= gpus]
    idle = sum(1 for w in fitting if w.state is WorkerState.IDLE)
    need = describe_need(gpus, nodes)
    if len(fitting) < nodes:
        if not fitting:  # only possible for gpus > 0: every live worker has gpus >= 0
            most = max(w.gpus for w in live)
            return Placement(
                False,
                False,
                f"needs {need}; no live worker on queue '{queue}' has {gpus}+ GPUs"
                f" (the most is {most})",
            )
        what = "live worker" if gpus == 0 else f"live worker with {gpus}+ GPUs"
        many = what.replace("worker", "workers")
        return Placement(
            False,
            False,
            f"needs {need}; {_plural(len(fitting), what, many)} on queue '{queue}' ({idle} idle)",
        )
    free = idle - idle_taken
    if free >= nodes:
        return Placement(True, True, None)
    what = "idle worker" if gpus == 0 else f"idle worker with {gpus}+ GPUs"
    reason = f"waiting for {_plural(nodes, what, what.replace('worker', 'workers'))}; "
    reason += f"{idle} {_is_are(idle)} idle"
    if idle_taken and idle:
        reason += f", taken by {_plural(idle_taken, 'run')} ahead in the queue"
    return Placement(True, False, reason)


def resources_of(spec: Mapping[str, Any]) -> tuple[int, int]:
    """``(gpus, nodes)`` of a stored spec, with the spec's defaults (1, 1) for missing values."""
    resources = spec.get("resources")
    resources = resources if isinstance(resources, Mapping) else {}
    gpus = resources.get("gpus", 1)
    nodes = resources.get("nodes", 1)
    return (
        gpus if isinstance(gpus, int) and gpus >= 0 else 1,
        nodes if isinstance(nodes, int) and nodes >= 1 else 1,
    )


def placement_for_run(
    session: Session, run: SqlExperiment, *, now: datetime, lost_after_s: float
) -> Placement:
    """:func:`placement` of one run against the live fleet of its queue, ignoring runs ahead.

    For the dispatcher: a run with ``placeable_ever`` False should stay queued
    (not published, not failed) with ``reason`` shown, until the fleet grows.
    """
    gpus, nodes = resources_of(run.spec if isinstance(run.spec, Mapping) else {})
    workers = live_workers(session, run.queue, now=now, lost_after_s=lost_after_s)
    return placement(gpus, nodes, workers, queue=run.queue)


# --- queues ------------------------------------------------------------------


@dataclass(frozen=True)
class WaitingRun:
    """A queued or dispatched run, its place in the queue, and why it has not started."""

    id: str
    state: ExperimentState
    priority: int
    created_at: datetime
    age_seconds: float
    position: int  # 0 is next
    gpus: int
    nodes: int
    placeable_ever: bool
    placeable_now: bool
    reason: str | None


@dataclass(frozen=True)
class QueueStatus:
    """One queue: depths in the database and the broker, the oldest waiting run, workers."""

    name: str
    database_depth: int  # queued + dispatched runs
    queued: int
    dispatched: int
    running: int
    broker_depth: int | None  # None: the broker was not asked or did not answer
    oldest_waiting_id: str | None
    oldest_waiting_age_seconds: float | None
    live_workers: int
    idle_workers: int
    lost_workers: int
    waiting: list[WaitingRun] = field(default_factory=list)


def known_queues(session: Session) -> list[str]:
    """Queues some worker consumes or some unfinished run targets, sorted."""
    names: set[str] = set()
    for queues in session.scalars(select(SqlWorker.queues)):
        names.update(q for q in queues if isinstance(q, str))
    names.update(
        session.scalars(
            select(SqlExperiment.queue)
            .where(SqlExperiment.state.in_([*WAITING_STATES, ExperimentState.RUNNING]))
            .distinct()
        )
    )
    return sorted(names)


def queue_status(
    session: Session,
    *,
    broker_depths: Mapping[str, int | None],
    now: datetime,
    lost_after_s: float,
    limit: int = WAITING_LIMIT,
) -> list[QueueStatus]:
    """Every known queue (and every queue in ``broker_depths``), with its waiting runs' reasons.

    Waiting runs are listed in the order the fleet serves them (priority 9
    first, then oldest). Reasons are computed greedily: a run that fits takes
    idle fitting workers, so a later run that would fit an empty fleet reads
    "waiting for ... taken by runs ahead". Runs needing more than the fleet
    has never block the ones behind them.
    """
    _check_aware(now)
    workers = list_workers(session, now=now, lost_after_s=lost_after_s)
    counts: dict[tuple[str, ExperimentState], int] = {}
    for queue, state, count in session.execute(
        select(SqlExperiment.queue, SqlExperiment.state, func.count())
        .where(SqlExperiment.state.in_([*WAITING_STATES, ExperimentState.RUNNING]))
        .group_by(SqlExperiment.queue, SqlExperiment.state)
    ):
        counts[(queue, ExperimentState(state))] = int(count)
    names = sorted(set(known_queues(session)) | set(broker_depths))
    result: list[QueueStatus] = []
    for name in names:
        on_queue = [w for w in workers if name in w.queues]
        live = [w for w in on_queue if w.live]
        rows = session.execute(
            select(
                SqlExperiment.id,
                SqlExperiment.state,
                SqlExperiment.priority,
                SqlExperiment.created_at,
                SqlExperiment.spec,
            )
            .where(SqlExperiment.queue == name, SqlExperiment.state.in_(WAITING_STATES))
            .order_by(SqlExperiment.priority.desc(), SqlExperiment.created_at, SqlExperiment.id)
            .limit(limit)
        ).all()
        waiting: list[WaitingRun] = []
        taken: dict[int, int] = {}  # gpus threshold -> idle workers promised at that size
        for position, (run_id, state, priority, created_at, spec) in enumerate(rows):
            gpus, nodes = resources_of(spec if isinstance(spec, Mapping) else {})
            # Workers promised to runs ahead that would also fit this run.
            ahead = _promised_fitting(taken, gpus, live)
            fit = placement(gpus, nodes, live, queue=name, idle_taken=ahead)
            if fit.placeable_now:
                taken[gpus] = taken.get(gpus, 0) + nodes
            waiting.append(
                WaitingRun(
                    id=run_id,
                    state=ExperimentState(state),
                    priority=priority,
                    created_at=created_at,
                    age_seconds=max(0.0, (now - created_at).total_seconds()),
                    position=position,
                    gpus=gpus,
                    nodes=nodes,
                    placeable_ever=fit.placeable_ever,
                    placeable_now=fit.placeable_now,
                    reason=fit.reason,
                )
            )
        oldest_row = session.execute(
            select(SqlExperiment.id, SqlExperiment.created_at)
            .where(SqlExperiment.queue == name, SqlExperiment.state.in_(WAITING_STATES))
            .order_by(SqlExperiment.created_at, SqlExperiment.id)
            .limit(1)
        ).first()
        queued = counts.get((name, ExperimentState.QUEUED), 0)
        dispatched = counts.get((name, ExperimentState.DISPATCHED), 0)
        result.append(
            QueueStatus(
                name=name,
                database_depth=queued + dispatched,
                queued=queued,
                dispatched=dispatched,
                running=counts.get((name, ExperimentState.RUNNING), 0),
                broker_depth=broker_depths.get(name),
                oldest_waiting_id=oldest_row[0] if oldest_row else None,
                oldest_waiting_age_seconds=(
                    max(0.0, (now - oldest_row[1]).total_seconds()) if oldest_row else None
                ),
                live_workers=len(live),
                idle_workers=sum(1 for w in live if w.state is WorkerState.IDLE),
                lost_workers=len(on_queue) - len(live),
                waiting=waiting,
            )
        )
    return result


def _promised_fitting(taken: Mapping[int, int], gpus: int, live: Sequence[WorkerView]) -> int:
    """Idle workers already promised to earlier runs that a ``gpus`` run could also use.

    Approximate but safe: a run of ``g`` GPUs was promised workers with at
    least ``g`` GPUs, which fit this run when ``g >= gpus``; promises to
    smaller runs count only up to the idle workers big enough for this one.
    """
    idle_fitting = sum(1 for w in live if w.state is WorkerState.IDLE and w.gpus >= gpus)
    promised = sum(n for g, n in taken.items() if g >= gpus)
    smaller = sum(n for g, n in taken.items() if g < gpus)
    idle_small_only = sum(
        1 for w in live if w.state is WorkerState.IDLE and w.gpus < gpus
    )  # workers the smaller runs may have taken instead
    promised += max(0, smaller - idle_small_only)
    return min(promised, idle_fitting)


def _rowcount(result: Any) -> int:
    count = getattr(result, "rowcount", 0)
    return int(count) if isinstance(count, int) else 0
