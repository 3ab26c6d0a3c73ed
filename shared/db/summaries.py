"""Each run's metrics summarised (last value, best value, where), kept with every epoch row.

The runs page sorts by any metric, comparisons show final and best side by
side and leaderboards rank by the best value a run reached; aggregating the
epoch table for that on every request is what makes peers' pages slow at
tens of thousands of runs. Instead the epoch upsert refreshes the run's rows
in ``run_metrics`` in the same transaction: a run has at most a few hundred
epoch rows, so the refresh reads them all and rewrites a handful of rows.

"Final" is the last epoch in the spec's stage order; "best" follows the
metric's direction (:func:`shared.results.higher_is_better`). NULL values
(a diverged loss) never count as best.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from shared.db.models import SqlEpochMetric, SqlExperiment, SqlRunMetric
from shared.results import higher_is_better

#: The series every epoch row has besides its spec metrics.
LOSSES = ("valid_loss", "train_loss")


@dataclass
class MetricSummary:
    """One metric of one run: its last value, best value and where the best was."""

    final: float | None = None
    best: float | None = None
    best_stage: str | None = None
    best_epoch: int | None = None
    epochs: int = 0


def stage_order(spec: Mapping[str, Any]) -> dict[str, int]:
    """Stage name -> its position in the spec (rows of unknown stages sort last)."""
    stages = spec.get("stages") or []
    return {str(s.get("name")): i for i, s in enumerate(stages) if isinstance(s, Mapping)}


def summarise(
    rows: Iterable[tuple[str, int, Mapping[str, float | None]]],
) -> dict[str, MetricSummary]:
    """Metric -> summary, from ``(stage, epoch, {metric: value})`` rows given in run order."""
    summaries: dict[str, MetricSummary] = {}
    for stage, epoch, values in rows:
        for name, value in values.items():
            summary = summaries.setdefault(name, MetricSummary())
            summary.epochs += 1
            summary.final = value
            if value is None:
                continue
            better = summary.best is None or (
                value > summary.best if higher_is_better(name) else value < summary.best
            )
            if better:
                summary.best, summary.best_stage, summary.best_epoch = value, stage, epoch
    return summaries


def ordered_rows(
    rows: Sequence[SqlEpochMetric], spec: Mapping[str, Any]
) -> list[tuple[str, int, dict[str, float | None]]]:
    """Epoch rows in run order (spec stage order, then epoch) as ``summarise`` wants them."""
    position = stage_order(spec)
    ordered = sorted(rows, key=lambda r: (position.get(r.stage, len(position)), r.stage, r.epoch))
    out: list[tuple[str, int, dict[str, float | None]]] = []
    for row in ordered:
        values: dict[str, float | None] = {
            "valid_loss": row.valid_loss,
            "train_loss": row.train_loss,
        }
        for name, value in (row.metrics or {}).items():
            values[name] = float(value) if isinstance(value, int | float) else None
        out.append((row.stage, row.epoch, values))
    return out


def refresh_run_metrics(session: Session, experiment_id: str) -> None:
    """Rewrite ``experiment_id``'s ``run_metrics`` rows from its epoch rows (same transaction)."""
    spec = session.scalar(select(SqlExperiment.spec).where(SqlExperiment.id == experiment_id))
    rows = session.scalars(
        select(SqlEpochMetric).where(SqlEpochMetric.experiment_id == experiment_id)
    ).all()
    summaries = summarise(ordered_rows(rows, spec or {}))
    session.execute(delete(SqlRunMetric).where(SqlRunMetric.experiment_id == experiment_id))
    if summaries:
        session.execute(insert(SqlRunMetric), summary_rows(experiment_id, summaries))


def summary_rows(
    experiment_id: str, summaries: Mapping[str, MetricSummary]
) -> list[dict[str, Any]]:
    """The ``run_metrics`` rows of one run (also what migration 0002 backfills)."""
    return [
        {
            "experiment_id": experiment_id,
            "metric": name,
            "final": s.final,
            "best": s.best,
            "best_stage": s.best_stage,
            "best_epoch": s.best_epoch,
            "higher_is_better": higher_is_better(name),
            "epochs": s.epochs,
        }
        for name, s in summaries.items()
    ]
