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
import time
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import shared_task
from pydantic import ValidationError
from sqlalchemy import Engine

from shared.db.models import ExperimentState
from shared.db.session import make_engine, session_scope
from shared.gangs import GANG_TASK, join_gang, requeue_gang_run
from shared.runs import TRAIN_TASK, Claim, claim_run, release_run
from shared.settings import Settings, get_settings
from shared.spec import Resources
from workers.heartbeat import mark_busy, mark_idle
from workers.supervise import EXIT_PEER_LOST, Outcome, supervise
from workers.training.launch import EXIT_FILE_ENV, torchrun_command

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


def child_command(
    settings: Settings, experiment_id: str, worker: str, spec: dict[str, Any] | None = None
) -> list[str]:
    """The trainer's command line: ``run_job``, under torchrun for ``resources.gpus`` >= 2.

    ``worker_child_command`` replaces it whole (tests, debugging).
    """
    if settings.worker_child_command:
        return [*settings.worker_child_command, experiment_id, "--worker-id", worker]
    module = ["workers.run_job", experiment_id, "--worker-id", worker]
    ranks = ranks_per_node(spec or {})
    if ranks >= 2:
        return torchrun_command(ranks, module)
    return [sys.executable, "-m", *module]


def ranks_per_node(spec: dict[str, Any]) -> int:
    """DDP processes per node: ``resources.gpus`` (at least 1; 0 means one CPU process)."""
    resources = spec.get("resources")
    gpus = resources.get("gpus", 1) if isinstance(resources, dict) else 1
    return max(1, gpus) if isinstance(gpus, int) and not isinstance(gpus, bool) else 1


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


def _supervise(
    settings: Settings,
    engine: Engine,
    command: list[str],
    *,
    experiment_id: str,
    lease_owner: str,
    spec: dict[str, Any],
    exit_file: Path,
) -> Outcome:
    """Supervise ``command`` under the run's lease, with a fresh exit file for rank 0's code.

    A command that cannot even start (a broken install, not the run) fails the run.
    """
    exit_file.parent.mkdir(parents=True, exist_ok=True)
    exit_file.unlink(missing_ok=True)
    try:
        return supervise(
            command,
            experiment_id=experiment_id,
            worker_id=lease_owner,
            engine=engine,
            timeout_s=timeout_seconds(spec),
            lease_ttl_s=settings.worker_lease_ttl_s,
            poll_s=settings.worker_poll_s,
            grace_s=settings.worker_grace_s,
            env={**os.environ, EXIT_FILE_ENV: str(exit_file)},
            exit_file=exit_file,
        )
    except OSError as exc:
        return Outcome(ExperimentState.FAILED, f"could not start the trainer: {exc}", -1, 0)


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
    # The fleet view (GET /v1/admin/workers) shows what this worker runs; never fatal.
    mark_busy(engine, experiment_id, settings)
    try:
        _supervise_and_release(settings, engine, experiment_id, worker, claim.spec)
    finally:
        mark_idle(engine, experiment_id, settings)


def _supervise_and_release(
    settings: Settings, engine: Engine, experiment_id: str, worker: str, spec: dict[str, Any]
) -> None:
    """Supervise the trainer of a claimed run and release the run with its outcome.

    Split from :func:`train_run` so the fleet row goes back to idle (its
    ``finally``) however this ends.
    """
    exit_file = settings.home / "work" / f".{experiment_id}.exit"
    outcome = _supervise(
        settings,
        engine,
        child_command(settings, experiment_id, worker, spec),
        experiment_id=experiment_id,
        lease_owner=worker,
        spec=spec,
        exit_file=exit_file,
    )
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


#: How long a node waits for the dispatcher's reservation to become visible: the
#: node's message may arrive before the transaction that placed the gang commits.
JOIN_WAIT_S = 15.0


