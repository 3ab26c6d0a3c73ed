"""The experiments' database work behind the routes: keyword-only, one transaction each.

Routes stay thin (parse, authorize, answer); everything that touches rows is
here, written against an ``Engine`` so each function owns exactly one
transaction through :func:`shared.db.session.session_scope` and commits before
the route answers.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import (
    ColumnElement,
    Engine,
    Table,
    bindparam,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.orm import Session

from services.api.auth import Caller
from services.api.compare import spec_differences
from services.api.errors import Forbidden
from services.api.queries import has_tag
from services.api.schemas import (
    ArtifactList,
    ArtifactRead,
    ComparedRun,
    Comparison,
    EpochMetricRead,
    ExperimentCreated,
    ExperimentList,
    ExperimentRead,
    ExperimentSummary,
    LrFindRead,
    LrFindStage,
)
from shared.db.base import Base, JsonType, UtcDateTime, utcnow
from shared.db.models import (
    TERMINAL_STATES,
    ExperimentState,
    SqlArtifact,
    SqlEpochMetric,
    SqlEvent,
    SqlExperiment,
    SqlLrFindPoint,
    SqlOutbox,
    SqlProject,
    SqlRunMetric,
    SqlStage,
    new_id,
)
from shared.db.session import session_scope, translate_errors
from shared.db.summaries import stage_order
from shared.dispatch import DEFAULT_LOST_AFTER_S
from shared.errors import Conflict, FieldProblem, InvalidSpec, NotFound
from shared.fleet import placement_for_run
from shared.runs import TRAIN_TASK
from shared.spec import ExperimentSpec
from shared.spec_io import dump_spec
from shared.storage.layout import run_key

#: The Celery task a submission announces through the outbox (the api<->worker contract).

logger = logging.getLogger(__name__)

MAX_PAGE = 200
DEFAULT_PAGE = 50
MAX_COMPARED = 20

#: States a cancel ends at once: no worker holds the run yet.
_CANCEL_NOW = frozenset({ExperimentState.QUEUED, ExperimentState.DISPATCHED})


@dataclass(frozen=True)
class Submitted:
    """A submission's outcome: the run, and whether this call created it."""

    experiment: ExperimentCreated
    created: bool


