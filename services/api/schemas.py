"""What the API sends back, one family per resource (``XCreate/XRead/XList``).

The request body of a submission is the experiment spec itself
(:class:`shared.spec.ExperimentSpec`, JSON or YAML), so there is no separate
``ExperimentCreate`` model; :class:`ExperimentCreated` is the 201 answer.
These models are built from ORM rows (``from_attributes``) and never expose
a row directly.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

# Rows carry ``project_id`` (``project`` is the relationship); the API says ``project``.
_PROJECT = AliasChoices("project_id", "project")


class _Read(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ExperimentCreated(_Read):
    """The answer to a submission (201 new, 200 for a repeated Idempotency-Key)."""

    id: str
    state: str
    name: str
    project: str = Field(validation_alias=_PROJECT)
    created_at: datetime


class EpochMetricRead(_Read):
    """One epoch row: losses, metrics and speed, as the worker recorded it."""

    stage: str
    epoch: int
    attempt: int
    train_loss: float | None
    valid_loss: float | None
    metrics: dict[str, Any]
    seconds: float
    images_per_second: float
    lr: float
    batch_size: int | None
    recorded_at: datetime


class ExperimentSummary(_Read):
    """A run as listed: enough to filter and compare, without the spec."""

    id: str
    name: str
    project: str = Field(validation_alias=_PROJECT)
    state: str
    attempt: int
    queue: str
    priority: int
    arch: str
    dataset: str
    tags: list[str]
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ExperimentRead(ExperimentSummary):
    """One run in full: where it is now, its latest epoch, its error and its spec."""

    current_stage: str | None
    current_epoch: int | None
    error: str | None
    submitted_by: str | None
    latest_metrics: EpochMetricRead | None
    spec: dict[str, Any]


class ExperimentList(BaseModel):
    """A page of runs and the total matching the filters (for page counts)."""

    items: list[ExperimentSummary]
    count: int
    limit: int
    offset: int


class ArtifactRead(_Read):
    """A file a run produced and where the store keeps it."""

    id: int
    kind: str
    name: str
    uri: str
    bytes: int
    sha256: str
    created_at: datetime


class ArtifactList(BaseModel):
    """Every artifact of one run."""

    items: list[ArtifactRead]
    count: int


class LrFindStage(BaseModel):
    """One stage's LR-finder curve and the suggestion it led to."""

    stage: str
    points: list[tuple[float, float | None]]  # (lr, smoothed loss)
    suggestion: float | None
    method: str | None


class LrFindRead(BaseModel):
    """Every LR-finder curve of a run."""

    stages: list[LrFindStage]


class ComparedRun(BaseModel):
    """One run in a comparison: what it is, where it ended, the best it reached, its curve."""

    experiment: ExperimentSummary
    final: EpochMetricRead | None
    best: dict[str, float]
    epochs: list[EpochMetricRead]


class Comparison(BaseModel):
    """Runs side by side, with only the spec fields that differ."""

    ids: list[str]
    spec_differences: dict[str, list[Any]]
    runs: list[ComparedRun]
