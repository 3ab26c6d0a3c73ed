"""fitfleet's tables, as SQLAlchemy 2.0 typed models (``Sql*``).

Postgres is the source of truth for a run's life: the API writes an experiment
and its outbox row in one transaction, a dispatcher publishes the outbox, a
worker claims the run with a lease (``lease_owner``/``lease_expires_at``) it
keeps renewing, and a reconciler re-queues runs whose lease expired. Metrics
are keyed by (experiment, stage, epoch) and written with upserts
(:mod:`shared.db.metrics`) so a resumed epoch overwrites instead of duplicating.

These rows never leave ``shared.db``: callers get pydantic models. JSON
columns are not mutation-tracked; assign a new value instead of editing one
in place.

The schema changes only through Alembic (``migrations/``); a test compares the
migrated database with these models, so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import secrets
import string
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Enum,
    Float,
    ForeignKey,
    Index,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db.base import Base, BigIntId, JsonType, utcnow

ID_LENGTH = 40  # "exp_" + 12 characters today; room for a UUID string
_ID_ALPHABET = string.ascii_lowercase + string.digits


class ExperimentState(StrEnum):
    """Where a run is in its life: ``queued -> dispatched -> running -> terminal``."""

    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES: frozenset[ExperimentState] = frozenset(
    {ExperimentState.SUCCEEDED, ExperimentState.FAILED, ExperimentState.CANCELLED}
)


class WorkerState(StrEnum):
    """A worker's last known condition; ``lost`` once its heartbeat is too old."""

    IDLE = "idle"
    BUSY = "busy"
    LOST = "lost"


def _string_enum(enum_type: type[StrEnum], name: str) -> Enum:
    # A VARCHAR plus a named CHECK rather than a native Postgres ENUM: adding a
    # state later is then an ordinary batch migration on both backends, and the
    # stored text is the enum's value ("queued"), not its Python name.
    return Enum(
        enum_type,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        validate_strings=True,
        values_callable=lambda members: [m.value for m in members],
    )


