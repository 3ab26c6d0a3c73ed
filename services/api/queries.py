"""The dashboard's questions as queries: runs with their metrics, leaderboards, failures, events.

Each answers from indexed columns: metric sorts and leaderboards read
``run_metrics`` (one row per run and metric, kept by the epoch upsert), never
an aggregate over ``epoch_metrics``; a page of runs costs three statements
whatever the number of runs (count, page, the page's metric rows).
``bench/dashboard.py`` measures them on 10,000 runs of 50 epochs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, ColumnElement, Engine, and_, cast, exists, func, literal, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from services.api.auth import Caller
from services.api.schemas import (
    DatasetList,
    DatasetRead,
    EventList,
    EventRead,
    ExperimentSummary,
    FailureGroup,
    FailureList,
    Leaderboard,
    LeaderboardEntry,
    MetricSummaryRead,
    RunPage,
    RunRow,
)
from shared.db.models import (
    ExperimentState,
    SqlEvent,
    SqlExperiment,
    SqlRunMetric,
    SqlSweep,
)
from shared.db.session import session_scope
from shared.errors import FieldProblem, InvalidSpec, NotFound
from shared.results import higher_is_better

MAX_PAGE = 200
DEFAULT_PAGE = 50
#: Beyond any real listing, and within a 64-bit integer on every backend (the
#: fuzzer found that an unbounded offset reached Postgres as out of range).
MAX_OFFSET = 1_000_000_000
MAX_EVENT_ID = 2**62
MAX_EVENTS = 1000
#: Failed runs read to group by reason; older failures are left out of the groups.
FAILURES_SCANNED = 5000

_METRIC_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_PLAIN_SORTS = {"created", "name", "state"}


@dataclass(frozen=True)
class RunFilters:
    """The runs page's filters; None means "any"."""

    state: ExperimentState | None = None
    project: str | None = None
    tag: str | None = None
    name: str | None = None
    arch: str | None = None
    dataset: str | None = None
    sweep: str | None = None


@dataclass(frozen=True)
class Sort:
    """A parsed ``sort``: a plain column or ``best|final`` of a metric; ``reverse`` for ``-``."""

    key: str  # created | name | state | best | final
    metric: str | None
    reverse: bool

    @property
    def text(self) -> str:
        body = f"{self.key}:{self.metric}" if self.metric else self.key
        return f"-{body}" if self.reverse else body


def parse_sort(text: str) -> Sort:
    """``created``, ``-name``, ``best:error_rate``, ``-final:accuracy``.

    Anything else raises InvalidSpec naming ``query.sort``.
    """
    reverse = text.startswith("-")
    body = text[1:] if reverse else text
    key, _, metric = body.partition(":")
    if not metric and key in _PLAIN_SORTS:
        return Sort(key, None, reverse)
    if key in {"best", "final"} and _METRIC_NAME.match(metric):
        return Sort(key, metric, reverse)
    raise InvalidSpec(
        [
            FieldProblem(
                "query.sort",
                f"unknown sort {text!r}: use created, name, state, best:<metric> or "
                "final:<metric> (e.g. best:error_rate), with a leading '-' to reverse",
            )
        ]
    )


def _visibility(caller: Caller, project: str | None) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if not caller.is_admin:
        conditions.append(SqlExperiment.project_id == caller.project)
    if project is not None:
        conditions.append(SqlExperiment.project_id == project)
    return conditions


def has_tag(dialect: str, tag: str) -> ColumnElement[bool]:
    # JSON containment is spelled differently per backend: JSONB's @> on
    # Postgres, json_each on SQLite.
    if dialect == "postgresql":
        wanted = cast(literal(json.dumps([tag])), JSONB)
        return SqlExperiment.tags.op("@>", return_type=Boolean)(wanted)
    each = func.json_each(SqlExperiment.tags).table_valued("value")
    return select(each.c.value).where(each.c.value == tag).exists()


def _conditions(caller: Caller, filters: RunFilters, dialect: str) -> list[ColumnElement[bool]]:
    conditions = _visibility(caller, filters.project)
    if filters.state is not None:
        conditions.append(SqlExperiment.state == filters.state)
    if filters.name:
        conditions.append(
            func.lower(SqlExperiment.name).contains(filters.name.lower(), autoescape=True)
        )
    if filters.arch is not None:
        conditions.append(SqlExperiment.arch == filters.arch)
    if filters.dataset is not None:
        conditions.append(SqlExperiment.dataset == filters.dataset)
    if filters.sweep is not None:
        conditions.append(SqlExperiment.sweep_id == filters.sweep)
    if filters.tag is not None:
        conditions.append(has_tag(dialect, filters.tag))
    return conditions


