"""What a run produces, as plain models: the engine fills them, the service stores them.

These are the contract between ``workers/training`` (which computes them) and
whatever records them (files for the local CLI, Postgres and S3 for the worker).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Metrics where larger is better; every other series (losses, error_rate) is minimised.
#: One list for the engine's findings, the API's "best" values and the leaderboards.
HIGHER_IS_BETTER = frozenset({"accuracy", "accuracy_thresh", "fbeta"})


def higher_is_better(metric: str) -> bool:
    """Whether a larger ``metric`` is better (accuracy) or worse (a loss, an error rate)."""
    return metric in HIGHER_IS_BETTER


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EpochRow(_Result):
    """One row of fastai's epoch table, plus speed.

    ``train_loss`` is the smoothed loss after the epoch's last batch (fastai's
    Recorder), ``valid_loss`` and metrics are exact means over the validation set.
    ``batch_size`` is the effective (global) batch of one optimizer step; after
    the GPU ran out of memory each process computes it as ``accumulate``
    micro-batches of at most ``micro_batch_size`` images, so it does not change.
    """

    stage: str
    epoch: int  # 0-based, as fastai >= 1.0.47 prints it
    train_loss: float | None
    valid_loss: float | None
    metrics: dict[str, float | None] = Field(default_factory=dict)
    seconds: float
    images_per_second: float
    lr: float  # last layer group's lr at the epoch's last batch
    batch_size: int | None = None
    micro_batch_size: int | None = None  # per process, per forward pass
    accumulate: int = 1  # micro-batches (gradient accumulation) per optimizer step
    # Validation images counted in valid_loss and the metrics, over all DDP ranks:
    # equal to counts["valid"] when nothing was evaluated twice or dropped.
    valid_count: int | None = None


class OomRetry(_Result):
    """The GPU ran out of memory: the epoch was retried with half the micro-batch.

    The global batch (and so the schedule and the optimisation) is unchanged:
    gradients of ``accumulate`` micro-batches add up to one step.
    """

    stage: str
    epoch: int | None  # None: during the stage's lr_find
    batch: int  # batches finished in the epoch when memory ran out
    batch_size: int  # the effective global batch, unchanged
    per_rank_batch: int
    micro_batch_before: int
    micro_batch_after: int
    accumulate: int  # micro-batches per optimizer step from now on
    error: str


class BatchPoint(_Result):
    """Per-batch recorder values (for the loss and lr plots)."""

    iteration: int
    lr: float
    momentum: float
    smooth_loss: float


class LrFindResult(_Result):
    """The LR finder's curve and suggestion (lrs are the last group's)."""

    stage: str
    lrs: list[float]
    losses: list[float]  # smoothed, as fastai records them
    suggestion: float | None
    suggest_method: str
    min_loss_lr_div10: float | None
    stopped_early: bool


class TopLoss(_Result):
    """One of the validation items the model got most wrong."""

    index: int  # into the validation set
    file: str
    predicted: str
    actual: str
    loss: float
    probability: float  # of the actual class


class Interpretation(_Result):
    """fastai's ClassificationInterpretation on the validation set."""

    classes: list[str]
    confusion_matrix: list[list[int]]  # rows = actual, columns = predicted
    most_confused: list[tuple[str, str, int]]
    most_confused_min: int
    top_losses: list[TopLoss]


class Finding(_Result):
    """A checked rule from the notes' "What can go wrong?", with its evidence."""

    code: Literal["diverged", "lr_too_high", "lr_too_low", "too_few_epochs", "overfitting"]
    stage: str
    severity: Literal["info", "warning", "error"]
    message: str
    evidence: dict[str, Any]
    advice: str


class SkippedFile(_Result):
    """A file that was found but not used, and why."""

    path: str
    reason: str


class StageReport(_Result):
    """Everything one stage did."""

    name: str
    train: str
    epochs: int
    schedule: str
    lrs: list[float]  # max lr per layer group, as used
    rows: list[EpochRow] = Field(default_factory=list)
    batches: list[BatchPoint] = Field(default_factory=list)
    lr_find: LrFindResult | None = None
    kept: str = "last"
    kept_epoch: int | None = None
    reverted: bool = False  # keep: better reloaded the previous stage's weights
    diverged: bool = False
    trainable_params: int = 0
    seconds: float = 0.0
    oom_retries: list[OomRetry] = Field(default_factory=list)


class Report(_Result):
    """report.json: the whole run in one document."""

    spec: dict[str, Any]
    status: Literal["succeeded", "failed", "stopped", "running"] = "running"
    error: str | None = None
    classes: list[str] = Field(default_factory=list)
    multi_label: bool = False
    counts: dict[str, int] = Field(default_factory=dict)
    device: str = "cpu"
    world_size: int = 1  # DDP processes that trained the run (nodes x gpus)
    stages: list[StageReport] = Field(default_factory=list)
    interpretation: Interpretation | None = None
    findings: list[Finding] = Field(default_factory=list)
    skipped_files: list[SkippedFile] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    artifacts: list[str] = Field(default_factory=list)
