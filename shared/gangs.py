"""Multi-node runs: an all-or-nothing gang of workers, and the lease the gang shares.

Celery has no gang placement, so the database does it (see the pitfalls
reference). For a run with ``resources.nodes`` = M the dispatcher
(:func:`reserve_gang`, called by :func:`shared.dispatch.relay_outbox`) picks M
idle live workers of the run's queue, each with enough GPUs, or none at all:
the run then stays queued and ``GET /v1/admin/queues`` says why. A gang gets an
id, one rendezvous endpoint (torchrun's c10d store on node 0), and one message
per node on that worker's own queue (:func:`node_queue`).

The gang id is the run's lease owner from the moment it is placed: every node
joins the run under it (:func:`join_gang`: the first join moves the run to
running and counts the attempt), every node's supervisor renews it, rank 0
reports under it, and the run ends through :func:`shared.runs.release_run`
with it. A node that never joins fails torchrun's rendezvous on the others,
and a node lost mid-run breaks the others' collectives; either way a surviving
node calls :func:`requeue_gang_run` and the run goes back to the queue, to
resume from its last checkpoint on a fresh gang. If no node survives, the lease
expires and :func:`shared.runs.requeue_expired` does the same.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.db.base import UtcDateTime
from shared.db.models import (
    ExperimentState,
    SqlEvent,
    SqlExperiment,
    SqlWorker,
    WorkerState,
)
from shared.fleet import live_workers, resources_of
from shared.runs import SYSTEM_ACTOR, Claim, max_restarts, train_message

#: The Celery task one node of a gang runs (the dispatcher<->worker contract).
GANG_TASK = "workers.train_node"

#: Each worker also consumes ``fitfleet.node.<worker id>``: the gang's messages
#: must reach exactly the workers that were reserved.
NODE_QUEUE_PREFIX = "fitfleet.node."

#: Rendezvous ports are drawn from here (per gang, so a retry gets a new one).
PORT_BASE = 29500
PORT_SPAN = 2500

_ = UtcDateTime  # the lease columns are UtcDateTime: aware datetimes only


def node_queue(worker_id: str) -> str:
    """The queue only ``worker_id`` consumes (its name made safe for any broker)."""
    return NODE_QUEUE_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "_", worker_id)


def rendezvous_port(gang_id: str) -> int:
    """A port for the gang's c10d store, stable for the gang, spread across gangs."""
    digest = int(hashlib.sha256(gang_id.encode()).hexdigest()[:8], 16)
    return PORT_BASE + digest % PORT_SPAN


@dataclass(frozen=True)
class GangNode:
    """One reserved worker: its node rank and the queue that reaches it."""

    worker_id: str
    node_rank: int
    queue: str


@dataclass(frozen=True)
class Gang:
    """A placed multi-node run: who trains it, where they meet, and for how long they may wait."""

    gang_id: str
    experiment_id: str
    gpus: int
    nodes: list[GangNode]
    endpoint: str
    join_timeout_s: float

    def payload(self, node: GangNode) -> dict[str, Any]:
        """The ``workers.train_node`` keyword arguments for ``node``."""
        return {
            "experiment_id": self.experiment_id,
            "gang_id": self.gang_id,
            "node_rank": node.node_rank,
            "nnodes": len(self.nodes),
            "gpus": self.gpus,
            "endpoint": self.endpoint,
            "join_timeout_s": self.join_timeout_s,
        }


def needs_gang(spec: dict[str, Any]) -> bool:
    """Whether a stored spec asks for more than one node."""
    return resources_of(spec)[1] > 1