def epochs_total(spec: dict[str, Any]) -> int:
    """The spec's epochs over all stages (what 100% progress means)."""
    total = 0
    for stage in spec.get("stages") or []:
        if isinstance(stage, dict) and isinstance(stage.get("epochs"), int):
            total += stage["epochs"]
    return total


_SUMMARY_FIELDS = tuple(n for n in ExperimentSummary.model_fields if n != "project")


def run_rows(session: Session, rows: Sequence[SqlExperiment]) -> list[RunRow]:
    """Runs as the runs page shows them, their metric summaries read in one statement."""
    summaries: dict[str, dict[str, MetricSummaryRead]] = {row.id: {} for row in rows}
    if rows:
        for metric in session.scalars(
            select(SqlRunMetric).where(SqlRunMetric.experiment_id.in_(list(summaries)))
        ):
            summaries[metric.experiment_id][metric.metric] = MetricSummaryRead.model_validate(
                metric
            )
    out: list[RunRow] = []
    for row in rows:
        metrics = summaries[row.id]
        total = epochs_total(row.spec)
        done = max((m.epochs for m in metrics.values()), default=0)
        progress = min(1.0, done / total) if total and metrics else None
        out.append(
            RunRow.model_validate(
                {
                    **_summary_fields(row),
                    "current_stage": row.current_stage,
                    "current_epoch": row.current_epoch,
                    "epochs_done": done,
                    "epochs_total": total,
                    "progress": progress,
                    "sweep_id": row.sweep_id,
                    "error": row.error,
                    "metrics": metrics,
                }
            )
        )
    return out


def _summary_fields(row: SqlExperiment) -> dict[str, Any]:
    # Read straight off the row: validating an ExperimentSummary first and the
    # RunRow again cost a third of a runs page's time.
    fields = {name: getattr(row, name) for name in _SUMMARY_FIELDS}
    fields["project"] = row.project_id
    return fields


def list_runs(
    *,
    engine: Engine,
    caller: Caller,
    filters: RunFilters,
    sort: str = "created",
    limit: int = DEFAULT_PAGE,
    offset: int = 0,
) -> RunPage:
    """A page of the runs the caller may see, in ``sort`` order, and the total matching."""
    order = parse_sort(sort)
    with session_scope(engine) as session:
        conditions = _conditions(caller, filters, engine.dialect.name)
        total = session.scalar(select(func.count()).select_from(SqlExperiment).where(*conditions))
        query = select(SqlExperiment).where(*conditions)
        newest = (SqlExperiment.created_at.desc(), SqlExperiment.id.desc())
        if order.metric is not None:
            rows: Sequence[SqlExperiment] = _page_by_metric(
                session, conditions, order, limit=limit, offset=offset
            )
        elif order.key == "created":
            query = query.order_by(*(c.asc() for c in newest) if order.reverse else newest)
        else:
            column = SqlExperiment.name if order.key == "name" else SqlExperiment.state
            query = query.order_by(column.desc() if order.reverse else column.asc(), *newest)
        if order.metric is None:
            rows = session.scalars(query.limit(limit).offset(offset)).all()
        items = run_rows(session, rows)
    return RunPage(items=items, count=total or 0, limit=limit, offset=offset, sort=order.text)


