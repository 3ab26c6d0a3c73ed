"""The Celery task that trains one run: claim, supervise the trainer process, release.

The task body does no training itself. A prefork pool process is daemonic and
cannot start the multiprocessing that torch needs, so the trainer
(``python -m workers.run_job EXPERIMENT_ID --worker-id WORKER_ID``) runs as a
child process group supervised by :func:`workers.supervise.supervise`.

Delivery is at least once (late acks, redelivery after a lost worker), so the
task is idempotent through the lease: a message for a run that is already
claimed, finished or being cancelled finds :func:`shared.runs.claim_run`
returning ``None`` and is acked without doing anything.

``FITFLEET_WORKER_CHILD_COMMAND`` (a JSON list) replaces the trainer command,
for tests and debugging; the experiment id and ``--worker-id ID`` are still
appended, so a stand-in sees the same arguments as ``run_job``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from celery import shared_task
from pydantic import ValidationError
from sqlalchemy import Engine

from shared.db.models import ExperimentState
from shared.db.session import make_engine, session_scope
from shared.runs import TRAIN_TASK, claim_run, release_run
from shared.settings import Settings, get_settings
from shared.spec import Resources
from workers.supervise import Outcome, supervise

logger = logging.getLogger(__name__)

#: Used when a stored spec has no readable ``resources.timeout`` (the spec's default).
DEFAULT_TIMEOUT_S = 6 * 3600.0


def worker_id() -> str:
    """``host:pid``: unique per pool process, and says where to look when a run misbehaves."""
    return f"{socket.gethostname()}:{os.getpid()}"


@lru_cache(maxsize=4)
def _engine(url: str) -> Engine:
    # One engine (and pool) per pool process, created on first use, i.e. after
    # the prefork fork: connections must never be shared across processes.
    return make_engine(url)


def child_command(settings: Settings, experiment_id: str, worker: str) -> list[str]:
    """The trainer's command line: ``run_job`` unless ``worker_child_command`` overrides it."""
    base = list(settings.worker_child_command) or [sys.executable, "-m", "workers.run_job"]
    return [*base, experiment_id, "--worker-id", worker]


def timeout_seconds(spec: dict[str, Any]) -> float:
    """``resources.timeout`` of a stored spec in seconds, or the default if unreadable.

    Stored specs were validated at submission; a row that no longer parses must
    still be trained under *some* limit rather than crash the task.
    """
    resources = spec.get("resources")
    try:
        return Resources.model_validate(
            resources if isinstance(resources, dict) else {}
        ).timeout_seconds
    except ValidationError:
        logger.warning("unreadable resources.timeout %r; using the default", resources)
        return DEFAULT_TIMEOUT_S


def train_run(experiment_id: str) -> None:
    """Train run ``experiment_id`` if this worker wins its lease; see the module docstring."""
    settings = get_settings()
    engine = _engine(settings.database_url)
    worker = worker_id()
    with session_scope(engine) as session:
        claim = claim_run(
            session,
            experiment_id=experiment_id,
            worker_id=worker,
            ttl_s=settings.worker_lease_ttl_s,
            now=datetime.now(UTC),
        )
    if claim is None:
        logger.info("run %s already claimed or finished; not training it", experiment_id)
        return
    logger.info("run %s: attempt %d claimed by %s", experiment_id, claim.attempt, worker)
    try:
        outcome = supervise(
            child_command(settings, experiment_id, worker),
            experiment_id=experiment_id,
            worker_id=worker,
            engine=engine,
            timeout_s=timeout_seconds(claim.spec),
            lease_ttl_s=settings.worker_lease_ttl_s,
            poll_s=settings.worker_poll_s,
            grace_s=settings.worker_grace_s,
        )
    except OSError as exc:  # the trainer could not even start: a broken install, not the run
        outcome = Outcome(ExperimentState.FAILED, f"could not start the trainer: {exc}", -1, 0)
    if outcome.lease_lost:
        logger.warning("run %s: lease lost; another worker owns it now", experiment_id)
        return
    assert outcome.state is not None
    with session_scope(engine) as session:
        released = release_run(
            session,
            experiment_id=experiment_id,
            worker_id=worker,
            state=outcome.state,
            error=outcome.error,
            now=datetime.now(UTC),
        )
    if released:
        logger.info("run %s: %s", experiment_id, outcome.state.value)
    else:
        logger.warning("run %s: lease lost before release; outcome dropped", experiment_id)


#: The registered task (``workers.train_run``). ``shared_task`` binds it to whichever
#: app the process uses (``workers.celery_entry.app`` in a worker), so importing this
#: module builds no app and reads no settings.
train_run_task: Any = shared_task(name=TRAIN_TASK, ignore_result=True, acks_late=True)(train_run)
