"""One epoch of training and one pass of validation.

The schedule position is the global step of the stage (``StageCursor.step``):
with it the lr and momentum of every batch are pure functions
(:mod:`workers.training.schedule`), so resuming needs no scheduler state.
The loss of every batch is smoothed exactly as fastai's Recorder does and the
smoother's two numbers are part of the cursor.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from shared.errors import Diverged
from shared.results import BatchPoint
from shared.spec import Stage
from workers.training.data import Batch
from workers.training.learner import Learner
from workers.training.metrics import METRICS
from workers.training.schedule import Smoother, one_cycle_lr, one_cycle_momentum

AllReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StageCursor:
    """Where a stage is: enough to resume it at an epoch or a batch boundary."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # batches finished in the current epoch
    step: int = 0  # batches finished in the stage (the schedule position)
    smoother: Smoother = field(default_factory=Smoother)
    points: list[BatchPoint] = field(default_factory=list)
    epoch_seconds: float = 0.0  # time already spent on the current epoch

    def state(self) -> dict[str, object]:
        """Plain values for a checkpoint."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "smoother": self.smoother.state(),
            "points": [p.model_dump() for p in self.points],
            "epoch_seconds": self.epoch_seconds,
        }

    @classmethod
    def from_state(cls, state: dict[str, object]) -> StageCursor:
        """Rebuild from :meth:`state`."""
        points = state.get("points", [])
        smoother = state["smoother"]
        assert isinstance(points, list)
        assert isinstance(smoother, dict)
        return cls(
            epoch=int(str(state["epoch"])),
            batch=int(str(state["batch"])),
            step=int(str(state["step"])),
            smoother=Smoother.from_state(smoother),
            points=[BatchPoint.model_validate(p) for p in points],
            epoch_seconds=float(str(state.get("epoch_seconds", 0.0))),
        )


def stage_hyper(
    stage: Stage, step: int, total: int, lrs: Sequence[float]
) -> tuple[list[float], float]:
    """The lrs (per layer group) and beta1 of batch ``step`` of the stage."""
    if stage.schedule == "constant":
        return list(lrs), ADAM_BETA1_CONSTANT
    per_group = [
        one_cycle_lr(
            step,
            total,
            lr,
            div_factor=stage.div_factor,
            pct_start=stage.pct_start,
            final_div=stage.final_div,
        )
        for lr in lrs
    ]
    momentum = one_cycle_momentum(step, total, moms=stage.moms, pct_start=stage.pct_start)
    return per_group, momentum


ADAM_BETA1_CONSTANT = 0.9


class StopRequested(Exception):
    """Raised inside an epoch when the reporter asked to stop; the cursor is consistent."""


def forward_backward(
    learner: Learner,
    x: torch.Tensor,
    y: torch.Tensor,
    accumulate: int = 1,
    *,
    always_backward: bool = False,
) -> float:
    """Forward and backward over one batch, in ``accumulate`` micro-batches.

    Each micro-batch's mean loss is weighted by its share of the batch
    (its size over the batch's), so the summed gradients are the gradient of
    the whole batch's mean loss, and the value returned is that mean.  Under
    DDP only the last micro-batch synchronises gradients (``no_sync``).  A
    non-finite micro-batch loss is returned at once, before its backward pass,
    unless ``always_backward``: under DDP every rank must run the same backward
    passes (they all-reduce gradients), so a NaN is carried to the step's
    agreement instead.
    """
    scaler = learner.precision.scaler
    parts = max(1, min(accumulate, int(x.shape[0])))
    if parts == 1:
        loss = learner.loss(learner.forward(x), y)
        value = float(loss.detach())
        if always_backward or math.isfinite(value):
            torch.autograd.backward(scaler.scale(loss))
        return value
    no_sync = getattr(learner.model, "no_sync", None)
    full = int(x.shape[0])
    total = 0.0
    chunks = zip(torch.tensor_split(x, parts), torch.tensor_split(y, parts), strict=True)
    for number, (x_part, y_part) in enumerate(chunks):
        last = number == parts - 1
        context = no_sync() if no_sync is not None and not last else contextlib.nullcontext()
        with context:
            loss = learner.loss(learner.forward(x_part), y_part)
            value = float(loss.detach())
            if not math.isfinite(value) and not always_backward:
                return value
            weight = int(x_part.shape[0]) / full
            torch.autograd.backward(scaler.scale(loss * weight))
        total += value * weight
    return total


def train_epoch(
    learner: Learner,
    batches: Iterator[Batch],
    *,
    stage: Stage,
    cursor: StageCursor,
    total_steps: int,
    lrs: Sequence[float],
    on_batch: Callable[[int, float], None],
    should_stop: Callable[[], bool],
    accumulate: int = 1,
    agree: Callable[[float, bool], tuple[float, bool]] | None = None,
) -> int:
    """Train over ``batches`` from ``cursor.batch`` on; returns images seen.

    Every batch is one optimizer step; with ``accumulate`` > 1 it is split in
    that many micro-batches whose gradients add up (see :func:`forward_backward`),
    so the schedule, the cursor and the recorded losses count whole batches.
    Raises Diverged on a non-finite loss and StopRequested (after the cursor
    points at the next batch) when ``should_stop`` says so.  Under DDP
    ``agree`` turns each rank's loss and stop wish into the ranks' mean loss
    and "any rank wants to stop", so all ranks take the same decision at the
    same step (a rank that stopped alone would leave the others waiting).
    """
    assert learner.optimizer is not None
    optimizer = learner.optimizer
    scaler = learner.precision.scaler
    learner.core.train()
    seen = 0
    for x, y in batches:
        lr_now, momentum = stage_hyper(stage, cursor.step, total_steps, lrs)
        learner.set_hyper(lr_now, momentum)
        value = forward_backward(learner, x, y, accumulate, always_backward=agree is not None)
        stop = False
        if agree is not None:
            value, stop = agree(value, should_stop())
        if not math.isfinite(value):
            optimizer.zero_grad(set_to_none=True)
            raise Diverged(
                f"stage {stage.name}: the training loss became {value} at epoch {cursor.epoch}, "
                f"batch {cursor.batch} (lr {lr_now[-1]:.3g}): the learning rate is too high"
            )
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        smooth = cursor.smoother.add(value)
        cursor.points.append(
            BatchPoint(iteration=cursor.step, lr=lr_now[-1], momentum=momentum, smooth_loss=smooth)
        )
        cursor.step += 1
        cursor.batch += 1
        seen += int(x.shape[0])
        on_batch(cursor.batch, smooth)
        if stop or (agree is None and should_stop()):
            raise StopRequested
    return seen


@dataclass
class Validation:
    """Exact means over the validation set, and what interpretation needs."""

    loss: float | None
    metrics: dict[str, float | None]
    count: int
    logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    indices: torch.Tensor | None = None


def validate(
    learner: Learner,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    metrics: Sequence[str],
    *,
    all_reduce: AllReduce | None = None,
    keep_outputs: bool = False,
) -> Validation:
    """Σ(loss)/N and Σ(metric)/N over the whole set (fastai's weighting, oracle 20).

    ``all_reduce`` sums the totals across DDP ranks, each rank holding a
    disjoint part of the set, so the result equals single-process evaluation.
    """
    totals = torch.zeros(2 + len(metrics), dtype=torch.float64)
    kept_logits: list[torch.Tensor] = []
    kept_targets: list[torch.Tensor] = []
    kept_indices: list[torch.Tensor] = []
    with learner.evaluating():
        for x, y, idx in batches:
            logits = learner.forward(x).float()
            totals[0] += float(learner.loss(logits, y, reduction="sum"))
            totals[1] += x.shape[0]
            for i, name in enumerate(metrics):
                totals[2 + i] += float(METRICS[name](logits, y))
            if keep_outputs:
                kept_logits.append(logits.cpu())
                kept_targets.append(y.cpu())
                kept_indices.append(idx)
    if all_reduce is not None:
        totals = all_reduce(totals)
    count = int(totals[1])
    if count == 0:
        return Validation(None, dict.fromkeys(metrics), 0)
    return Validation(
        loss=float(totals[0] / count),
        metrics={name: float(totals[2 + i] / count) for i, name in enumerate(metrics)},
        count=count,
        logits=torch.cat(kept_logits) if kept_logits else None,
        targets=torch.cat(kept_targets) if kept_targets else None,
        indices=torch.cat(kept_indices) if kept_indices else None,
    )