def _page_by_metric(
    session: Session,
    conditions: list[ColumnElement[bool]],
    order: Sort,
    *,
    limit: int,
    offset: int,
) -> list[SqlExperiment]:
    """One page of runs by a metric's best or final value, runs without a value last.

    In two parts rather than one outer join: the runs that have a value are
    read in the order of ``ix_run_metrics_metric_best`` / ``_final``, so
    Postgres walks that index and stops once the page is full (an outer join
    made it join and sort every run first: ~30 ms at 10,000 runs against
    under 1 ms); the runs without one follow, newest first, only on the page
    that reaches them.
    """
    value = SqlRunMetric.best if order.key == "best" else SqlRunMetric.final
    has_value = and_(
        SqlRunMetric.experiment_id == SqlExperiment.id,
        SqlRunMetric.metric == order.metric,
        value.is_not(None),
    )
    # Best first: highest accuracy, lowest loss; '-' puts the worst first.
    descending = higher_is_better(order.metric or "") != order.reverse
    newest = (SqlExperiment.created_at.desc(), SqlExperiment.id.desc())
    rows = list(
        session.scalars(
            select(SqlExperiment)
            .join(SqlRunMetric, has_value)
            .where(*conditions)
            .order_by(value.desc() if descending else value.asc(), *newest)
            .limit(limit)
            .offset(offset)
        )
    )
    missing = limit - len(rows)
    if missing == 0:
        return rows
    if rows:  # this page holds the last runs with a value
        with_value = offset + len(rows)
    else:
        with_value = (
            session.scalar(
                select(func.count())
                .select_from(SqlExperiment)
                .join(SqlRunMetric, has_value)
                .where(*conditions)
            )
            or 0
        )
    rows += session.scalars(
        select(SqlExperiment)
        .where(*conditions, ~exists().where(has_value))
        .order_by(*newest)
        .limit(missing)
        .offset(max(0, offset - with_value))
    )
    return rows


def leaderboard(
    *,
    engine: Engine,
    caller: Caller,
    metric: str,
    dataset: str | None = None,
    sweep: str | None = None,
    project: str | None = None,
    state: ExperimentState | None = None,
    limit: int = 20,
) -> Leaderboard:
    """Runs ranked by the best value of ``metric`` they reached, on one dataset or one sweep.

    Runs still training take part with their best so far (a leaderboard that
    refreshes while they train); ``state=succeeded`` keeps finished ones only.
    """
    if not _METRIC_NAME.match(metric):
        raise InvalidSpec([FieldProblem("query.metric", f"not a metric name: {metric!r}")])
    if dataset is None and sweep is None:
        raise InvalidSpec(
            [FieldProblem("query.dataset", "give a dataset or a sweep to rank runs within")]
        )
    upward = higher_is_better(metric)
    with session_scope(engine) as session:
        conditions = [
            *_visibility(caller, project),
            SqlRunMetric.metric == metric,
            SqlRunMetric.best.is_not(None),
        ]
        if dataset is not None:
            conditions.append(SqlExperiment.dataset == dataset)
        if sweep is not None:
            conditions.append(SqlExperiment.sweep_id == sweep)
        if state is not None:
            conditions.append(SqlExperiment.state == state)
        joined = select(SqlRunMetric, SqlExperiment).join(
            SqlExperiment, SqlExperiment.id == SqlRunMetric.experiment_id
        )
        total = session.scalar(
            select(func.count())
            .select_from(SqlRunMetric)
            .join(SqlExperiment, SqlExperiment.id == SqlRunMetric.experiment_id)
            .where(*conditions)
        )
        best = SqlRunMetric.best.desc() if upward else SqlRunMetric.best.asc()
        pairs = session.execute(
            joined.where(*conditions).order_by(best, SqlExperiment.created_at.asc()).limit(limit)
        ).all()
        runs = run_rows(session, [experiment for _, experiment in pairs])
        entries = [
            LeaderboardEntry(
                rank=rank,
                run=run,
                best=float(summary.best or 0.0),
                best_stage=summary.best_stage,
                best_epoch=summary.best_epoch,
                final=summary.final,
            )
            for rank, ((summary, _), run) in enumerate(zip(pairs, runs, strict=True), start=1)
        ]
    return Leaderboard(
        metric=metric,
        higher_is_better=upward,
        dataset=dataset,
        sweep=sweep,
        count=total or 0,
        entries=entries,
    )


def datasets(*, engine: Engine, caller: Caller, project: str | None = None) -> DatasetList:
    """Each dataset the caller's runs used, how many runs, and the metrics they logged."""
    conditions = _visibility(caller, project)
    with session_scope(engine) as session:
        counts = session.execute(
            select(SqlExperiment.dataset, func.count())
            .where(*conditions)
            .group_by(SqlExperiment.dataset)
            .order_by(SqlExperiment.dataset)
        ).all()
        logged = session.execute(
            select(SqlExperiment.dataset, SqlRunMetric.metric)
            .join(SqlRunMetric, SqlRunMetric.experiment_id == SqlExperiment.id)
            .where(*conditions)
            .distinct()
        ).all()
    metrics: dict[str, set[str]] = {}
    for dataset, metric in logged:
        metrics.setdefault(dataset, set()).add(metric)
    return DatasetList(
        items=[
            DatasetRead(dataset=d, runs=n, metrics=sorted(metrics.get(d, set()), key=_metric_rank))
            for d, n in counts
        ]
    )