def new_id(prefix: str, length: int = 12) -> str:
    """A short random id such as ``exp_k3v9q0x2m7ab``.

    Lowercase letters and digits only, so ids are safe in URLs, S3 keys and
    file names on case-insensitive file systems; 36**12 is about 4.7e18.
    """
    return f"{prefix}_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def hash_token(secret: str) -> str:
    """The value stored in ``api_tokens.token_hash``: sha256 hex of the secret.

    A database leak then exposes no usable token; tokens are long random
    strings, so a fast unsalted hash is enough (nothing to brute-force).
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class SqlProject(Base):
    """A team's namespace for experiments; its id is the spec's ``project`` slug."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SqlApiToken(Base):
    """An API token; only the sha256 of its secret is kept (see :func:`hash_token`).

    ``prefix`` is the first few characters of the secret, shown in listings so
    people can tell their tokens apart. A token without a project must be an
    admin token (it then spans every project).
    """

    __tablename__ = "api_tokens"
    __table_args__ = (
        CheckConstraint("project_id IS NOT NULL OR is_admin", name="project_or_admin"),
    )

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), primary_key=True, default=lambda: new_id("tok")
    )
    name: Mapped[str] = mapped_column(String(200), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    project_id: Mapped[str | None] = mapped_column(
        String(64), ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class SqlSweep(Base):
    """A spec expanded over grid or random choices into one experiment per trial.

    ``base_spec`` is the spec as sent; each trial's experiment holds its own
    full spec, and ``trials`` records which choices made it (experiment id ->
    {dotted path: value}), so a sweep can be read back without re-expanding.
    """

    __tablename__ = "sweeps"
    __table_args__ = (Index("ix_sweeps_project_created", "project_id", "created_at"),)

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), primary_key=True, default=lambda: new_id("swp")
    )
    project_id: Mapped[str] = mapped_column(String(64), ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(200))
    strategy: Mapped[str] = mapped_column(String(16))
    parameters: Mapped[dict[str, Any]]
    seed: Mapped[int] = mapped_column(BigInteger, default=0)
    base_spec: Mapped[dict[str, Any]]
    trials: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, default=list)
    submitted_by: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("api_tokens.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SqlExperiment(Base):
    """One submitted experiment (a "run") and everything needed to schedule it.

    ``spec`` is the validated spec as JSON; ``arch`` and ``dataset`` (the
    spec's ``data.source``) and ``queue``/``priority`` are copied out of it so
    listings can filter and sort without reading JSON. ``attempt`` is 0 until
    a worker first claims the run and goes up by one on every claim, so a
    resume is ``attempt > 1``. ``idempotency_key`` makes a retried submission
    return the first run instead of creating a second (unique per project;
    NULLs never collide).
    """

    __tablename__ = "experiments"
    __table_args__ = (
        UniqueConstraint("project_id", "idempotency_key"),
        # The runs list: one project, newest first, optionally one state;
        # ``id`` breaks created_at ties for keyset pagination.
        Index("ix_experiments_project_created", "project_id", "created_at", "id"),
        Index("ix_experiments_project_state_created", "project_id", "state", "created_at", "id"),
        # The queue view across projects ("what is waiting, and since when").
        Index("ix_experiments_state_created", "state", "created_at"),
        # The reconciler: running runs whose lease has expired.
        Index("ix_experiments_state_lease", "state", "lease_expires_at"),
        # A sweep's runs (compare and leaderboard per sweep).
        Index("ix_experiments_sweep", "sweep_id", "created_at"),
        # The runs page across projects (an admin), newest first.
        Index("ix_experiments_created", "created_at", "id"),
        # A dataset's runs in id order: a leaderboard's count merge-joins run_metrics.
        Index("ix_experiments_dataset_id", "dataset", "id"),
        # Failures grouped by reason, newest first.
        Index("ix_experiments_state_finished", "state", "finished_at"),
    )

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), primary_key=True, default=lambda: new_id("exp")
    )
    project_id: Mapped[str] = mapped_column(String(64), ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]]
    spec_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[ExperimentState] = mapped_column(
        _string_enum(ExperimentState, "state"), default=ExperimentState.QUEUED
    )
    attempt: Mapped[int] = mapped_column(default=0)
    queue: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(SmallInteger)
    submitted_by: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("api_tokens.id", ondelete="SET NULL"), index=True
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    tags: Mapped[list[str]] = mapped_column(default=list)
    arch: Mapped[str] = mapped_column(String(64), index=True)
    dataset: Mapped[str] = mapped_column(String(1024), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    current_stage: Mapped[str | None] = mapped_column(String(64))
    current_epoch: Mapped[int | None]
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    sweep_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("sweeps.id", ondelete="SET NULL")
    )

    project: Mapped[SqlProject] = relationship()
    stages: Mapped[list[SqlStage]] = relationship(
        back_populates="experiment",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="SqlStage.position",
    )
    artifacts: Mapped[list[SqlArtifact]] = relationship(
        back_populates="experiment",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="SqlArtifact.id",
    )


class SqlStage(Base):
    """One stage of a run (one fit call), keyed by its name within the run.

    The columns mirror :class:`shared.results.StageReport`'s scalars; the
    per-epoch rows live in ``epoch_metrics`` and the finder's curve in
    ``lr_find_points``.
    """

    __tablename__ = "stages"

    experiment_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int]  # 0-based order in the spec
    train: Mapped[str] = mapped_column(String(16))
    epochs: Mapped[int]
    schedule: Mapped[str] = mapped_column(String(32))
    lrs: Mapped[list[float]] = mapped_column(JsonType, default=list)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    kept: Mapped[str] = mapped_column(String(16), default="last")
    kept_epoch: Mapped[int | None]
    reverted: Mapped[bool] = mapped_column(default=False)
    diverged: Mapped[bool] = mapped_column(default=False)
    trainable_params: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    lr_suggestion: Mapped[float | None] = mapped_column(Float)
    lr_suggest_method: Mapped[str | None] = mapped_column(String(16))

    experiment: Mapped[SqlExperiment] = relationship(back_populates="stages")


