"""The worker's :class:`~workers.training.reporter.Reporter`: Postgres rows and store uploads.

The engine only knows its run folder; this reporter turns what it announces
into the service's durable record while the run goes on, so the API can show
live progress and another worker can resume the run if this one dies:

* every epoch row is *upserted* (a replayed epoch after a resume overwrites its
  earlier row instead of adding a second one);
* every file the engine writes is uploaded to ``runs/<experiment>/<relative
  path>`` and recorded as one artifact row per (experiment, name), updated
  in place when the file is rewritten (``report.json`` changes every epoch);
  checkpoints go up too, with ``checkpoints/latest.json`` after them, because
  a resume elsewhere starts from what the store holds;
* :meth:`ServiceReporter.should_stop` is the worker's heartbeat: it renews the
  lease and reads the cancel flag, throttled so the engine may poll it after
  every batch.

Each database write is its own short transaction so a long run never holds
row locks. A database outage (a Postgres restart) does not stop the run: the
writes wait in memory, in order, and go out as soon as the database answers
again (at the next write or lease check); only an outage longer than
``outage_limit_s`` (by default the lease's time to live, after which the run
is no longer ours anyway) reaches the engine, which then stops the run. An
artifact store that does not answer is ridden out the same way: uploads wait,
in order, and training goes on; past ``store_outage_limit_s`` the run fails
saying so, and everything uploaded before (checkpoints included) stays usable.
Other store failures are retried a few times before they reach the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, Select, select, update
from sqlalchemy.orm import Session

from shared.db.base import utcnow
from shared.db.metrics import (
    record_stage_reports,
    replace_lr_find_points,
    upsert_epoch_metric,
    upsert_stage,
)
from shared.db.models import SqlArtifact, SqlEvent, SqlExperiment
from shared.db.session import session_scope
from shared.errors import BackendUnavailable, StorageError
from shared.results import EpochRow, LrFindResult, Report
from shared.runs import renew_lease
from shared.storage.base import ArtifactStore, StoredObject, StoreUnreachable, sha256_file
from shared.storage.layout import run_key

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Waits between tries of a failed database or store call: three retries over
#: about 3.5 s ride out a restarting database or a throttled bucket, and a
#: longer outage is better reported than hidden.
RETRY_DELAYS_S: tuple[float, ...] = (0.5, 1.0, 2.0)

#: How often :meth:`ServiceReporter.should_stop` really asks the database. The
#: engine polls between batches (many per second on a GPU); a cancel taking
#: two seconds to be noticed costs nothing, a query per batch would.
POLL_INTERVAL_S = 2.0

#: The checkpoint pointer the engine rewrites next to each checkpoint without
#: announcing it; a resume cannot find its checkpoint without it.
LATEST_POINTER = "checkpoints/latest.json"

#: How long an unreachable artifact store is ridden out before the run fails.
STORE_OUTAGE_LIMIT_S = 300.0

#: Least time between two tries of held uploads while the store is down.
STORE_RETRY_EVERY_S = 2.0


def with_retries(
    call: Callable[[], T],
    *,
    what: str,
    delays: Sequence[float] = RETRY_DELAYS_S,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``, tried again after each of ``delays`` when the database or store fails.

    Only :class:`BackendUnavailable` and :class:`StorageError` are retried: a
    conflict or a bug will not go away by waiting. The last failure is re-raised.
    """
    for delay in delays:
        try:
            return call()
        except (BackendUnavailable, StorageError) as exc:
            log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
            sleep(delay)
    return call()


