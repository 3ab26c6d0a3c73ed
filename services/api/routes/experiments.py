"""``/v1/experiments``: submit a spec, list and read runs, their metrics and artifacts, cancel.

Every route needs a bearer token (:data:`services.api.deps.CallerDep`); the
database work lives in :mod:`services.api.crud`.
"""

from __future__ import annotations

import json
import mimetypes
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from services.api import crud, queries
from services.api.deps import CallerDep, ContextDep, EngineDep
from services.api.errors import UnsupportedMediaType
from services.api.publisher import NewRun
from services.api.queries import MAX_OFFSET
from services.api.schemas import (
    ArtifactList,
    Comparison,
    EpochMetricRead,
    ExperimentCreated,
    ExperimentList,
    ExperimentRead,
    ExperimentSummary,
    LrFindRead,
)
from shared.db.models import ExperimentState
from shared.errors import FieldProblem, InvalidSpec
from shared.spec_io import parse_spec_text, validate_spec

router = APIRouter(prefix="/v1/experiments", tags=["experiments"])

YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})
JSON_TYPES = frozenset({"application/json", ""})

PRESIGNED_SECONDS = 300  # download links live for minutes, never longer

_SPEC_HINT = "an experiment spec, version 1; its JSON Schema is served at /v1/spec/schema"

# The body is read raw (JSON or YAML), so its shape is declared here for /docs.
_SUBMIT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object", "description": _SPEC_HINT}},
            "application/yaml": {"schema": {"type": "string", "description": _SPEC_HINT}},
        },
    }
}


def _document(raw: bytes, content_type: str) -> dict[str, Any]:
    """The spec mapping from a JSON or YAML body; InvalidSpec names ``body`` when unreadable."""
    media = content_type.split(";", 1)[0].strip().lower()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidSpec([FieldProblem("body", "the body is not UTF-8 text")]) from exc
    if media in YAML_TYPES:
        return parse_spec_text(text, source="body")
    if media not in JSON_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {media!r} is not accepted: send application/json or application/yaml"
        )
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidSpec([FieldProblem("body", f"not valid JSON: {exc}")]) from exc
    if not isinstance(document, dict):
        raise InvalidSpec([FieldProblem("body", "the spec must be a JSON object")])
    return document