class SqlEpochMetric(Base):
    """One row of the epoch table (:class:`shared.results.EpochRow`).

    The primary key (experiment, stage, epoch) is what makes a resumed epoch
    overwrite its earlier row; write through
    :func:`shared.db.metrics.upsert_epoch_metric`. ``attempt`` says which
    attempt wrote the row.
    """

    __tablename__ = "epoch_metrics"

    experiment_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
    )
    stage: Mapped[str] = mapped_column(String(64), primary_key=True)
    epoch: Mapped[int] = mapped_column(primary_key=True)
    attempt: Mapped[int] = mapped_column(default=0)
    train_loss: Mapped[float | None] = mapped_column(Float)
    valid_loss: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    seconds: Mapped[float] = mapped_column(Float)
    images_per_second: Mapped[float] = mapped_column(Float)
    lr: Mapped[float] = mapped_column(Float)
    batch_size: Mapped[int | None]
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class SqlRunMetric(Base):
    """One metric of one run, summarised: its last value, its best value and where.

    Kept up to date with every epoch row (:func:`shared.db.summaries.refresh_run_metrics`,
    called by the epoch upsert in the same transaction), so the runs page,
    comparisons and leaderboards sort and rank on an indexed column instead
    of aggregating ``epoch_metrics``: the leaderboard ranks by ``best`` (the
    best value reached), not by the last one. ``metric`` is ``valid_loss``,
    ``train_loss`` or a spec metric.
    """

    __tablename__ = "run_metrics"
    __table_args__ = (
        # Leaderboards and metric sorts: one metric, ordered by value.
        Index("ix_run_metrics_metric_best", "metric", "best"),
        Index("ix_run_metrics_metric_final", "metric", "final"),
        # Counting a leaderboard's runs: an index-only scan joined on the run id.
        Index(
            "ix_run_metrics_metric_run",
            "metric",
            "experiment_id",
            postgresql_include=["best", "final"],
        ),
    )

    experiment_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
    )
    metric: Mapped[str] = mapped_column(String(64), primary_key=True)
    final: Mapped[float | None] = mapped_column(Float)
    best: Mapped[float | None] = mapped_column(Float)
    best_stage: Mapped[str | None] = mapped_column(String(64))
    best_epoch: Mapped[int | None]
    higher_is_better: Mapped[bool] = mapped_column(default=False)
    epochs: Mapped[int] = mapped_column(default=0)


class SqlLrFindPoint(Base):
    """One point of a stage's LR-finder curve (smoothed loss at a learning rate)."""

    __tablename__ = "lr_find_points"

    experiment_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
    )
    stage: Mapped[str] = mapped_column(String(64), primary_key=True)
    step: Mapped[int] = mapped_column(primary_key=True)
    lr: Mapped[float] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)


class SqlArtifact(Base):
    """A file a run produced (checkpoint, plot, report) and where the store keeps it.

    ``name`` is the path under the run's folder (``checkpoints/stage-1.pt``) and
    is unique per run, so re-uploading after a resume replaces the row.
    """

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("experiment_id", "name"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("experiments.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(512))
    uri: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    experiment: Mapped[SqlExperiment] = relationship(back_populates="artifacts")


class SqlEvent(Base):
    """Something that happened, for a run's timeline or the audit log.

    ``experiment_id`` is empty for fleet-wide events (a worker lost, a token
    revoked); ``actor`` is a token id, a worker id or ``system``.
    """

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_experiment_id", "experiment_id", "id"),
        Index("ix_events_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("experiments.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    actor: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SqlWorker(Base):
    """A worker process and the hardware it offers, refreshed by its heartbeat."""

    __tablename__ = "workers"
    __table_args__ = (Index("ix_workers_state_heartbeat", "state", "last_heartbeat"),)

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    queues: Mapped[list[str]] = mapped_column(default=list)
    gpus: Mapped[int] = mapped_column(default=0)
    gpu_model: Mapped[str | None] = mapped_column(String(128))
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    versions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[WorkerState] = mapped_column(
        _string_enum(WorkerState, "state"), default=WorkerState.IDLE
    )
    current_experiment_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("experiments.id", ondelete="SET NULL")
    )
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(default=utcnow)


class SqlOutbox(Base):
    """A message to publish, written in the same transaction as the change it announces.

    The dispatcher reads unsent rows (``sent_at IS NULL``, served by a partial
    index), highest ``priority`` first (the spec's 9 is the most urgent) then
    oldest, publishes ``task`` to
    ``queue`` with ``payload``, and sets ``sent_at``. ``attempts`` and
    ``last_error`` record failed publishes.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        Index(
            "ix_outbox_unsent",
            "priority",
            "id",
            postgresql_where=text("sent_at IS NULL"),
            sqlite_where=text("sent_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    task: Mapped[str] = mapped_column(String(128))
    queue: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(SmallInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
