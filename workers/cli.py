"""``fitfleet worker`` and ``fitfleet dispatch``: the two long-running processes of the fleet.

Kept out of ``cli/main.py`` (which only adds these commands) and importing
celery inside the commands, so the rest of the CLI starts without it.

* ``worker`` runs a Celery worker on the fitfleet app: prefork pool (the only
  pool where the task can supervise a process group and Celery's own signals
  behave), one run per pool process.
* ``dispatch`` is the outbox relay plus the lease reconciler: it publishes
  committed outbox rows (:func:`shared.dispatch.relay_outbox`) and re-queues
  runs whose worker vanished (:func:`shared.runs.requeue_expired`), every
  ``--interval`` seconds until SIGTERM or Ctrl-C. Any number may run at once.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from types import FrameType

import click
from sqlalchemy import Engine

from shared.db.session import make_engine, session_scope
from shared.dispatch import Publish, celery_publisher, relay_outbox
from shared.errors import BackendUnavailable
from shared.fleet import mark_lost
from shared.runs import redispatch_lost, requeue_expired, stale_dispatched_queues
from shared.settings import get_settings

logger = logging.getLogger(__name__)

#: Messages waiting in the broker per queue (None: the broker did not say).
BrokerDepths = Callable[[Sequence[str]], Mapping[str, int | None]]


def worker_argv(queues: str, concurrency: int, *, events: bool = False) -> list[str]:
    """The ``celery worker`` arguments for fitfleet (``app.worker_main`` takes them)."""
    argv = [
        "worker",
        "--queues",
        queues,
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "--hostname",
        f"fitfleet-{socket.gethostname()}@%h",
        "--loglevel",
        "INFO",
    ]
    if events:
        argv.append("--task-events")
    return argv


@click.command()
@click.option("-Q", "--queues", default="gpu", show_default=True, help="Comma-separated queues.")
@click.option(
    "-c",
    "--concurrency",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Runs trained at once (one per GPU set; usually 1 per node).",
)
@click.option("-E", "--events", is_flag=True, help="Send task events (for Flower, celery events).")
def worker(queues: str, concurrency: int, events: bool) -> None:
    """Run a Celery worker that trains runs from QUEUES."""
    from workers.celery_entry import app

    app.worker_main(argv=worker_argv(queues, concurrency, events=events))


def dispatch_pass(
    engine: Engine,
    publish: Publish,
    *,
    limit: int = 100,
    lost_after_s: float | None = None,
    depths: BrokerDepths | None = None,
    redispatch_after_s: float | None = None,
) -> tuple[int, int]:
    """One relay pass and one reconcile pass, each its own transaction: (published, rescued).

    Separate transactions so a broker outage (rows stay unsent, retried next
    pass) never holds back the rescue of runs whose worker died. The reconcile
    pass also writes ``lost`` on workers that stopped heartbeating
    (:func:`shared.fleet.mark_lost`; ``lost_after_s`` defaults to the
    settings'), in a third transaction so it can never hold back a rescue.
    With ``depths`` (the broker's queue depths) it also sends again the runs
    whose messages the broker lost (:func:`shared.runs.redispatch_lost`, after
    ``redispatch_after_s``, default the settings').
    """
    settings = get_settings()
    if lost_after_s is None:
        lost_after_s = settings.worker_lost_after_s
    with session_scope(engine) as session:
        published = relay_outbox(
            session,
            publish,
            limit=limit,
            now=datetime.now(UTC),
            lost_after_s=lost_after_s,
            join_timeout_s=settings.gang_join_timeout_s,
        )
    with session_scope(engine) as session:
        rescued = len(requeue_expired(session, now=datetime.now(UTC), limit=limit))
    if depths is not None:
        stale_s = redispatch_after_s or settings.redispatch_after_s
        rescued += len(_redispatch_lost(engine, depths, stale_s, limit))
    with session_scope(engine) as session:
        lost = mark_lost(session, now=datetime.now(UTC), lost_after_s=lost_after_s)
    if lost:
        logger.warning("dispatch: workers lost (no heartbeat): %s", ", ".join(lost))
    return published, rescued


def _redispatch_lost(
    engine: Engine, depths: BrokerDepths, stale_after_s: float, limit: int
) -> list[str]:
    """Send again the runs whose messages a broker restart lost (see ``redispatch_lost``)."""
    with session_scope(engine) as session:
        queues = stale_dispatched_queues(
            session, now=datetime.now(UTC), stale_after_s=stale_after_s
        )
    if not queues:
        return []
    known = depths(queues)
    with session_scope(engine) as session:
        ids = redispatch_lost(
            session,
            now=datetime.now(UTC),
            stale_after_s=stale_after_s,
            broker_depths=known,
            limit=limit,
        )
    if ids:
        logger.warning("dispatch: messages lost by the broker, sent again: %s", ", ".join(ids))
    return ids


@click.command()
@click.option(
    "--interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.01),
    help="Seconds between passes.",
)
@click.option("--once", is_flag=True, help="Run one pass and exit (for cron and tests).")
def dispatch(interval: float, once: bool) -> None:
    """Publish the outbox and re-queue runs with expired leases, until SIGTERM."""
    from shared.celery import broker_depths, make_celery

    settings = get_settings()
    app = make_celery(settings)

    def depths(queues: Sequence[str]) -> Mapping[str, int | None]:
        return broker_depths(settings, queues)[0]

    engine = make_engine(settings.database_url)
    publish = celery_publisher(app)
    stopping = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("dispatch: got %s, stopping after this pass", signal.Signals(signum).name)
        stopping.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stopping.is_set():
            try:
                published, rescued = dispatch_pass(
                    engine, publish, lost_after_s=settings.worker_lost_after_s, depths=depths
                )
            except BackendUnavailable:
                # The database is down: keep the loop alive, it is retried next pass.
                logger.warning("dispatch: database unavailable", exc_info=True)
            else:
                if published or rescued:
                    logger.info("dispatch: published %d, re-queued %d", published, rescued)
            if once:
                break
            stopping.wait(interval)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.dispose()
        app.close()
