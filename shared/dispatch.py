"""The outbox relay: publish what the API committed, exactly as it committed it.

The API never talks to the broker. It writes an experiment and an
:class:`~shared.db.models.SqlOutbox` row in one transaction, so a message
exists if and only if the run does; :func:`relay_outbox` then publishes unsent
rows and marks them sent. Rows are locked ``FOR UPDATE SKIP LOCKED``, so any
number of relays can run side by side and each row goes to exactly one of
them. A crash between publish and commit publishes the row again next time,
which is why delivery is at least once and the worker's lease
(:mod:`shared.runs`) is what keeps a run from training twice.

Publishing is a plain callable so the relay is testable without a broker;
:func:`celery_publisher` adapts a Celery app.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from shared.db.base import utcnow
from shared.db.models import TERMINAL_STATES, ExperimentState, SqlExperiment, SqlOutbox
from shared.fleet import WorkerView, live_workers, resources_of
from shared.gangs import GANG_TASK, needs_gang, reserve_gang
from shared.runs import TRAIN_TASK

logger = logging.getLogger(__name__)

#: ``last_error`` is for people reading a stuck row, not for whole tracebacks.
MAX_ERROR_CHARS = 2000

#: A worker silent this long is not counted when placing a gang (3 heartbeats of 5 s).
DEFAULT_LOST_AFTER_S = 15.0

#: How long the nodes of a gang wait for each other at torchrun's rendezvous.
DEFAULT_JOIN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class OutboxMessage:
    """One message to publish: where, how urgent, and the task's keyword arguments."""

    task: str
    queue: str
    priority: int
    payload: dict[str, Any]
    outbox_id: int
    experiment_id: str


Publish = Callable[[OutboxMessage], None]


