"""Sweeps, and each run's metrics summarised for sorting, comparing and leaderboards.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:40:00

Adds ``sweeps``, ``experiments.sweep_id`` and ``run_metrics`` (one row per run
and metric: final value, best value and where), plus the indexes the
dashboard's queries use (measured with ``bench/dashboard.py``). Existing runs
get their ``run_metrics`` rows from their epoch rows here, so the leaderboards
include runs trained before the upgrade. ``experiments`` gains a column and a
foreign key through batch mode (SQLite rebuilds the table; Postgres alters it
in place).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    """Create sweeps and run_metrics, link experiments to sweeps, backfill run_metrics."""
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("strategy", sa.String(length=16), nullable=False),
        sa.Column("parameters", JSON, nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("base_spec", JSON, nullable=False),
        sa.Column("trials", JSON, nullable=False),
        sa.Column("submitted_by", sa.String(length=40), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_sweeps_project_id_projects")
        ),
        sa.ForeignKeyConstraint(
            ["submitted_by"],
            ["api_tokens.id"],
            name=op.f("fk_sweeps_submitted_by_api_tokens"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
    )
    op.create_index("ix_sweeps_project_created", "sweeps", ["project_id", "created_at"])
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(sa.Column("sweep_id", sa.String(length=40), nullable=True))
        batch.create_foreign_key(
            op.f("fk_experiments_sweep_id_sweeps"),
            "sweeps",
            ["sweep_id"],
            ["id"],
            ondelete="SET NULL",
        )
    op.create_index("ix_experiments_sweep", "experiments", ["sweep_id", "created_at"])
    op.create_index("ix_experiments_state_finished", "experiments", ["state", "finished_at"])
    op.create_index("ix_experiments_created", "experiments", ["created_at", "id"])
    op.create_index("ix_experiments_dataset_id", "experiments", ["dataset", "id"])
    op.create_table(
        "run_metrics",
        sa.Column("experiment_id", sa.String(length=40), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("final", sa.Float(), nullable=True),
        sa.Column("best", sa.Float(), nullable=True),
        sa.Column("best_stage", sa.String(length=64), nullable=True),
        sa.Column("best_epoch", sa.Integer(), nullable=True),
        sa.Column("higher_is_better", sa.Boolean(), nullable=False),
        sa.Column("epochs", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["experiment_id"],
            ["experiments.id"],
            name=op.f("fk_run_metrics_experiment_id_experiments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("experiment_id", "metric", name=op.f("pk_run_metrics")),
    )
    op.create_index("ix_run_metrics_metric_best", "run_metrics", ["metric", "best"])
    op.create_index("ix_run_metrics_metric_final", "run_metrics", ["metric", "final"])
    op.create_index(
        "ix_run_metrics_metric_run",
        "run_metrics",
        ["metric", "experiment_id"],
        postgresql_include=["best", "final"],
    )
    _backfill_run_metrics()


def _backfill_run_metrics() -> None:
    # The summarising rule is the application's (shared.db.summaries), applied
    # to plain rows here: a summary that disagreed with what the next epoch
    # upsert writes would be worse than a revision that depends on it.
    from shared.db.summaries import summarise, summary_rows

    bind = op.get_bind()
    experiments = sa.table("experiments", sa.column("id"), sa.column("spec", JSON))
    epochs = sa.table(
        "epoch_metrics",
        sa.column("experiment_id"),
        sa.column("stage"),
        sa.column("epoch"),
        sa.column("train_loss"),
        sa.column("valid_loss"),
        sa.column("metrics", JSON),
    )
    run_metrics = sa.table(
        "run_metrics",
        *(
            sa.column(c)
            for c in (
                "experiment_id",
                "metric",
                "final",
                "best",
                "best_stage",
                "best_epoch",
                "higher_is_better",
                "epochs",
            )
        ),
    )
    specs = dict(bind.execute(sa.select(experiments.c.id, experiments.c.spec)).all())
    by_run: dict[str, list[Any]] = {}
    for row in bind.execute(sa.select(epochs)).all():
        by_run.setdefault(row.experiment_id, []).append(row)
    for run_id, rows in by_run.items():
        stages = (specs.get(run_id) or {}).get("stages") or []
        position = {s.get("name"): i for i, s in enumerate(stages) if isinstance(s, dict)}
        rows.sort(key=lambda r: (position.get(r.stage, len(position)), r.stage, r.epoch))
        summaries = summarise(
            (
                r.stage,
                r.epoch,
                {"valid_loss": r.valid_loss, "train_loss": r.train_loss, **(r.metrics or {})},
            )
            for r in rows
        )
        if summaries:
            bind.execute(run_metrics.insert(), summary_rows(run_id, summaries))


def downgrade() -> None:
    """Drop run_metrics, the sweep link and sweeps (the summaries are derived data)."""
    op.drop_table("run_metrics")
    op.drop_index("ix_experiments_dataset_id", table_name="experiments")
    op.drop_index("ix_experiments_created", table_name="experiments")
    op.drop_index("ix_experiments_state_finished", table_name="experiments")
    op.drop_index("ix_experiments_sweep", table_name="experiments")
    with op.batch_alter_table("experiments") as batch:
        batch.drop_constraint(op.f("fk_experiments_sweep_id_sweeps"), type_="foreignkey")
        batch.drop_column("sweep_id")
    op.drop_index("ix_sweeps_project_created", table_name="sweeps")
    op.drop_table("sweeps")