def spec_hash(document: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a validated spec (sorted keys, no spaces)."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_source(source: str, data_roots: list[Path]) -> None:
    """Refuse a local ``data.source`` outside every data root.

    Relative paths live under the first root; absolute paths and ``file://``
    URLs must resolve (symlinks and ``..`` followed, existence not required:
    the data may be mounted only on workers) inside one of the roots. S3
    sources are the store's business, not the file system's.

    Raises:
        InvalidSpec: naming ``data.source``.
    """
    if source.startswith("s3://"):
        return
    raw = unquote(urlsplit(source).path) if source.startswith("file://") else source
    path = Path(raw)
    if not path.is_absolute():
        path = data_roots[0] / path
    resolved = path.resolve(strict=False)
    if any(resolved.is_relative_to(root.resolve(strict=False)) for root in data_roots):
        return
    roots = ", ".join(str(r) for r in data_roots)
    raise InvalidSpec(
        [
            FieldProblem(
                "data.source",
                f"{source!r} is outside the data roots ({roots}); "
                "put the images under a data root or use an s3:// source",
            )
        ]
    )


def _find_by_key(session: Session, project: str, key: str) -> SqlExperiment | None:
    return session.scalars(
        select(SqlExperiment).where(
            SqlExperiment.project_id == project, SqlExperiment.idempotency_key == key
        )
    ).first()


def _replay(row: SqlExperiment, digest: str) -> Submitted:
    if row.spec_hash != digest:
        raise Conflict(
            "this Idempotency-Key was already used with a different spec; "
            "use a new key for a new experiment"
        )
    return Submitted(ExperimentCreated.model_validate(row), created=False)


def _ensure_project(engine: Engine, project: str) -> None:
    # Its own transaction: two admins submitting into a new project at once
    # both end up with the one row (the loser's Conflict means it exists).
    try:
        with session_scope(engine) as session:
            if session.get(SqlProject, project) is None:
                session.add(SqlProject(id=project))
    except Conflict:
        pass


def _insert_submission(
    engine: Engine,
    run_row: dict[str, Any],
    message_row: dict[str, Any],
    event_row: dict[str, Any],
) -> None:
    """Write a run, its outbox message and its submit event, all or nothing.

    A submission is the API's hottest path and its rows are known up front, so
    no ORM unit of work: on Postgres one statement (data-modifying CTEs) in
    autocommit, so one round trip where three INSERTs and a COMMIT took five;
    elsewhere (SQLite) three INSERTs in one transaction. The statement is
    atomic either way; a duplicate Idempotency-Key raises :class:`Conflict`.
    """
    if engine.dialect.name != "postgresql":
        with session_scope(engine) as session:
            session.execute(insert(_table(SqlExperiment)), [run_row])
            session.execute(insert(_table(SqlOutbox)), [message_row])
            session.execute(insert(_table(SqlEvent)), [event_row])
        return
    params = {
        **{k: v for k, v in run_row.items() if k != "sweep_id"},  # always NULL here
        "state": ExperimentState.QUEUED.value,
        "now": run_row["created_at"],
        "task": message_row["task"],
        "payload": message_row["payload"],
        "message": event_row["message"],
        "data": event_row["data"],
    }
    with translate_errors(), engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(_SUBMIT_SQL, params)


# The Postgres submission as one statement, written out once: built with the
# expression language per request, compiling it cost more than running it.
_SUBMIT_SQL = text(
    """
    WITH new_run AS (
        INSERT INTO experiments (
            id, project_id, name, spec, spec_hash, state, attempt, queue, priority,
            submitted_by, idempotency_key, tags, arch, dataset, created_at, updated_at,
            cancel_requested
        )
        VALUES (
            :id, :project_id, :name, :spec, :spec_hash, :state, 0, :queue, :priority,
            :submitted_by, :idempotency_key, :tags, :arch, :dataset, :now, :now, false
        )
        RETURNING id
    ), new_message AS (
        INSERT INTO outbox (experiment_id, task, queue, priority, payload, created_at, attempts)
        SELECT id, :task, :queue, :priority, :payload, :now, 0 FROM new_run
    )
    INSERT INTO events (experiment_id, kind, message, data, actor, created_at)
    SELECT id, 'submit', :message, :data, :submitted_by, :now FROM new_run
    """
).bindparams(
    bindparam("spec", type_=JsonType),
    bindparam("tags", type_=JsonType),
    bindparam("payload", type_=JsonType),
    bindparam("data", type_=JsonType),
    bindparam("now", type_=UtcDateTime()),
)


def _table(model: type[Base]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def submission_rows(
    *,
    caller: Caller,
    spec: ExperimentSpec,
    document: dict[str, Any],
    digest: str,
    run_id: str,
    now: datetime,
    idempotency_key: str | None = None,
    sweep_id: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The rows one submission writes: the run, its outbox message, its submit event."""
    queue = spec.resources.queue
    run_row = {
        "id": run_id,
        "project_id": spec.project,
        "name": spec.name,
        "spec": document,
        "spec_hash": digest,
        "state": ExperimentState.QUEUED,
        "attempt": 0,
        "queue": queue,
        "priority": spec.resources.priority,
        "submitted_by": caller.token_id,
        "idempotency_key": idempotency_key,
        "tags": list(spec.tags),
        "arch": spec.model.arch,
        "dataset": spec.data.source,
        "created_at": now,
        "updated_at": now,
        "cancel_requested": False,
        "sweep_id": sweep_id,
    }
    message_row = {
        "experiment_id": run_id,
        "task": TRAIN_TASK,
        "queue": queue,
        "priority": spec.resources.priority,
        "payload": {"experiment_id": run_id},
        "created_at": now,
        "attempts": 0,
    }
    event_row = {
        "experiment_id": run_id,
        "kind": "submit",
        "message": f"submitted {spec.name!r} to queue {queue!r}",
        "data": {"idempotency_key": idempotency_key},
        "actor": caller.token_id,
        "created_at": now,
    }
    return run_row, message_row, event_row


def submit(
    *, engine: Engine, caller: Caller, spec: ExperimentSpec, idempotency_key: str | None
) -> Submitted:
    """Queue ``spec``: the run, its outbox message and a submit event, in one transaction.

    With an ``idempotency_key`` a retried submission (same key, same project,
    same spec) returns the first run instead of creating another; concurrent
    retries race on the (project, key) unique constraint and the losers read
    the winner's row.

    Raises:
        Forbidden: a project token submitting into another project.
        Conflict: the key was used before with a different spec.
    """
    if not caller.can_see(spec.project):
        raise Forbidden(
            f"this token belongs to project {caller.project!r} and cannot submit "
            f"into project {spec.project!r}"
        )
    document = dump_spec(spec)
    digest = spec_hash(document)
    # No look-up of the key first: the (project, key) unique constraint decides,
    # and a repeat is read back after the insert fails (one transaction saved
    # on every new submission, the common case).
    if caller.is_admin:
        _ensure_project(engine, spec.project)
    now = utcnow()
    run_id = new_id("exp")
    run_row, message_row, event_row = submission_rows(
        caller=caller,
        spec=spec,
        document=document,
        digest=digest,
        run_id=run_id,
        now=now,
        idempotency_key=idempotency_key,
    )
    try:
        _insert_submission(engine, run_row, message_row, event_row)
        created = ExperimentCreated(
            id=run_id,
            state=ExperimentState.QUEUED.value,
            name=spec.name,
            project=spec.project,
            created_at=now,
        )
    except Conflict:
        if idempotency_key is None:
            raise
        with session_scope(engine) as session:
            existing = _find_by_key(session, spec.project, idempotency_key)
            if existing is None:
                raise
            return _replay(existing, digest)
    return Submitted(created, created=True)


def _visible(session: Session, caller: Caller, experiment_id: str) -> SqlExperiment:
    row = session.get(SqlExperiment, experiment_id)
    # Another project's run is "not found", not "forbidden": its id is not
    # something this caller should be able to confirm.
    if row is None or not caller.can_see(row.project_id):
        raise NotFound(f"no experiment {experiment_id!r}")
    return row


def list_experiments(
    *,
    engine: Engine,
    caller: Caller,
    state: ExperimentState | None = None,
    project: str | None = None,
    tag: str | None = None,
    name: str | None = None,
    arch: str | None = None,
    dataset: str | None = None,
    limit: int = DEFAULT_PAGE,
    offset: int = 0,
) -> ExperimentList:
    """A page of the runs the caller may see, newest first, and the total that match.

    A project token always sees its own project only (a ``project`` filter
    naming another one yields nothing); an admin sees every project unless it
    filters.
    """
    conditions: list[ColumnElement[bool]] = []
    if not caller.is_admin:
        conditions.append(SqlExperiment.project_id == caller.project)
    if project is not None:
        conditions.append(SqlExperiment.project_id == project)
    if state is not None:
        conditions.append(SqlExperiment.state == state)
    if name:
        conditions.append(func.lower(SqlExperiment.name).contains(name.lower(), autoescape=True))
    if arch is not None:
        conditions.append(SqlExperiment.arch == arch)
    if dataset is not None:
        conditions.append(SqlExperiment.dataset == dataset)
    with session_scope(engine) as session:
        if tag is not None:
            conditions.append(has_tag(engine.dialect.name, tag))
        total = session.scalar(select(func.count()).select_from(SqlExperiment).where(*conditions))
        rows = session.scalars(
            select(SqlExperiment)
            .where(*conditions)
            .order_by(SqlExperiment.created_at.desc(), SqlExperiment.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
        items = [ExperimentSummary.model_validate(r) for r in rows]
    return ExperimentList(items=items, count=total or 0, limit=limit, offset=offset)


def get_experiment(
    *,
    engine: Engine,
    caller: Caller,
    experiment_id: str,
    lost_after_s: float = DEFAULT_LOST_AFTER_S,
) -> ExperimentRead:
    """One run with its latest epoch row (and why it waits, if queued), or :class:`NotFound`."""
    with session_scope(engine) as session:
        row = _visible(session, caller, experiment_id)
        latest = session.scalars(
            select(SqlEpochMetric)
            .where(SqlEpochMetric.experiment_id == row.id)
            .order_by(SqlEpochMetric.recorded_at.desc(), SqlEpochMetric.epoch.desc())
            .limit(1)
        ).first()
        summary = ExperimentSummary.model_validate(row)
        waiting = None
        if row.state in _CANCEL_NOW:
            waiting = placement_for_run(
                session, row, now=utcnow(), lost_after_s=lost_after_s
            ).reason
        return ExperimentRead(
            waiting_reason=waiting,
            **summary.model_dump(),
            current_stage=row.current_stage,
            current_epoch=row.current_epoch,
            error=row.error,
            submitted_by=row.submitted_by,
            latest_metrics=EpochMetricRead.model_validate(latest) if latest else None,
            spec=row.spec,
        )


def list_metrics(*, engine: Engine, caller: Caller, experiment_id: str) -> list[EpochMetricRead]:
    """Every epoch row of a run, in stage order (the spec's), then epoch."""
    with session_scope(engine) as session:
        row = _visible(session, caller, experiment_id)
        position = (
            select(SqlStage.position)
            .where(SqlStage.experiment_id == row.id, SqlStage.name == SqlEpochMetric.stage)
            .scalar_subquery()
        )
        metrics = session.scalars(
            select(SqlEpochMetric)
            .where(SqlEpochMetric.experiment_id == row.id)
            .order_by(
                func.coalesce(position, 1_000_000), SqlEpochMetric.stage, SqlEpochMetric.epoch
            )
        ).all()
        return [EpochMetricRead.model_validate(m) for m in metrics]


_CSV_HEAD = ["stage", "epoch", "attempt", "train_loss", "valid_loss"]
_CSV_TAIL = ["seconds", "images_per_second", "lr", "batch_size", "recorded_at"]


def metrics_csv(rows: list[EpochMetricRead]) -> str:
    """The epoch table as CSV, one column per metric name seen in any row."""
    names = sorted({name for r in rows for name in r.metrics})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*_CSV_HEAD, *names, *_CSV_TAIL])
    for r in rows:
        writer.writerow(
            [
                r.stage,
                r.epoch,
                r.attempt,
                "" if r.train_loss is None else r.train_loss,
                "" if r.valid_loss is None else r.valid_loss,
                *("" if r.metrics.get(n) is None else r.metrics[n] for n in names),
                r.seconds,
                r.images_per_second,
                r.lr,
                "" if r.batch_size is None else r.batch_size,
                r.recorded_at.isoformat(),
            ]
        )
    return out.getvalue()


def cancel(*, engine: Engine, caller: Caller, experiment_id: str) -> ExperimentSummary:
    """Cancel a run: at once if no worker has it, else ask the worker to stop.

    A queued or dispatched run becomes ``cancelled`` (a worker that later
    receives its message finds it cancelled and skips it); a running run gets
    ``cancel_requested`` and its worker stops after saving a checkpoint.
    Either way an audit event names the caller.

    Raises:
        NotFound: no such run visible to the caller.
        Conflict: the run already ended.
    """
    with session_scope(engine) as session:
        row = _visible(session, caller, experiment_id)
        # Lock the row (Postgres) so a worker's claim and this cancel serialize.
        session.refresh(row, with_for_update=True)
        if row.state in TERMINAL_STATES:
            raise Conflict(f"experiment {row.id} already {row.state.value}; nothing to cancel")
        previous = row.state
        if previous in _CANCEL_NOW:
            row.state = ExperimentState.CANCELLED
            row.finished_at = utcnow()
            kind, message = "cancel", f"cancelled while {previous.value}"
        else:
            row.cancel_requested = True
            kind, message = "cancel_requested", "cancel requested; the worker stops at a checkpoint"
        session.add(
            SqlEvent(
                experiment_id=row.id,
                kind=kind,
                message=message,
                data={"from_state": previous.value},
                actor=caller.token_id,
            )
        )
        session.flush()
        return ExperimentSummary.model_validate(row)


def list_artifacts(*, engine: Engine, caller: Caller, experiment_id: str) -> ArtifactList:
    """Every artifact row of a run, oldest first."""
    with session_scope(engine) as session:
        row = _visible(session, caller, experiment_id)
        artifacts = session.scalars(
            select(SqlArtifact).where(SqlArtifact.experiment_id == row.id).order_by(SqlArtifact.id)
        ).all()
        items = [ArtifactRead.model_validate(a) for a in artifacts]
    return ArtifactList(items=items, count=len(items))


def lr_find_curves(*, engine: Engine, caller: Caller, experiment_id: str) -> LrFindRead:
    """The finder's points per stage, in stage order, with the stage's suggestion."""
    with session_scope(engine) as session:
        row = _visible(session, caller, experiment_id)
        stages = {
            s.name: s
            for s in session.scalars(select(SqlStage).where(SqlStage.experiment_id == row.id))
        }
        points = session.scalars(
            select(SqlLrFindPoint)
            .where(SqlLrFindPoint.experiment_id == row.id)
            .order_by(SqlLrFindPoint.stage, SqlLrFindPoint.step)
        ).all()
        curves: dict[str, list[tuple[float, float | None]]] = {}
        for point in points:
            curves.setdefault(point.stage, []).append((point.lr, point.loss))

        def position(name: str) -> int:
            stage = stages.get(name)
            return stage.position if stage is not None else 1_000_000

        return LrFindRead(
            stages=[
                LrFindStage(
                    stage=name,
                    points=curve,
                    suggestion=stages[name].lr_suggestion if name in stages else None,
                    method=stages[name].lr_suggest_method if name in stages else None,
                )
                for name, curve in sorted(curves.items(), key=lambda item: position(item[0]))
            ]
        )


def compare(*, engine: Engine, caller: Caller, ids: list[str]) -> Comparison:
    """2..20 visible runs: spec differences, final and best metrics, per-epoch rows.

    Three statements whatever the number of runs (the runs, their epoch rows,
    their metric summaries); "best" is the summary's best value, the one the
    leaderboards rank by.
    """
    unique = list(dict.fromkeys(ids))
    if not 2 <= len(unique) <= MAX_COMPARED:
        raise InvalidSpec(
            [FieldProblem("query.ids", f"give 2 to {MAX_COMPARED} distinct experiment ids")]
        )
    with session_scope(engine) as session:
        found = {
            row.id: row
            for row in session.scalars(select(SqlExperiment).where(SqlExperiment.id.in_(unique)))
        }
        for experiment_id in unique:
            row = found.get(experiment_id)
            if row is None or not caller.can_see(row.project_id):
                raise NotFound(f"no experiment {experiment_id!r}")
        epochs: dict[str, list[SqlEpochMetric]] = {i: [] for i in unique}
        for metric_row in session.scalars(
            select(SqlEpochMetric).where(SqlEpochMetric.experiment_id.in_(unique))
        ):
            epochs[metric_row.experiment_id].append(metric_row)
        best: dict[str, dict[str, float]] = {i: {} for i in unique}
        for summary in session.scalars(
            select(SqlRunMetric).where(SqlRunMetric.experiment_id.in_(unique))
        ):
            if summary.best is not None:
                best[summary.experiment_id][summary.metric] = summary.best
        runs: list[ComparedRun] = []
        for experiment_id in unique:
            row = found[experiment_id]
            position = stage_order(row.spec)
            ordered = sorted(
                epochs[experiment_id],
                key=lambda r: (position.get(r.stage, len(position)), r.stage, r.epoch),
            )
            rows = [EpochMetricRead.model_validate(r) for r in ordered]
            runs.append(
                ComparedRun(
                    experiment=ExperimentSummary.model_validate(row),
                    final=rows[-1] if rows else None,
                    best=best[experiment_id],
                    epochs=rows,
                )
            )
        specs = [dict(found[i].spec) for i in unique]
    return Comparison(ids=unique, spec_differences=spec_differences(specs), runs=runs)


def artifact_key(*, engine: Engine, caller: Caller, experiment_id: str, name: str) -> str:
    """The store key of one recorded artifact of a visible run, or NotFound."""
    with session_scope(engine) as session:
        row = _visible(session, caller, experiment_id)
        artifact = session.scalars(
            select(SqlArtifact).where(SqlArtifact.experiment_id == row.id, SqlArtifact.name == name)
        ).first()
        if artifact is None:
            raise NotFound(f"experiment {experiment_id!r} has no artifact {name!r}")
    return run_key(experiment_id, name)
