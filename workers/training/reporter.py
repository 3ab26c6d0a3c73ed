"""The only way the engine talks to the outside world.

The engine knows nothing of files, databases or queues beyond its own run
folder: it calls a :class:`Reporter`.  The local CLI passes one that prints,
the worker one that writes Postgres and uploads to the artifact store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from shared.results import EpochRow, LrFindResult


class Reporter(Protocol):
    """What the engine tells, as it happens (rank 0 only)."""

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Something worth a line in the run's event log."""

    def on_stage_start(self, stage: str, index: int, epochs: int, batches_per_epoch: int) -> None:
        """A stage begins (or resumes)."""

    def on_batch(self, stage: str, epoch: int, batch: int, batches: int, loss: float) -> None:
        """A training batch ended; cheap to call, for progress bars."""

    def on_epoch(self, row: EpochRow) -> None:
        """An epoch ended: one row of the epoch table."""

    def on_lr_find(self, result: LrFindResult) -> None:
        """The LR finder finished."""

    def on_artifact(self, kind: str, path: Path) -> None:
        """A file was written in the run folder (checkpoint, plot, report, predictions)."""

    def should_stop(self) -> bool:
        """Polled between batches: True asks the engine to checkpoint and stop."""
        return False


class NullReporter:
    """A reporter that records nothing; subclass it and override what you need."""

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Ignore events."""

    def on_stage_start(self, stage: str, index: int, epochs: int, batches_per_epoch: int) -> None:
        """Ignore stage starts."""

    def on_batch(self, stage: str, epoch: int, batch: int, batches: int, loss: float) -> None:
        """Ignore batches."""

    def on_epoch(self, row: EpochRow) -> None:
        """Ignore epochs."""

    def on_lr_find(self, result: LrFindResult) -> None:
        """Ignore the LR finder."""

    def on_artifact(self, kind: str, path: Path) -> None:
        """Ignore artifacts."""

    def should_stop(self) -> bool:
        """Never stop."""
        return False
