"""The API's fast path to the broker: publish just-submitted runs right away, cheaply.

A submission commits its run and outbox row and answers at once; the run then
only needs its message sent. One background thread per API process does that
for everything submitted since its last pass: it publishes each new run
straight from what the route handed it (no read of the outbox) and then marks
the whole batch sent in one transaction of two UPDATEs. Under load a pass
carries many runs; an idle API sends a run within milliseconds.

Only the plain case takes this path: a run for one node whose queue's live
fleet can hold it (the fleet is re-read every :data:`FLEET_REFRESH_S`). A
multi-node run needs a gang, and a run too big for the fleet must wait; both
are left to the dispatcher's relay (:func:`shared.dispatch.relay_outbox`),
which is also the safety net for anything this thread never sent (the process
died, the broker was down). A run the relay sends before this thread marks it
goes out twice at worst, which the worker's lease makes harmless.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy import Engine, update

from shared.db.base import utcnow
from shared.db.models import ExperimentState, SqlExperiment, SqlOutbox
from shared.db.session import session_scope
from shared.dispatch import DEFAULT_LOST_AFTER_S, OutboxMessage, Publish
from shared.fleet import list_workers
from shared.runs import TRAIN_TASK

logger = logging.getLogger(__name__)

#: Runs published per pass at most; more wait for the next pass.
MAX_BATCH = 500

#: After a wake-up, how long the thread lets more submissions arrive before it
#: publishes (seconds): a few milliseconds on the way to the worker buy a batch
#: of many runs per transaction under load.
LINGER_S = 0.005

#: How often the thread re-reads which queues have live workers, and their GPUs.
FLEET_REFRESH_S = 2.0


@dataclass(frozen=True)
class NewRun:
    """What the route knows of a run it just committed: enough to publish it."""

    id: str
    queue: str
    priority: int
    gpus: int
    nodes: int


class SubmitPublisher:
    """A daemon thread that publishes new runs in batches (see the module doc).

    Started on the first :meth:`notify` (so an app used without its lifespan,
    as some tests do, still publishes) and stopped by :meth:`close`, which
    publishes whatever is still pending first.
    """

    def __init__(
        self,
        engine: Engine,
        publish: Publish,
        *,
        lost_after_s: float = DEFAULT_LOST_AFTER_S,
    ) -> None:
        self._engine = engine
        self._publish = publish
        self._lost_after_s = lost_after_s
        self._pending: list[NewRun] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._fleet: dict[str, int] = {}  # queue -> most GPUs of a live worker
        self._fleet_read = -FLEET_REFRESH_S

    def notify(self, run: NewRun) -> None:
        """Ask for ``run`` to be published soon (never blocks)."""
        with self._lock:
            if self._closing:
                return  # the relay will send it
            self._pending.append(run)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="fitfleet-submit-publisher", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def close(self, timeout_s: float = 5.0) -> None:
        """Publish what is pending, then stop the thread."""
        with self._lock:
            self._closing = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout_s)

    def _take(self) -> list[NewRun]:
        with self._lock:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            if self._pending:
                self._wake.set()
            return batch

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            if not self._closing:
                time.sleep(LINGER_S)
            self._wake.clear()
            batch = self._take()
            if batch:
                try:
                    self._send(batch)
                except Exception:  # the relay retries; the clients already have their 201s
                    logger.warning(
                        "publishing %d new run(s) failed; the dispatcher will",
                        len(batch),
                        exc_info=True,
                    )
            with self._lock:
                if self._closing and not self._pending:
                    return

    def _fits(self, run: NewRun) -> bool:
        """One node, and a queue with no live worker yet or one big enough."""
        if run.nodes > 1:
            return False
        most = self._fleet.get(run.queue)
        return most is None or most >= run.gpus

    def _refresh_fleet(self) -> None:
        if time.monotonic() - self._fleet_read < FLEET_REFRESH_S:
            return
        fleet: dict[str, int] = {}
        with session_scope(self._engine) as session:
            for worker in list_workers(session, now=utcnow(), lost_after_s=self._lost_after_s):
                if worker.live:
                    for queue in worker.queues:
                        fleet[queue] = max(fleet.get(queue, 0), worker.gpus)
        self._fleet = fleet
        self._fleet_read = time.monotonic()

    def _send(self, batch: list[NewRun]) -> None:
        self._refresh_fleet()
        sent: list[str] = []
        for run in batch:
            if not self._fits(run):
                continue  # the dispatcher places it (a gang) or holds it (too big)
            try:
                self._publish(
                    OutboxMessage(
                        task=TRAIN_TASK,
                        queue=run.queue,
                        priority=run.priority,
                        payload={"experiment_id": run.id},
                        outbox_id=0,  # not read back: the batch is marked by run id
                        experiment_id=run.id,
                    )
                )
            except Exception:
                logger.warning("publishing %s failed; the dispatcher will", run.id, exc_info=True)
                break  # the broker is likely down: leave the rest to the relay as well
            sent.append(run.id)
        if not sent:
            return
        now = utcnow()
        with session_scope(self._engine) as session:
            session.execute(
                update(SqlOutbox)
                .where(
                    SqlOutbox.experiment_id.in_(sent),
                    SqlOutbox.task == TRAIN_TASK,
                    SqlOutbox.sent_at.is_(None),
                )
                .values(sent_at=now)
                .execution_options(synchronize_session=False)
            )
            session.execute(
                update(SqlExperiment)
                .where(SqlExperiment.id.in_(sent), SqlExperiment.state == ExperimentState.QUEUED)
                .values(state=ExperimentState.DISPATCHED, updated_at=now)
                .execution_options(synchronize_session=False)
            )