def train_node(
    experiment_id: str,
    gang_id: str,
    node_rank: int,
    nnodes: int,
    gpus: int,
    endpoint: str,
    join_timeout_s: float,
) -> None:
    """Be node ``node_rank`` of ``nnodes`` for a multi-node run (see :mod:`shared.gangs`).

    Joins the run under the gang's lease, runs torchrun with the gang's c10d
    rendezvous and supervises it like :func:`train_run`. Node 0 releases the
    run with its outcome; any node that finds the gang broken (a node never
    joined, or a peer vanished: exit 75, or torchrun failing before rank code
    ran) puts the run back in the queue, to resume from its last checkpoint.
    """
    settings = get_settings()
    engine = _engine(settings.database_url)
    claim = _join(engine, settings, experiment_id, gang_id)
    if claim is None:
        logger.info("run %s: gang %s is no longer its owner; not joining", experiment_id, gang_id)
        mark_idle(engine, experiment_id, settings)  # the reservation marked us busy
        return
    logger.info("run %s: node %d/%d of %s", experiment_id, node_rank, nnodes, gang_id)
    mark_busy(engine, experiment_id, settings)
    try:
        _supervise_node(
            settings,
            engine,
            claim.spec,
            experiment_id=experiment_id,
            gang_id=gang_id,
            node_rank=node_rank,
            nnodes=nnodes,
            gpus=gpus,
            endpoint=endpoint,
            join_timeout_s=join_timeout_s,
        )
    finally:
        mark_idle(engine, experiment_id, settings)


def _join(engine: Engine, settings: Settings, experiment_id: str, gang_id: str) -> Claim | None:
    deadline = time.monotonic() + JOIN_WAIT_S
    while True:
        with session_scope(engine) as session:
            claim = join_gang(
                session,
                experiment_id=experiment_id,
                gang_id=gang_id,
                ttl_s=settings.worker_lease_ttl_s,
                now=datetime.now(UTC),
            )
        if claim is not None or time.monotonic() > deadline:
            return claim
        time.sleep(0.2)


def _supervise_node(
    settings: Settings,
    engine: Engine,
    spec: dict[str, Any],
    *,
    experiment_id: str,
    gang_id: str,
    node_rank: int,
    nnodes: int,
    gpus: int,
    endpoint: str,
    join_timeout_s: float,
) -> None:
    exit_file = settings.home / "work" / f".{experiment_id}.node{node_rank}.exit"
    command = torchrun_command(
        max(1, gpus),
        ["workers.run_job", experiment_id, "--worker-id", gang_id],
        nnodes=nnodes,
        rdzv_endpoint=endpoint,
        rdzv_id=gang_id,
        join_timeout_s=join_timeout_s,
        is_host=node_rank == 0,
    )
    outcome = _supervise(
        settings,
        engine,
        command,
        experiment_id=experiment_id,
        lease_owner=gang_id,
        spec=spec,
        exit_file=exit_file,
    )
    if outcome.lease_lost:
        logger.warning("run %s: gang %s lost its lease", experiment_id, gang_id)
        return
    assert outcome.state is not None
    ranks_ran = exit_file.exists()
    broken = not outcome.stopped and (
        outcome.exit_code == EXIT_PEER_LOST or (not ranks_ran and outcome.exit_code != 0)
    )
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        if broken:
            reason = (
                f"node {node_rank} lost a peer"
                if ranks_ran
                else f"the gang did not form: a node did not join within {join_timeout_s:g} s"
            )
            if requeue_gang_run(
                session, experiment_id=experiment_id, gang_id=gang_id, reason=reason, now=now
            ):
                logger.warning("run %s: %s; queued again", experiment_id, reason)
        elif node_rank == 0 or outcome.stopped:
            release_run(
                session,
                experiment_id=experiment_id,
                worker_id=gang_id,
                state=outcome.state,
                error=outcome.error,
                now=now,
            )


train_node_task: Any = shared_task(name=GANG_TASK, ignore_result=True, acks_late=True)(train_node)


#: The registered task (``workers.train_run``). ``shared_task`` binds it to whichever
#: app the process uses (``workers.celery_entry.app`` in a worker), so importing this
#: module builds no app and reads no settings.
train_run_task: Any = shared_task(name=TRAIN_TASK, ignore_result=True, acks_late=True)(train_run)
