"""Initial schema: projects, tokens, experiments and their results, events, workers, outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-30 05:13:56

Started from ``alembic revision --autogenerate`` against an empty SQLite
database, then checked by hand: column types are spelled out here (not
imported from ``shared.db``) so this revision stays what it was when the
models change, state columns are a VARCHAR with a named CHECK (not a native
ENUM), and indexes are created with plain ``op`` calls, which SQLite supports
without batch mode. A test migrates Postgres and SQLite up, down and up again
and compares the result with the models.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of shared.db.base's column types as of this revision.
TIMESTAMP = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
EXPERIMENT_STATES = ("queued", "dispatched", "running", "succeeded", "failed", "cancelled")
WORKER_STATES = ("idle", "busy", "lost")


def _one_of(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _experiment_fk(column: str, table: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column],
        ["experiments.id"],
        name=op.f(f"fk_{table}_{column}_experiments"),
        ondelete=ondelete,
    )


def upgrade() -> None:
    """Create every table and index."""
    op.create_table(
        "projects",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projects")),
    )

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("last_used_at", TIMESTAMP, nullable=True),
        sa.Column("revoked_at", TIMESTAMP, nullable=True),
        sa.CheckConstraint(
            "project_id IS NOT NULL OR is_admin", name=op.f("ck_api_tokens_project_or_admin")
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_api_tokens_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_index(op.f("ix_api_tokens_project_id"), "api_tokens", ["project_id"])

    op.create_table(
        "experiments",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("spec_hash", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(length=64), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("submitted_by", sa.String(length=40), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("tags", JSON, nullable=False),
        sa.Column("arch", sa.String(length=64), nullable=False),
        sa.Column("dataset", sa.String(length=1024), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("current_stage", sa.String(length=64), nullable=True),
        sa.Column("current_epoch", sa.Integer(), nullable=True),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", TIMESTAMP, nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.CheckConstraint(_one_of("state", EXPERIMENT_STATES), name=op.f("ck_experiments_state")),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_experiments_project_id_projects")
        ),
        sa.ForeignKeyConstraint(
            ["submitted_by"],
            ["api_tokens.id"],
            name=op.f("fk_experiments_submitted_by_api_tokens"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiments")),
        sa.UniqueConstraint(
            "project_id",
            "idempotency_key",
            name=op.f("uq_experiments_project_id_idempotency_key"),
        ),
    )
    op.create_index(op.f("ix_experiments_arch"), "experiments", ["arch"])
    op.create_index(op.f("ix_experiments_dataset"), "experiments", ["dataset"])
    op.create_index(op.f("ix_experiments_submitted_by"), "experiments", ["submitted_by"])
    op.create_index(
        "ix_experiments_project_created", "experiments", ["project_id", "created_at", "id"]
    )
    op.create_index(
        "ix_experiments_project_state_created",
        "experiments",
        ["project_id", "state", "created_at", "id"],
    )
    op.create_index("ix_experiments_state_created", "experiments", ["state", "created_at"])
    op.create_index("ix_experiments_state_lease", "experiments", ["state", "lease_expires_at"])

    op.create_table(
        "stages",
        sa.Column("experiment_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("train", sa.String(length=16), nullable=False),
        sa.Column("epochs", sa.Integer(), nullable=False),
        sa.Column("schedule", sa.String(length=32), nullable=False),
        sa.Column("lrs", JSON, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("kept", sa.String(length=16), nullable=False),
        sa.Column("kept_epoch", sa.Integer(), nullable=True),
        sa.Column("reverted", sa.Boolean(), nullable=False),
        sa.Column("diverged", sa.Boolean(), nullable=False),
        sa.Column("trainable_params", sa.BigInteger(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("lr_suggestion", sa.Float(), nullable=True),
        sa.Column("lr_suggest_method", sa.String(length=16), nullable=True),
        _experiment_fk("experiment_id", "stages", "CASCADE"),
        sa.PrimaryKeyConstraint("experiment_id", "name", name=op.f("pk_stages")),
    )

    op.create_table(
        "epoch_metrics",
        sa.Column("experiment_id", sa.String(length=40), nullable=False),
        sa.Column("stage", sa.String(length=64), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("valid_loss", sa.Float(), nullable=True),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("images_per_second", sa.Float(), nullable=False),
        sa.Column("lr", sa.Float(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=True),
        sa.Column("recorded_at", TIMESTAMP, nullable=False),
        _experiment_fk("experiment_id", "epoch_metrics", "CASCADE"),
        sa.PrimaryKeyConstraint("experiment_id", "stage", "epoch", name=op.f("pk_epoch_metrics")),
    )

    op.create_table(
        "lr_find_points",
        sa.Column("experiment_id", sa.String(length=40), nullable=False),
        sa.Column("stage", sa.String(length=64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("lr", sa.Float(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        _experiment_fk("experiment_id", "lr_find_points", "CASCADE"),
        sa.PrimaryKeyConstraint("experiment_id", "stage", "step", name=op.f("pk_lr_find_points")),
    )

    op.create_table(
        "artifacts",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("experiment_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=512), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        _experiment_fk("experiment_id", "artifacts", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artifacts")),
        sa.UniqueConstraint("experiment_id", "name", name=op.f("uq_artifacts_experiment_id_name")),
    )

    op.create_table(
        "events",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("experiment_id", sa.String(length=40), nullable=True),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        _experiment_fk("experiment_id", "events", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index("ix_events_experiment_id", "events", ["experiment_id", "id"])
    op.create_index("ix_events_created_at", "events", ["created_at"])

    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("queues", JSON, nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("gpu_model", sa.String(length=128), nullable=True),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("versions", JSON, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("current_experiment_id", sa.String(length=40), nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("last_heartbeat", TIMESTAMP, nullable=False),
        sa.CheckConstraint(_one_of("state", WORKER_STATES), name=op.f("ck_workers_state")),
        _experiment_fk("current_experiment_id", "workers", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    op.create_index("ix_workers_state_heartbeat", "workers", ["state", "last_heartbeat"])

    op.create_table(
        "outbox",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("experiment_id", sa.String(length=40), nullable=False),
        sa.Column("task", sa.String(length=128), nullable=False),
        sa.Column("queue", sa.String(length=64), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("sent_at", TIMESTAMP, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        _experiment_fk("experiment_id", "outbox", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )
    op.create_index(op.f("ix_outbox_experiment_id"), "outbox", ["experiment_id"])
    # Partial: the dispatcher only ever looks for unsent rows, which stay few.
    op.create_index(
        "ix_outbox_unsent",
        "outbox",
        ["priority", "id"],
        postgresql_where=sa.text("sent_at IS NULL"),
        sqlite_where=sa.text("sent_at IS NULL"),
    )


def downgrade() -> None:
    """Drop every table (their indexes go with them), children before parents."""
    for table in (
        "outbox",
        "workers",
        "events",
        "artifacts",
        "lr_find_points",
        "epoch_metrics",
        "stages",
        "experiments",
        "api_tokens",
        "projects",
    ):
        op.drop_table(table)