def _metric_rank(metric: str) -> tuple[int, str]:
    # Losses first, in the order people read them, then the spec's metrics.
    order = {"valid_loss": 0, "train_loss": 1}
    return order.get(metric, 2), metric


# Parts of an error message that differ between runs failing for the same reason.
_VOLATILE = (
    (re.compile(r"\b(exp|tok|swp|gang|wrk)_[a-z0-9]+\b"), r"\1_…"),
    (re.compile(r"[a-z][a-z0-9+.-]*://\S+"), "<url>"),
    (re.compile(r"(?:/[\w.@+-]+){2,}/?"), "<path>"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<hex>"),
    (re.compile(r"-?\b\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b"), "<n>"),
)


def failure_reason(error: str | None) -> str:
    """An error's first line with ids, URLs, paths and numbers blanked, to group runs by."""
    line = (error or "").strip().splitlines()[0] if (error or "").strip() else ""
    if not line:
        return "(no error recorded)"
    for pattern, replacement in _VOLATILE:
        line = pattern.sub(replacement, line)
    return line[:300]


def failures(
    *, engine: Engine, caller: Caller, project: str | None = None, limit: int = 50
) -> FailureList:
    """Failed runs grouped by :func:`failure_reason`, largest group first."""
    conditions = [*_visibility(caller, project), SqlExperiment.state == ExperimentState.FAILED]
    when = func.coalesce(SqlExperiment.finished_at, SqlExperiment.updated_at)
    with session_scope(engine) as session:
        rows = session.execute(
            select(SqlExperiment.id, SqlExperiment.error, when)
            .where(*conditions)
            .order_by(when.desc())
            .limit(FAILURES_SCANNED)
        ).all()
    groups: dict[str, FailureGroup] = {}
    for run_id, error, at in rows:
        reason = failure_reason(error)
        group = groups.get(reason)
        if group is None:
            groups[reason] = FailureGroup(
                reason=reason,
                example=(error or "")[:2000],
                count=1,
                first_at=at,
                last_at=at,
                experiment_ids=[run_id],
            )
            continue
        group.count += 1
        group.first_at = min(group.first_at, at)
        if len(group.experiment_ids) < 20:
            group.experiment_ids.append(run_id)
    ordered = sorted(groups.values(), key=lambda g: (-g.count, -g.last_at.timestamp()))
    return FailureList(groups=ordered[:limit], total=len(rows))


def events(
    *, engine: Engine, caller: Caller, experiment_id: str, after: int = 0, limit: int = 500
) -> EventList:
    """A run's events after id ``after``, oldest first (``last_id`` is where to go on from)."""
    with session_scope(engine) as session:
        row = session.get(SqlExperiment, experiment_id)
        if row is None or not caller.can_see(row.project_id):
            raise NotFound(f"no experiment {experiment_id!r}")
        items = [
            EventRead.model_validate(e)
            for e in session.scalars(
                select(SqlEvent)
                .where(SqlEvent.experiment_id == experiment_id, SqlEvent.id > after)
                .order_by(SqlEvent.id)
                .limit(min(limit, MAX_EVENTS))
            )
        ]
    return EventList(items=items, last_id=items[-1].id if items else (after or None))


def sweep_run_ids(*, engine: Engine, caller: Caller, sweep_id: str, limit: int) -> list[str]:
    """A sweep's runs for a comparison: those with the best valid loss first, then the rest."""
    with session_scope(engine) as session:
        sweep = session.get(SqlSweep, sweep_id)
        if sweep is None or not caller.can_see(sweep.project_id):
            raise NotFound(f"no sweep {sweep_id!r}")
        ids = session.scalars(
            select(SqlExperiment.id)
            .outerjoin(
                SqlRunMetric,
                and_(
                    SqlRunMetric.experiment_id == SqlExperiment.id,
                    SqlRunMetric.metric == "valid_loss",
                ),
            )
            .where(SqlExperiment.sweep_id == sweep_id)
            .order_by(SqlRunMetric.best.asc().nulls_last(), SqlExperiment.created_at)
            .limit(limit)
        ).all()
    return list(ids)
