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
    # Why a queued run has not started, when the live fleet cannot place it now
    # (e.g. "needs 2 nodes with 8 GPUs; 1 is idle"); None otherwise.
    waiting_reason: str | None = None


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


# --- admin: the fleet and its queues ------------------------------------------


class WorkerRead(_Read):
    """A worker as ``GET /v1/admin/workers`` shows it; ``state`` is lost once it stops beating."""

    id: str
    hostname: str
    queues: list[str]
    gpus: int
    gpu_model: str | None
    memory_bytes: int | None
    versions: dict[str, Any]
    state: str
    current_experiment_id: str | None
    started_at: datetime
    last_heartbeat: datetime
    seconds_since_heartbeat: float


class WorkerList(BaseModel):
    """Every worker the fleet has seen (live first), and the rule that makes one lost."""

    workers: list[WorkerRead]
    lost_after_s: float


class WaitingRunRead(_Read):
    """A queued or dispatched run, its place in line, and why it has not started."""

    id: str
    state: str
    priority: int
    created_at: datetime
    age_seconds: float
    position: int
    gpus: int
    nodes: int
    placeable_ever: bool
    placeable_now: bool
    reason: str | None


class QueueRead(_Read):
    """One queue: depth in the database and in the broker, oldest waiting run, workers.

    ``broker_depth`` is None when the broker could not be asked (see
    ``broker_error`` on the list).
    """

    name: str
    database_depth: int
    queued: int
    dispatched: int
    running: int
    broker_depth: int | None
    oldest_waiting_id: str | None
    oldest_waiting_age_seconds: float | None
    live_workers: int
    idle_workers: int
    lost_workers: int
    waiting: list[WaitingRunRead]


class QueueList(BaseModel):
    """Every known queue; ``broker_error`` says why broker depths are missing, if they are."""

    queues: list[QueueRead]
    broker_error: str | None


# --- dashboard queries: runs with their metrics, leaderboards, failures, events, sweeps -----


class MetricSummaryRead(_Read):
    """One metric of one run: the last value logged, the best value and where it was reached.

    ``best`` follows the metric's direction (lowest loss or error, highest
    accuracy); ``epochs`` counts the epoch rows that carried the metric.
    """

    final: float | None
    best: float | None
    best_stage: str | None
    best_epoch: int | None
    higher_is_better: bool
    epochs: int


class RunRow(ExperimentSummary):
    """A run on the runs page: its summary, progress, and every metric's final and best.

    ``progress`` is epochs done over the spec's total epochs (0..1); None
    before the first epoch row.
    """

    current_stage: str | None
    current_epoch: int | None
    epochs_done: int
    epochs_total: int
    progress: float | None
    sweep_id: str | None
    error: str | None
    metrics: dict[str, MetricSummaryRead]


class RunPage(BaseModel):
    """A page of the runs page; ``sort`` echoes how it was ordered."""

    items: list[RunRow]
    count: int
    limit: int
    offset: int
    sort: str


class LeaderboardEntry(BaseModel):
    """One place on a leaderboard: the run and the best value it reached (not its last)."""

    rank: int
    run: RunRow
    best: float
    best_stage: str | None
    best_epoch: int | None
    final: float | None


class Leaderboard(BaseModel):
    """Runs ranked by the best value of one metric, for one dataset or one sweep."""

    metric: str
    higher_is_better: bool
    dataset: str | None
    sweep: str | None
    count: int
    entries: list[LeaderboardEntry]


class DatasetRead(BaseModel):
    """A dataset runs were trained on, how many, and which metrics they logged."""

    dataset: str
    runs: int
    metrics: list[str]


class DatasetList(BaseModel):
    """Every dataset the caller's runs used (the leaderboard's picker)."""

    items: list[DatasetRead]


class FailureGroup(BaseModel):
    """Failed runs that share a reason (ids, numbers and paths blanked out to group them)."""

    reason: str
    example: str
    count: int
    first_at: datetime
    last_at: datetime
    experiment_ids: list[str]  # the newest, at most 20


class FailureList(BaseModel):
    """Failed runs grouped by reason, largest group first."""

    groups: list[FailureGroup]
    total: int


class EventRead(_Read):
    """One entry of a run's timeline (submit, claim, stage, retry, cancel, finish)."""

    id: int
    kind: str
    message: str
    data: dict[str, Any]
    actor: str | None
    created_at: datetime


class EventList(BaseModel):
    """A run's events after ``after`` (for following), oldest first."""

    items: list[EventRead]
    last_id: int | None


class CallerRead(BaseModel):
    """Who a token is: ``GET /v1/me``."""

    token_id: str | None
    project: str | None
    is_admin: bool


class SweepCreate(BaseModel):
    """``POST /v1/sweeps``: a base spec and the choices to expand it over.

    ``parameters`` maps a dotted spec path (``model.arch``, ``data.size``,
    ``stages.1.max_lr``, ``stages.*.epochs`` for every stage) to a list of
    values, or for ``random`` also to a range ``{"low", "high", "log", "integer"}``.
    ``grid`` makes every combination; ``random`` draws ``count`` of them with ``seed``.
    """

    name: str = Field(min_length=1, max_length=200)
    spec: dict[str, Any]
    strategy: str = Field("grid", pattern="^(grid|random)$")
    parameters: dict[str, Any]
    count: int | None = Field(None, ge=1)
    seed: int = 0


class SweepTrial(BaseModel):
    """One experiment of a sweep and the choices that made it."""

    experiment_id: str
    values: dict[str, Any]


class SweepRead(BaseModel):
    """A sweep: what it expanded and where its runs are."""

    id: str
    name: str
    project: str
    strategy: str
    parameters: dict[str, Any]
    seed: int
    created_at: datetime
    count: int
    states: dict[str, int]
    trials: list[SweepTrial]


class SweepList(BaseModel):
    """Sweeps the caller may see, newest first."""

    items: list[SweepRead]
    count: int