def reserve_gang(
    session: Session,
    run: SqlExperiment,
    *,
    now: datetime,
    lost_after_s: float,
    join_timeout_s: float,
) -> Gang | None:
    """Reserve ``resources.nodes`` idle workers for ``run``, all or none; ``None`` if none.

    The workers are marked busy with the run (so no other gang takes them) and
    the run becomes ``dispatched`` with the gang id as its lease owner, leased
    for the join timeout plus a margin: a gang that never forms is re-queued by
    :func:`shared.runs.requeue_expired`. Runs in the caller's transaction;
    publish the node messages only after it commits.
    """
    gpus, nodes = resources_of(run.spec)
    idle = sorted(
        (
            w
            for w in live_workers(session, run.queue, now=now, lost_after_s=lost_after_s)
            if w.state is WorkerState.IDLE and w.current_experiment_id is None and w.gpus >= gpus
        ),
        key=lambda w: w.id,
    )
    if len(idle) < nodes:
        return None
    # Lock the chosen rows (SKIP LOCKED: a concurrent dispatcher may hold some).
    locked = list(
        session.scalars(
            select(SqlWorker.id)
            .where(
                SqlWorker.id.in_([w.id for w in idle]),
                SqlWorker.state == WorkerState.IDLE,
                SqlWorker.current_experiment_id.is_(None),
            )
            .order_by(SqlWorker.id)
            .with_for_update(skip_locked=True)
        )
    )
    if len(locked) < nodes:
        return None
    chosen = [w for w in idle if w.id in set(locked[:nodes])]
    session.execute(
        update(SqlWorker)
        .where(SqlWorker.id.in_([w.id for w in chosen]))
        .values(state=WorkerState.BUSY, current_experiment_id=run.id)
    )
    gang_id = f"gang-{run.id}-{run.attempt + 1}-{secrets.token_hex(3)}"
    gang = Gang(
        gang_id=gang_id,
        experiment_id=run.id,
        gpus=gpus,
        nodes=[GangNode(w.id, rank, node_queue(w.id)) for rank, w in enumerate(chosen)],
        endpoint=f"{chosen[0].hostname}:{rendezvous_port(gang_id)}",
        join_timeout_s=join_timeout_s,
    )
    run.state = ExperimentState.DISPATCHED
    run.lease_owner = gang_id
    run.lease_expires_at = now + timedelta(seconds=join_timeout_s + 60)
    run.updated_at = now
    session.add(
        SqlEvent(
            experiment_id=run.id,
            kind="placed",
            message=f"placed on {', '.join(w.id for w in chosen)}; rendezvous at {gang.endpoint}",
            data={"gang": gang_id, "workers": [w.id for w in chosen], "endpoint": gang.endpoint},
            actor=SYSTEM_ACTOR,
            created_at=now,
        )
    )
    return gang


def join_gang(
    session: Session, *, experiment_id: str, gang_id: str, ttl_s: float, now: datetime
) -> Claim | None:
    """Join run ``experiment_id`` as a node of ``gang_id``; ``None`` if the gang is not its owner.

    The first node to join moves the run to ``running`` and counts the attempt;
    the others find it running under the same gang and only extend the lease.
    A cancelled run, a run re-queued after this gang failed, or another gang's
    run are refused.
    """
    run = session.scalars(
        select(SqlExperiment).where(SqlExperiment.id == experiment_id).with_for_update()
    ).first()
    if (
        run is None
        or run.cancel_requested
        or run.lease_owner != gang_id
        or run.state not in (ExperimentState.DISPATCHED, ExperimentState.RUNNING)
    ):
        return None
    first = run.state is ExperimentState.DISPATCHED
    run.lease_expires_at = now + timedelta(seconds=ttl_s)
    run.updated_at = now
    if first:
        run.state = ExperimentState.RUNNING
        run.attempt += 1
        run.started_at = run.started_at or now
        session.add(
            SqlEvent(
                experiment_id=experiment_id,
                kind="resumed" if run.attempt > 1 else "started",
                message=f"attempt {run.attempt} started by gang {gang_id}",
                data={"attempt": run.attempt, "gang": gang_id},
                actor=gang_id,
                created_at=now,
            )
        )
    session.flush()
    return Claim(
        experiment_id=experiment_id,
        worker_id=gang_id,
        attempt=run.attempt,
        spec=dict(run.spec),
        lease_expires_at=run.lease_expires_at,
    )


def requeue_gang_run(
    session: Session, *, experiment_id: str, gang_id: str, reason: str, now: datetime
) -> bool:
    """Put a run whose gang broke back in the queue (or fail it past ``max_restarts``).

    Only while ``gang_id`` still owns it: of the surviving nodes, the first one
    acts and the others find nothing to do. The next attempt resumes from the
    last checkpoint in the store. Returns whether this call changed the run.
    """
    run = session.scalars(
        select(SqlExperiment).where(SqlExperiment.id == experiment_id).with_for_update()
    ).first()
    if (
        run is None
        or run.lease_owner != gang_id
        or run.state not in (ExperimentState.DISPATCHED, ExperimentState.RUNNING)
    ):
        return False
    run.lease_owner = None
    run.lease_expires_at = None
    run.updated_at = now
    if run.cancel_requested:
        run.state = ExperimentState.CANCELLED
        run.finished_at = now
        kind, message = "cancelled", f"cancelled after its gang broke: {reason}"
    elif run.attempt > (limit := max_restarts(run.spec)):
        run.state = ExperimentState.FAILED
        run.finished_at = now
        run.error = f"{reason}; {run.attempt} attempts (max_restarts {limit})"
        kind, message = "failed", run.error
    else:
        run.state = ExperimentState.QUEUED
        session.add(train_message(run, now=now))
        kind, message = "requeued", f"attempt {run.attempt}: {reason}; queued again"
    session.add(
        SqlEvent(
            experiment_id=experiment_id,
            kind=kind,
            message=message,
            data={"gang": gang_id, "attempt": run.attempt},
            actor=gang_id,
            created_at=now,
        )
    )
    session.flush()
    return True
