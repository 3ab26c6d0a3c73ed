"""The API's fast path to the broker: publish just-submitted runs in batches, off the request.

A submission commits its run and outbox row and answers at once; the run
then only needs its message published. Doing that per request (a transaction
that locks the outbox row, publishes, marks it sent) doubled the database work
of every submission. Instead the route calls :meth:`SubmitPublisher.notify`,
and one background thread per API process drains everything notified since
its last pass in a single :func:`shared.dispatch.relay_outbox` transaction: at
one submission a pass is as quick as before (the thread is woken at once), under
load each pass carries many runs for the price of one commit.

Nothing depends on this thread for correctness: a run it never publishes (the
process died, the broker was down) is still an unsent outbox row, and the
dispatcher's relay sends it.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine

from shared.db.base import utcnow
from shared.db.session import session_scope
from shared.dispatch import (
    DEFAULT_JOIN_TIMEOUT_S,
    DEFAULT_LOST_AFTER_S,
    Publish,
    relay_outbox,
)

logger = logging.getLogger(__name__)

#: Runs published per transaction at most; more wait for the next pass.
MAX_BATCH = 500


class SubmitPublisher:
    """A daemon thread that publishes notified runs, many per transaction.

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
        join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S,
    ) -> None:
        self._engine = engine
        self._publish = publish
        self._lost_after_s = lost_after_s
        self._join_timeout_s = join_timeout_s
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None

    def notify(self, experiment_id: str) -> None:
        """Ask for ``experiment_id``'s outbox row to be published soon (never blocks)."""
        with self._lock:
            if self._closing:
                return  # the relay will send it
            self._pending.append(experiment_id)
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

    def _take(self) -> list[str]:
        with self._lock:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            if self._pending:
                self._wake.set()
            return batch

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            batch = self._take()
            if batch:
                self._send(batch)
            with self._lock:
                if self._closing and not self._pending:
                    return

    def _send(self, batch: list[str]) -> None:
        try:
            with session_scope(self._engine) as session:
                relay_outbox(
                    session,
                    self._publish,
                    now=utcnow(),
                    experiment_ids=batch,
                    limit=len(batch),
                    lost_after_s=self._lost_after_s,
                    join_timeout_s=self._join_timeout_s,
                )
        except Exception:  # the relay loop retries; the clients already have their 201s
            logger.warning(
                "publishing %d new run(s) failed; the dispatcher will", len(batch), exc_info=True
            )
