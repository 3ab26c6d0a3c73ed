"""The comparison queries behind the dashboard, CLI and SDK: runs, leaderboards, failures.

Thin: parse, call :mod:`services.api.queries`, answer; docs/queries.md lists
them. Every route is read-only, so the dashboard's session cookie works here.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from services.api import queries
from services.api.deps import CallerDep, EngineDep
from services.api.schemas import (
    CallerRead,
    DatasetList,
    EventList,
    FailureList,
    Leaderboard,
    RunPage,
)
from shared.db.models import ExperimentState

router = APIRouter(prefix="/v1", tags=["queries"])

_SORT_HELP = (
    "created (newest first), name, state, best:<metric> or final:<metric> "
    "(best value first); a leading '-' reverses"
)


@router.get("/runs", response_model=RunPage)
def list_runs(
    caller: CallerDep,
    engine: EngineDep,
    state: ExperimentState | None = None,
    project: Annotated[str | None, Query(max_length=64)] = None,
    tag: Annotated[str | None, Query(max_length=200)] = None,
    name: Annotated[str | None, Query(max_length=200, description="substring, any case")] = None,
    arch: Annotated[str | None, Query(max_length=64)] = None,
    dataset: Annotated[str | None, Query(max_length=1024)] = None,
    sweep: Annotated[str | None, Query(max_length=40)] = None,
    sort: Annotated[str, Query(max_length=80, description=_SORT_HELP)] = "created",
    limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = queries.DEFAULT_PAGE,
    offset: Annotated[int, Query(ge=0, le=queries.MAX_OFFSET)] = 0,
) -> RunPage:
    """The runs page: runs with progress and every metric's final and best, sorted by any."""
    filters = queries.RunFilters(
        state=state, project=project, tag=tag, name=name, arch=arch, dataset=dataset, sweep=sweep
    )
    return queries.list_runs(
        engine=engine, caller=caller, filters=filters, sort=sort, limit=limit, offset=offset
    )


@router.get("/leaderboard", response_model=Leaderboard)
def leaderboard(
    caller: CallerDep,
    engine: EngineDep,
    metric: Annotated[str, Query(max_length=64)] = "valid_loss",
    dataset: Annotated[str | None, Query(max_length=1024)] = None,
    sweep: Annotated[str | None, Query(max_length=40)] = None,
    project: Annotated[str | None, Query(max_length=64)] = None,
    state: ExperimentState | None = None,
    limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 20,
) -> Leaderboard:
    """Runs of one dataset (or sweep) ranked by the best ``metric`` value each reached."""
    return queries.leaderboard(
        engine=engine,
        caller=caller,
        metric=metric,
        dataset=dataset,
        sweep=sweep,
        project=project,
        state=state,
        limit=limit,
    )


@router.get("/datasets", response_model=DatasetList)
def datasets(
    caller: CallerDep,
    engine: EngineDep,
    project: Annotated[str | None, Query(max_length=64)] = None,
) -> DatasetList:
    """Datasets the caller's runs used, with run counts and the metrics logged on each."""
    return queries.datasets(engine=engine, caller=caller, project=project)


@router.get("/failures", response_model=FailureList)
def failures(
    caller: CallerDep,
    engine: EngineDep,
    project: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 50,
) -> FailureList:
    """Failed runs grouped by reason (ids, numbers and paths blanked), largest group first."""
    return queries.failures(engine=engine, caller=caller, project=project, limit=limit)


@router.get("/experiments/{experiment_id}/events", response_model=EventList)
def events(
    experiment_id: str,
    caller: CallerDep,
    engine: EngineDep,
    after: Annotated[
        int, Query(ge=0, le=queries.MAX_EVENT_ID, description="the last event id already seen")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=queries.MAX_EVENTS)] = 500,
) -> EventList:
    """A run's timeline, oldest first; pass ``after=last_id`` to follow it."""
    return queries.events(
        engine=engine, caller=caller, experiment_id=experiment_id, after=after, limit=limit
    )


@router.get("/me", response_model=CallerRead)
def me(caller: CallerDep) -> CallerRead:
    """Who this token is: its id, project (None for an admin) and admin flag."""
    return CallerRead(token_id=caller.token_id, project=caller.project, is_admin=caller.is_admin)
