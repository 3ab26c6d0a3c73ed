"""``/v1/sweeps``: expand a spec over grid or random choices into one experiment per trial."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from services.api import crud, sweeps
from services.api.deps import CallerDep, ContextDep, EngineDep
from services.api.publisher import NewRun
from services.api.queries import MAX_OFFSET
from services.api.schemas import SweepCreate, SweepList, SweepRead

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])


@router.post("", status_code=201, response_model=SweepRead)
async def create_sweep(body: SweepCreate, caller: CallerDep, context: ContextDep) -> SweepRead:
    """Create a sweep and queue its trials; all or nothing (a 422 names the bad trial and field)."""
    context.limiter.take(caller.token_id)
    trials = sweeps.expand(body, default_project=caller.project)
    crud.check_source(trials[0].spec.data.source, context.settings.data_roots)
    created = await run_in_threadpool(
        lambda: sweeps.create(engine=context.engine, caller=caller, request=body, trials=trials)
    )
    if context.publisher is not None:
        for trial, recorded in zip(trials, created.trials, strict=True):
            resources = trial.spec.resources
            context.publisher.notify(
                NewRun(
                    id=recorded.experiment_id,
                    queue=resources.queue,
                    priority=resources.priority,
                    gpus=resources.gpus,
                    nodes=resources.nodes,
                )
            )
    return created


@router.get("", response_model=SweepList)
def list_sweeps(
    caller: CallerDep,
    engine: EngineDep,
    project: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> SweepList:
    """Sweeps the caller may see, newest first."""
    return sweeps.list_sweeps(
        engine=engine, caller=caller, project=project, limit=limit, offset=offset
    )


@router.get("/{sweep_id}", response_model=SweepRead)
def get_sweep(sweep_id: str, caller: CallerDep, engine: EngineDep) -> SweepRead:
    """One sweep: its choices, each trial's run and values, and its runs' states."""
    return sweeps.get(engine=engine, caller=caller, sweep_id=sweep_id)