class ServiceReporter:
    """Records one attempt of one experiment in the database and the artifact store.

    Args:
        engine: the database the run's rows live in.
        store: where artifacts are uploaded.
        experiment_id: the run.
        run_dir: the engine's run folder; artifact names are paths relative to it.
        worker_id: the lease owner this worker claimed the run as.
        attempt: the claim's attempt number, written on every epoch row.
        lease_ttl_s: how far each renewal pushes the lease out.
        now: the wall clock for lease times (aware UTC).
        clock: a monotonic clock for the poll throttle.
        poll_interval_s: the least time between two real cancel/lease checks.
        sleep: how retries wait (tests pass a no-op).
        outage_limit_s: how long a database outage is ridden out (default: the lease TTL).
        store_outage_limit_s: how long an unreachable artifact store is ridden out.
    """

    def __init__(
        self,
        engine: Engine,
        store: ArtifactStore,
        *,
        experiment_id: str,
        run_dir: Path,
        worker_id: str,
        attempt: int,
        lease_ttl_s: float = 60,
        now: Callable[[], datetime] = utcnow,
        clock: Callable[[], float] = time.monotonic,
        poll_interval_s: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        outage_limit_s: float | None = None,
        store_outage_limit_s: float = STORE_OUTAGE_LIMIT_S,
    ) -> None:
        self.engine = engine
        self.store = store
        self.experiment_id = experiment_id
        self.run_dir = Path(run_dir)
        self.worker_id = worker_id
        self.attempt = attempt
        self.lease_ttl_s = lease_ttl_s
        self.now = now
        self.clock = clock
        # Read at construction, not import, so tests can shorten the module constant.
        self.poll_interval_s = POLL_INTERVAL_S if poll_interval_s is None else poll_interval_s
        self.sleep = sleep
        self.stop_reason: str | None = None
        self._last_poll: float | None = None
        self.outage_limit_s = lease_ttl_s if outage_limit_s is None else outage_limit_s
        self._pending: list[tuple[str, Callable[[Session], object]]] = []
        self._down_since: float | None = None
        self.store_outage_limit_s = store_outage_limit_s
        self._uploads: list[tuple[str, Path]] = []
        self._store_down_since: float | None = None
        self._store_tried: float | None = None

    # ------------------------------------------------------------------ helpers

    def _retry(self, call: Callable[[], T], what: str) -> T:
        return with_retries(call, what=f"{what} ({self.experiment_id})", sleep=self.sleep)

    def _write(self, what: str, work: Callable[[Session], object]) -> None:
        """Record ``work`` in its own short transaction, now or, after an outage, later.

        Writes are kept in order: while earlier ones wait, this one waits too.
        """
        self._pending.append((what, work))
        self.flush_pending()

    def flush_pending(self) -> bool:
        """Send the writes an outage held back; True when none is left.

        Raises:
            BackendUnavailable: the database has been down for over ``outage_limit_s``.
        """
        while self._pending:
            what, work = self._pending[0]
            try:
                with session_scope(self.engine) as session:
                    work(session)
            except BackendUnavailable as exc:
                self._outage(what, exc)
                return False
            self._pending.pop(0)
            if self._down_since is not None:
                log.warning(
                    "run %s: the database is back after %.1f s",
                    self.experiment_id,
                    self.clock() - self._down_since,
                )
                self._down_since = None
        return True

    def drain(self, timeout_s: float | None = None) -> bool:
        """Before the process ends: wait (up to ``timeout_s``) until every held write is sent."""
        limit = max(self.outage_limit_s, self.store_outage_limit_s)
        limit = limit if timeout_s is None else timeout_s
        deadline = self.clock() + limit
        while True:
            try:
                if self.flush_uploads(force=True) and self.flush_pending():
                    return True
            except (BackendUnavailable, StorageError):
                return False
            if self.clock() >= deadline:
                return False
            self.sleep(0.5)

    def _read(self, what: str, work: Callable[[Session], T], default: T) -> T:
        """A query whose answer can wait: ``default`` while the database is down."""
        try:
            with session_scope(self.engine) as session:
                return work(session)
        except BackendUnavailable as exc:
            self._outage(what, exc)
            return default

    def _outage(self, what: str, exc: BackendUnavailable) -> None:
        now = self.clock()
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "run %s: database unavailable while %s (%s); training goes on, %d write(s) held",
                self.experiment_id,
                what,
                exc,
                len(self._pending),
            )
        elif now - self._down_since > self.outage_limit_s:
            raise BackendUnavailable(
                f"the database has been unavailable for over {self.outage_limit_s:g} s "
                f"(last: {what})"
            ) from exc

    def _set_progress(self, session: Session, stage: str, epoch: int | None) -> None:
        session.execute(
            update(SqlExperiment)
            .where(SqlExperiment.id == self.experiment_id)
            .values(current_stage=stage, current_epoch=epoch)
        )

    # ------------------------------------------------------------------ Reporter

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """An engine event becomes a line of the run's timeline."""

        def work(session: Session) -> None:
            session.add(
                SqlEvent(
                    experiment_id=self.experiment_id,
                    kind=kind,
                    message=message,
                    data=dict(data or {}),
                    actor=self.worker_id,
                    created_at=self.now(),
                )
            )

        self._write("recording an event", work)

    def on_stage_start(self, stage: str, index: int, epochs: int, batches_per_epoch: int) -> None:
        """Show the stage as current at once, not only after its first epoch; note its start."""

        def work(session: Session) -> None:
            self._set_progress(session, stage, None)
            upsert_stage(session, self.experiment_id, stage, started_at=self.now())

        self._write("recording a stage start", work)

    def on_batch(self, stage: str, epoch: int, batch: int, batches: int, loss: float) -> None:
        """Nothing: a database write per batch would cost more than it tells."""

    def on_epoch(self, row: EpochRow) -> None:
        """Upsert the epoch row and move the run's progress, together."""

        def work(session: Session) -> None:
            upsert_epoch_metric(session, self.experiment_id, row, attempt=self.attempt)
            self._set_progress(session, row.stage, row.epoch)

        self._write("recording an epoch", work)

    def on_lr_find(self, result: LrFindResult) -> None:
        """Store the finder's curve, replacing a curve an earlier attempt left."""
        self._write(
            "recording an LR-finder curve",
            lambda s: replace_lr_find_points(s, self.experiment_id, result),
        )

    def on_artifact(self, kind: str, path: Path) -> None:
        """Upload the file and record it; a checkpoint's pointer follows the checkpoint.

        While the store is unreachable the upload waits its turn (see the module doc).
        """
        if kind == "report":
            self._record_stages(Path(path))
        self._uploads.append((kind, Path(path)))
        if kind == "checkpoint":
            # After the checkpoint, so the stored pointer never names a file the
            # store does not have yet.
            self._uploads.append(("checkpoint", self.run_dir / LATEST_POINTER))
        self.flush_uploads(force=True)

    def _record_stages(self, report_path: Path) -> None:
        """Each stage's outcome from report.json into ``stages`` (the API reads it there)."""
        try:
            report = Report.model_validate_json(report_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s for its stages: %s", report_path, exc)
            return
        self._write(
            "recording the stages' outcome",
            lambda s: record_stage_reports(s, self.experiment_id, report.stages),
        )

    def flush_uploads(self, *, force: bool = False) -> bool:
        """Send held uploads in order; True when none is left.

        While the store is down a try is made at most every
        :data:`STORE_RETRY_EVERY_S` (unless ``force``), so the training loop
        is not held up by a dead endpoint.

        Raises:
            StorageError: the store has been unreachable for over ``store_outage_limit_s``.
        """
        if not self._uploads:
            return True
        tick = self.clock()
        if (
            not force
            and self._store_tried is not None
            and tick - self._store_tried < STORE_RETRY_EVERY_S
        ):
            return False
        self._store_tried = tick
        while self._uploads:
            kind, path = self._uploads[0]
            if not path.is_file():  # superseded and removed (an old epoch's checkpoint)
                self._uploads.pop(0)
                continue
            try:
                self._upload(kind, path)
            except StoreUnreachable as exc:
                self._store_outage(path, exc)
                return False
            self._uploads.pop(0)
            if self._store_down_since is not None:
                log.warning(
                    "run %s: the artifact store is back after %.1f s",
                    self.experiment_id,
                    tick - self._store_down_since,
                )
                self._store_down_since = None
        return True

    def _store_outage(self, path: Path, exc: StoreUnreachable) -> None:
        now = self.clock()
        if self._store_down_since is None:
            self._store_down_since = now
            log.warning(
                "run %s: artifact store unreachable uploading %s (%s); training goes on, "
                "%d upload(s) held",
                self.experiment_id,
                path.name,
                exc,
                len(self._uploads),
            )
        elif now - self._store_down_since > self.store_outage_limit_s:
            raise StorageError(
                f"the artifact store has been unreachable for over "
                f"{self.store_outage_limit_s:g} s: {exc}"
            ) from exc

    def should_stop(self) -> bool:
        """True once a cancel was requested or the lease was lost; checked every few seconds.

        Renewing here ties the lease to real progress: a worker stuck outside
        the training loop stops renewing and the reconciler rescues the run.
        """
        if self.stop_reason is not None:
            return True
        tick = self.clock()
        if self._last_poll is not None and tick - self._last_poll < self.poll_interval_s:
            return False
        self._last_poll = tick

        def work(session: Session) -> tuple[bool, bool]:
            cancel = session.scalar(
                select(SqlExperiment.cancel_requested).where(SqlExperiment.id == self.experiment_id)
            )
            held = renew_lease(
                session,
                experiment_id=self.experiment_id,
                worker_id=self.worker_id,
                ttl_s=self.lease_ttl_s,
                now=self.now(),
            )
            return bool(cancel), held

        self.flush_uploads()
        if self._pending and not self.flush_pending():
            return False  # still down: keep training, the supervisor keeps the lease's time
        cancel, held = self._read("renewing the lease", work, (False, True))
        if cancel:
            self.stop_reason = "cancel requested"
        elif not held:
            self.stop_reason = "lease lost"
        if self.stop_reason is not None:
            log.warning("run %s: stopping: %s", self.experiment_id, self.stop_reason)
            return True
        return False

    # ------------------------------------------------------------------ uploads

    def _upload(self, kind: str, path: Path) -> None:
        name = path.relative_to(self.run_dir).as_posix()
        digest, size = sha256_file(path)

        def known(session: Session) -> tuple[int, str] | None:
            row = session.scalar(self._artifact_query(name))
            return None if row is None else (row.bytes, row.sha256)

        if self._read("reading an artifact row", known, None) == (size, digest):
            log.debug("run %s: %s unchanged, not uploaded again", self.experiment_id, name)
            return
        key = run_key(self.experiment_id, name)
        stored = self._put(key, path, name)

        def record(session: Session) -> None:
            row = session.scalar(self._artifact_query(name))
            if row is None:
                row = SqlArtifact(experiment_id=self.experiment_id, name=name)
                session.add(row)
            row.kind = kind
            row.uri = stored.uri
            row.bytes = stored.bytes
            row.sha256 = stored.sha256
            row.created_at = self.now()

        self._write("recording an artifact", record)

    def _put(self, key: str, path: Path, name: str) -> StoredObject:
        """Upload once; a store that does not answer is the caller's to hold (no waits here).

        Other store failures (a throttled request, a flaky gateway) are retried
        a few times first, as before.
        """
        try:
            return self.store.put_file(key, path)
        except StoreUnreachable:
            raise
        except StorageError:
            return self._retry(lambda: self.store.put_file(key, path), f"uploading {name}")

    def _artifact_query(self, name: str) -> Select[SqlArtifact]:
        return select(SqlArtifact).where(
            SqlArtifact.experiment_id == self.experiment_id, SqlArtifact.name == name
        )
