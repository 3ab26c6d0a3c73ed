"""Writes for the engine's per-epoch results that are safe to repeat.

A resumed run replays the epoch it was interrupted in, and a redelivered
message may report the same epoch twice; both must leave one row per
(experiment, stage, epoch) holding the latest values. That is an
``INSERT ... ON CONFLICT DO UPDATE``, spelled by each dialect's own ``insert``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared.db.base import Base, utcnow
from shared.db.models import SqlEpochMetric, SqlExperiment, SqlLrFindPoint, SqlStage
from shared.db.summaries import refresh_run_metrics
from shared.errors import ConfigError
from shared.results import EpochRow, LrFindResult, StageReport


def _finite(value: float | None) -> float | None:
    # NaN and infinity become NULL: SQLite already stores NaN as NULL and
    # Postgres rejects NaN inside JSON, so this keeps both backends identical.
    # A diverged loss is recorded by the stage's ``diverged`` flag instead.
    if value is None or not math.isfinite(value):
        return None
    return value


def _upsert(
    session: Session,
    model: type[Base],
    values: Mapping[str, Any],
    *,
    keys: Sequence[str],
) -> None:
    """Insert ``values`` or, when a row with the same ``keys`` exists, overwrite it."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        pg_stmt = postgresql.insert(model).values(dict(values))
        updates = {c: pg_stmt.excluded[c] for c in values if c not in keys}
        session.execute(pg_stmt.on_conflict_do_update(index_elements=list(keys), set_=updates))
    elif dialect == "sqlite":
        lite_stmt = sqlite.insert(model).values(dict(values))
        updates = {c: lite_stmt.excluded[c] for c in values if c not in keys}
        session.execute(lite_stmt.on_conflict_do_update(index_elements=list(keys), set_=updates))
    else:
        raise ConfigError(f"no upsert for database dialect {dialect!r}: use sqlite or postgresql")


def upsert_epoch_metric(
    session: Session, experiment_id: str, row: EpochRow, *, attempt: int = 0
) -> None:
    """Record one epoch of ``experiment_id``, replacing an earlier row for the same epoch.

    The run's metric summaries (``run_metrics``) are refreshed in the same
    transaction, so a reader never sees an epoch without its summary.

    Args:
        session: an open session; the caller commits (``session_scope``).
        experiment_id: the run the epoch belongs to.
        row: the engine's epoch row (stage, epoch, losses, metrics, speed, lr).
        attempt: the run's attempt that produced the row.
    """
    values: dict[str, Any] = {
        "experiment_id": experiment_id,
        "stage": row.stage,
        "epoch": row.epoch,
        "attempt": attempt,
        "train_loss": _finite(row.train_loss),
        "valid_loss": _finite(row.valid_loss),
        "metrics": {name: _finite(value) for name, value in row.metrics.items()},
        "seconds": row.seconds,
        "images_per_second": row.images_per_second,
        "lr": row.lr,
        "batch_size": row.batch_size,
        "recorded_at": utcnow(),
    }
    _upsert(session, SqlEpochMetric, values, keys=("experiment_id", "stage", "epoch"))
    refresh_run_metrics(session, experiment_id)


def replace_lr_find_points(session: Session, experiment_id: str, result: LrFindResult) -> None:
    """Store a stage's LR-finder curve and suggestion, replacing an earlier attempt's.

    Replaced rather than upserted: a rerun may stop after fewer steps, and
    the old tail must not survive.
    """
    session.execute(
        delete(SqlLrFindPoint).where(
            SqlLrFindPoint.experiment_id == experiment_id,
            SqlLrFindPoint.stage == result.stage,
        )
    )
    points = [
        {
            "experiment_id": experiment_id,
            "stage": result.stage,
            "step": step,
            "lr": lr,
            "loss": _finite(loss),
        }
        for step, (lr, loss) in enumerate(zip(result.lrs, result.losses, strict=True))
    ]
    if points:
        session.execute(insert(SqlLrFindPoint), points)
    upsert_stage(
        session,
        experiment_id,
        result.stage,
        lr_suggestion=_finite(result.suggestion),
        lr_suggest_method=result.suggest_method,
    )


def upsert_stage(session: Session, experiment_id: str, name: str, **values: Any) -> None:
    """Create or update one stage's row with ``values`` (columns of ``stages``).

    ``position``, ``train``, ``epochs`` and ``schedule`` come from the run's
    spec, so any of the engine's calls (the LR finder runs before the stage
    starts) can be the first to write the row; columns not in ``values`` keep
    what an earlier call wrote.
    """
    spec = session.scalar(select(SqlExperiment.spec).where(SqlExperiment.id == experiment_id))
    declared = [s for s in (spec or {}).get("stages") or [] if isinstance(s, Mapping)]
    position = next((i for i, s in enumerate(declared) if s.get("name") == name), len(declared))
    stage: Mapping[str, Any] = declared[position] if position < len(declared) else {}
    row = {
        "experiment_id": experiment_id,
        "name": name,
        "position": position,
        "train": str(stage.get("train", "head")),
        "epochs": int(stage.get("epochs", 0)),
        "schedule": str(stage.get("schedule", "one_cycle")),
        **values,
    }
    _upsert(session, SqlStage, row, keys=("experiment_id", "name"))


def record_stage_reports(
    session: Session, experiment_id: str, stages: Sequence[StageReport]
) -> None:
    """Copy each stage's outcome from the run's report into ``stages`` (kept, reverted, ...)."""
    for stage in stages:
        values: dict[str, Any] = {
            "train": stage.train,
            "epochs": stage.epochs,
            "schedule": stage.schedule,
            "lrs": [float(lr) for lr in stage.lrs],
            "kept": stage.kept,
            "kept_epoch": stage.kept_epoch,
            "reverted": stage.reverted,
            "diverged": stage.diverged,
            "trainable_params": stage.trainable_params,
            "seconds": stage.seconds,
        }
        if stage.lr_find is not None:
            values["lr_suggestion"] = _finite(stage.lr_find.suggestion)
            values["lr_suggest_method"] = stage.lr_find.suggest_method
        upsert_stage(session, experiment_id, stage.name, **values)