class TaskSender(Protocol):
    """The one method of ``celery.Celery`` the relay needs (so shared/ never imports celery)."""

    def send_task(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Publish task ``name``; see ``celery.Celery.send_task``."""
        ...


def relay_outbox(
    session: Session,
    publish: Publish,
    *,
    limit: int = 100,
    now: datetime,
    experiment_id: str | None = None,
    experiment_ids: Collection[str] | None = None,
    lost_after_s: float = DEFAULT_LOST_AFTER_S,
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S,
) -> int:
    """Publish up to ``limit`` unsent outbox rows; return how many were published.

    Order is the spec's priority (higher first, 0..9) then submission order,
    so when the relay falls behind the urgent runs go out first. For each row:

    * the run was cancelled (or a cancel is pending) or is already terminal:
      mark the row sent without publishing, a worker would only refuse it;
    * otherwise publish, mark the row sent and move the run from ``queued`` to
      ``dispatched`` (only from ``queued``: a fast worker may already have
      claimed it, and a cancel may have landed meanwhile);
    * publish raised: count the attempt, keep the error, leave the row unsent
      for the next pass. One broken message or a broker hiccup must not stop
      the rest of the batch, so nothing is raised.

    Runs in the caller's transaction and does not commit; the locks are held
    until the caller commits, which is what keeps a second relay off these rows.
    A run with ``resources.nodes`` > 1 is not sent to its queue: it needs a gang
    (:func:`shared.gangs.reserve_gang`), and one message goes to each reserved
    worker's own queue; while no gang can be formed its row stays unsent (the
    run waits, and ``GET /v1/admin/queues`` says why).

    ``experiment_id`` (one run) or ``experiment_ids`` (several) limits the pass
    to those runs' rows: the API's fast path right after submissions (the relay
    loop remains the safety net).
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"naive datetime {now!r}: pass an aware UTC datetime")
    unsent: list[ColumnElement[bool]] = [SqlOutbox.sent_at.is_(None)]
    if experiment_id is not None:
        unsent.append(SqlOutbox.experiment_id == experiment_id)
    if experiment_ids is not None:
        if not experiment_ids:
            return 0
        unsent.append(SqlOutbox.experiment_id.in_(set(experiment_ids)))
    rows = session.scalars(
        select(SqlOutbox)
        .where(*unsent)
        .order_by(SqlOutbox.priority.desc(), SqlOutbox.id.asc())
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return 0
    runs_spec: dict[str, dict[str, Any]] = {}
    fleet: dict[str, list[WorkerView]] = {}
    runs: dict[str, tuple[ExperimentState, bool, bool]] = {
        run.id: (
            run.state,
            run.cancel_requested,
            needs_gang(runs_spec.setdefault(run.id, run.spec)),
        )
        for run in session.execute(
            select(
                SqlExperiment.id,
                SqlExperiment.state,
                SqlExperiment.cancel_requested,
                SqlExperiment.spec,
            ).where(SqlExperiment.id.in_({row.experiment_id for row in rows}))
        )
    }
    published: list[str] = []
    for row in rows:
        state, cancel_requested, gang = runs[row.experiment_id]  # the foreign key guarantees it
        if cancel_requested or state in TERMINAL_STATES:
            row.sent_at = now
            logger.info(
                "outbox %s not published: run %s is %s",
                row.id,
                row.experiment_id,
                "cancelling" if cancel_requested else state,
            )
            continue
        if (
            row.task == TRAIN_TASK
            and not gang
            and not _fits_fleet(session, row, runs_spec, fleet, lost_after_s)
        ):
            continue  # stays queued; GET /v1/admin/queues gives the reason
        if gang and row.task == TRAIN_TASK:
            if _publish_gang(session, row, publish, now, lost_after_s, join_timeout_s):
                row.sent_at = now
                published.append(row.experiment_id)
            continue
        message = OutboxMessage(
            task=row.task,
            queue=row.queue,
            priority=row.priority,
            payload=dict(row.payload),
            outbox_id=row.id,
            experiment_id=row.experiment_id,
        )
        try:
            publish(message)
        except Exception as exc:  # any broker or serializer error; retried next pass
            row.attempts += 1
            row.last_error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
            logger.warning(
                "publishing outbox %s (run %s) failed, attempt %d",
                row.id,
                row.experiment_id,
                row.attempts,
                exc_info=True,
            )
            continue
        row.sent_at = now
        published.append(row.experiment_id)
    if published:
        # One statement for the batch: under load the fast path sends many runs
        # per transaction, and a statement per run would cost a round trip each.
        session.execute(
            update(SqlExperiment)
            .where(
                SqlExperiment.id.in_(published),
                SqlExperiment.state == ExperimentState.QUEUED,
            )
            .values(state=ExperimentState.DISPATCHED, updated_at=now)
            .execution_options(synchronize_session="fetch")
        )
    session.flush()
    return len(published)


def _fits_fleet(
    session: Session,
    row: SqlOutbox,
    specs: dict[str, dict[str, Any]],
    fleet: dict[str, list[WorkerView]],
    lost_after_s: float,
) -> bool:
    """False when the queue has live workers but none with the GPUs the run needs.

    Such a run is held back rather than handed to a worker that cannot place it
    (it waits, with its reason in ``GET /v1/admin/queues``, until the fleet
    grows). A queue with no live worker at all still gets the message: it
    waits in the broker for the first worker to start. ``fleet`` caches each
    queue's live workers for the pass.
    """
    if row.queue not in fleet:
        fleet[row.queue] = live_workers(session, row.queue, now=utcnow(), lost_after_s=lost_after_s)
    live = fleet[row.queue]
    if not live:
        return True
    gpus, _ = resources_of(specs.get(row.experiment_id, {}))
    return any(worker.gpus >= gpus for worker in live)


def _publish_gang(
    session: Session,
    row: SqlOutbox,
    publish: Publish,
    now: datetime,
    lost_after_s: float,
    join_timeout_s: float,
) -> bool:
    """Reserve a gang for ``row``'s run and send each node its message; False if not now.

    The reservation is written in a savepoint so that a failed publish undoes
    it (the nodes already told will find their gang not the run's owner and
    do nothing).
    """
    run = session.get(SqlExperiment, row.experiment_id)
    if run is None:
        return False
    savepoint = session.begin_nested()
    gang = reserve_gang(
        session, run, now=now, lost_after_s=lost_after_s, join_timeout_s=join_timeout_s
    )
    if gang is None:
        savepoint.rollback()
        return False
    try:
        for node in gang.nodes:
            publish(
                OutboxMessage(
                    task=GANG_TASK,
                    queue=node.queue,
                    priority=row.priority,
                    payload=gang.payload(node),
                    outbox_id=row.id,
                    experiment_id=row.experiment_id,
                )
            )
    except Exception as exc:  # retried next pass, like any publish
        savepoint.rollback()
        row.attempts += 1
        row.last_error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        logger.warning("publishing gang of run %s failed", row.experiment_id, exc_info=True)
        return False
    savepoint.commit()
    logger.info("run %s placed as %s", row.experiment_id, gang.gang_id)
    return True


MAX_PRIORITY = 9


def celery_publisher(app: TaskSender) -> Publish:
    """A ``publish`` for :func:`relay_outbox` that sends through a Celery app.

    The payload becomes the task's keyword arguments. The spec's priority is
    "higher first" (0..9); Celery's Redis transport emulates priorities with 0
    as the highest, so it is sent as ``9 - priority``. The relay also sends in
    priority order, which is what orders a queue that has no priorities
    (the filesystem broker).
    Celery itself is only touched through ``app``, so importing this module
    never imports celery.
    """

    def publish(message: OutboxMessage) -> None:
        app.send_task(
            message.task,
            kwargs=message.payload,
            queue=message.queue,
            priority=MAX_PRIORITY - message.priority,
        )

    return publish