@router.post(
    "",
    status_code=201,
    response_model=ExperimentCreated,
    openapi_extra=_SUBMIT_BODY,
    responses={200: {"description": "an earlier submission with the same Idempotency-Key"}},
)
async def submit_experiment(
    request: Request,
    response: Response,
    caller: CallerDep,
    context: ContextDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> ExperimentCreated:
    """Queue a run from a spec (JSON, or YAML with a YAML Content-Type).

    A 422 lists every field problem; nothing is queued then. Without a
    ``project`` the spec goes into the token's project. A token submitting
    faster than ``FITFLEET_SUBMIT_RATE_PER_S`` gets 429 with Retry-After.
    """
    context.limiter.take(caller.token_id)
    document = _document(await request.body(), request.headers.get("content-type", ""))
    if "project" not in document and caller.project is not None:
        document["project"] = caller.project
    spec = validate_spec(document)
    crud.check_source(spec.data.source, context.settings.data_roots)
    outcome = await run_in_threadpool(
        lambda: crud.submit(
            engine=context.engine, caller=caller, spec=spec, idempotency_key=idempotency_key
        )
    )
    if not outcome.created:
        response.status_code = 200
    elif context.publisher is not None:
        # The client has its id at once; the run's message follows within
        # milliseconds, batched with other new runs (and the relay is the
        # safety net should that publish fail).
        context.publisher.notify(
            NewRun(
                id=outcome.experiment.id,
                queue=spec.resources.queue,
                priority=spec.resources.priority,
                gpus=spec.resources.gpus,
                nodes=spec.resources.nodes,
            )
        )
    return outcome.experiment


@router.get("", response_model=ExperimentList)
def list_experiments(
    caller: CallerDep,
    engine: EngineDep,
    state: ExperimentState | None = None,
    project: Annotated[str | None, Query(max_length=64)] = None,
    tag: str | None = None,
    name: Annotated[str | None, Query(description="substring, case-insensitive")] = None,
    arch: str | None = None,
    dataset: str | None = None,
    limit: Annotated[int, Query(ge=1, le=crud.MAX_PAGE)] = crud.DEFAULT_PAGE,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> ExperimentList:
    """Runs the caller may see, newest first; ``count`` is the total matching."""
    return crud.list_experiments(
        engine=engine,
        caller=caller,
        state=state,
        project=project,
        tag=tag,
        name=name,
        arch=arch,
        dataset=dataset,
        limit=limit,
        offset=offset,
    )


@router.get("/{experiment_id}", response_model=ExperimentRead)
def get_experiment(experiment_id: str, caller: CallerDep, context: ContextDep) -> ExperimentRead:
    """One run: state, attempt, current stage and epoch, latest metrics, error, spec.

    A queued run the live fleet cannot place now says why in ``waiting_reason``.
    """
    return crud.get_experiment(
        engine=context.engine,
        caller=caller,
        experiment_id=experiment_id,
        lost_after_s=context.settings.worker_lost_after_s,
    )


@router.get(
    "/{experiment_id}/metrics",
    response_model=list[EpochMetricRead],
    responses={200: {"content": {"text/csv": {}}}},
)
def get_metrics(
    experiment_id: str,
    caller: CallerDep,
    engine: EngineDep,
    format: Annotated[str | None, Query(pattern="^(json|csv)$")] = None,
    accept: Annotated[str | None, Header()] = None,
) -> Any:
    """The epoch table as JSON, or CSV with ``?format=csv`` or ``Accept: text/csv``."""
    rows = crud.list_metrics(engine=engine, caller=caller, experiment_id=experiment_id)
    wants_csv = format == "csv" or (format is None and "text/csv" in (accept or ""))
    if wants_csv:
        return PlainTextResponse(
            crud.metrics_csv(rows),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{experiment_id}-metrics.csv"'},
        )
    return rows


@router.post("/{experiment_id}/cancel", response_model=ExperimentSummary)
def cancel_experiment(
    experiment_id: str, caller: CallerDep, engine: EngineDep
) -> ExperimentSummary:
    """Cancel now (queued) or ask the worker to stop (running); 409 once it has ended."""
    return crud.cancel(engine=engine, caller=caller, experiment_id=experiment_id)


@router.get("/{experiment_id}/artifacts", response_model=ArtifactList)
def list_artifacts(experiment_id: str, caller: CallerDep, engine: EngineDep) -> ArtifactList:
    """Every file the run produced (checkpoints, plots, report) and its URI."""
    return crud.list_artifacts(engine=engine, caller=caller, experiment_id=experiment_id)


@router.get("/{experiment_id}/lr-find", response_model=LrFindRead)
def lr_find(experiment_id: str, caller: CallerDep, engine: EngineDep) -> LrFindRead:
    """Each stage's LR-finder curve (lr, smoothed loss) and its suggestion."""
    return crud.lr_find_curves(engine=engine, caller=caller, experiment_id=experiment_id)


compare_router = APIRouter(prefix="/v1/compare", tags=["compare"])


@compare_router.get("", response_model=Comparison)
def compare(
    caller: CallerDep,
    engine: EngineDep,
    ids: Annotated[str | None, Query(description="2 to 20 experiment ids, comma-separated")] = None,
    sweep: Annotated[
        str | None, Query(max_length=40, description="or a sweep: its 20 best runs")
    ] = None,
) -> Comparison:
    """Runs side by side: only the spec fields that differ, final and best metrics, curves."""
    if sweep is not None and ids is None:
        wanted = queries.sweep_run_ids(
            engine=engine, caller=caller, sweep_id=sweep, limit=crud.MAX_COMPARED
        )
    else:
        wanted = [part.strip() for part in (ids or "").split(",") if part.strip()]
    return crud.compare(engine=engine, caller=caller, ids=wanted)


@router.get("/{experiment_id}/artifacts/{name:path}")
def download_artifact(
    experiment_id: str, name: str, caller: CallerDep, engine: EngineDep, context: ContextDep
) -> Response:
    """One file: a redirect to a presigned URL (S3, minutes) or the bytes (file store)."""
    key = crud.artifact_key(engine=engine, caller=caller, experiment_id=experiment_id, name=name)
    url = context.store.url_for(key, expires_s=PRESIGNED_SECONDS)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    filename = PurePosixPath(name).name
    return Response(
        context.store.get_bytes(key),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/{experiment_id}/interpretation")
def interpretation(
    experiment_id: str, caller: CallerDep, engine: EngineDep, context: ContextDep
) -> dict[str, Any]:
    """Top losses, confusion matrix, most_confused and the findings, from report.json."""
    key = crud.artifact_key(
        engine=engine, caller=caller, experiment_id=experiment_id, name="report.json"
    )
    report = json.loads(context.store.get_bytes(key))
    return {
        "status": report.get("status"),
        "classes": report.get("classes", []),
        "interpretation": report.get("interpretation"),
        "findings": report.get("findings", []),
    }
