"""``/v1/admin``: the fleet (workers and their state) and the queues (depths, why runs wait).

Admin tokens only: these views span every project. A project token is known
(so it gets 403, not 401) but may not look. The work lives in
:mod:`shared.fleet`; broker depths are read here, through kombu, with the
worker's own transport options (the same way ``/readyz`` checks the broker).
A broker that does not answer leaves ``broker_depth`` null and says why in
``broker_error``: the database half of the answer is still worth having.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends

from services.api.auth import Caller
from services.api.deps import CallerDep, EngineDep, SettingsDep
from services.api.errors import Forbidden
from services.api.schemas import QueueList, QueueRead, WorkerList, WorkerRead
from shared import fleet
from shared.celery import broker_depths
from shared.db.session import session_scope

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin", tags=["admin"])


async def require_admin(caller: CallerDep) -> Caller:
    """The caller, if it holds an admin token; a 403 naming what is needed otherwise."""
    if not caller.is_admin:
        raise Forbidden("admin token required: the fleet and queue views span every project")
    return caller


AdminDep = Annotated[Caller, Depends(require_admin)]


@router.get("/workers", response_model=WorkerList)
def list_workers(_admin: AdminDep, engine: EngineDep, settings: SettingsDep) -> WorkerList:
    """Every worker, live ones first: hardware, versions, state (lost when silent), current run."""
    now = datetime.now(UTC)
    lost_after = settings.worker_lost_after_s
    with session_scope(engine) as session:
        views = fleet.list_workers(session, now=now, lost_after_s=lost_after)
    return WorkerList(
        workers=[WorkerRead.model_validate({**asdict(v), "state": v.state.value}) for v in views],
        lost_after_s=lost_after,
    )


@router.get("/queues", response_model=QueueList)
def list_queues(_admin: AdminDep, engine: EngineDep, settings: SettingsDep) -> QueueList:
    """Every queue: database and broker depths, oldest waiting run, why each waiting run waits."""
    with session_scope(engine) as session:
        names = fleet.known_queues(session)
    # The broker is asked outside any transaction: a slow broker must not hold one open.
    depths, broker_error = broker_depths(settings, names)
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        statuses = fleet.queue_status(
            session, broker_depths=depths, now=now, lost_after_s=settings.worker_lost_after_s
        )
    return QueueList(
        queues=[QueueRead.model_validate(asdict(s)) for s in statuses], broker_error=broker_error
    )
