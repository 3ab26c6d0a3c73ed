"""A reporter for the terminal: a progress bar per epoch and fastai's epoch table."""

from __future__ import annotations

import math
import signal
import types
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from shared.results import EpochRow, LrFindResult
from workers.training.reporter import NullReporter


def format_value(value: float | None) -> str:
    """fastai prints 6 decimals and ``#na#`` for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "#na#"
    return f"{value:.6f}"


def format_time(seconds: float) -> str:
    """mm:ss like fastai's epoch table."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


class ConsoleReporter(NullReporter):
    """Prints the run as it goes; Ctrl-C asks the engine to checkpoint and stop."""

    def __init__(self, console: Console, metrics: list[str]) -> None:
        self.console = console
        self.metrics = metrics
        self.stop_requested = False
        self._progress: Progress | None = None
        self._task: Any = None
        self._header_for: str | None = None
        self.widths: list[int] = []
        self._previous_handler: Any = None

    # -- Ctrl-C -------------------------------------------------------------------------

    def install_interrupt(self) -> None:
        """First Ctrl-C: stop after a checkpoint. Second: the usual KeyboardInterrupt."""

        def handler(signum: int, frame: types.FrameType | None) -> None:
            if self.stop_requested:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.stop_requested = True
            self.console.print("\n[yellow]stopping after a checkpoint (Ctrl-C again to abort)[/]")

        self._previous_handler = signal.signal(signal.SIGINT, handler)

    def restore_interrupt(self) -> None:
        """Put the previous SIGINT handler back."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)

    def should_stop(self) -> bool:
        """Polled by the engine between batches."""
        return self.stop_requested

    # -- progress -----------------------------------------------------------------------

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Events as dim lines."""
        self._close_bar()
        self.console.print(f"[dim]{kind}: {message}[/]")

    def on_stage_start(self, stage: str, index: int, epochs: int, batches_per_epoch: int) -> None:
        """A heading and the table header."""
        self._close_bar()
        self.console.print(
            f"\n[bold]{stage}[/] ({epochs} epochs, {batches_per_epoch} batches each)"
        )
        columns = ["epoch", "train_loss", "valid_loss", *self.metrics, "time"]
        self.widths = [max(len(c), 8) for c in columns]
        self.console.print(
            "  ".join(f"{c:>{w}}" for c, w in zip(columns, self.widths, strict=True)),
            soft_wrap=True,
            highlight=False,
        )
        self._header_for = stage

    def on_batch(self, stage: str, epoch: int, batch: int, batches: int, loss: float) -> None:
        """Advance the epoch's progress bar."""
        if not self.console.is_terminal:
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn(f"epoch {epoch}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=batches, loss=loss)
        self._progress.update(self._task, completed=batch, loss=loss)

    def on_epoch(self, row: EpochRow) -> None:
        """One row of the epoch table."""
        self._close_bar()
        cells = [
            str(row.epoch),
            format_value(row.train_loss),
            format_value(row.valid_loss),
            *(format_value(row.metrics.get(m)) for m in self.metrics),
            format_time(row.seconds),
        ]
        widths = self.widths or [10] * len(cells)
        self.console.print(
            "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=False)),
            soft_wrap=True,
            highlight=False,
        )

    def on_lr_find(self, result: LrFindResult) -> None:
        """The finder's suggestion."""
        self._close_bar()
        suggestion = "none" if result.suggestion is None else f"{result.suggestion:.3g}"
        self.console.print(
            f"lr_find ({len(result.lrs)} points): suggested lr {suggestion} "
            f"({result.suggest_method}); loss minimum / 10: "
            f"{'none' if result.min_loss_lr_div10 is None else f'{result.min_loss_lr_div10:.3g}'}"
        )

    def on_artifact(self, kind: str, path: Path) -> None:
        """Files are listed at the end, not one by one."""

    def _close_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
