"""fastai's LR finder: an exponential lr sweep that leaves the learner as it found it.

Reference §4: lr_i = start·(end/start)^(i/num_it) for every layer group; the
recorded loss is smoothed (β 0.98); the sweep stops after num_it batches or,
with ``stop_div``, after the first batch whose smoothed loss exceeds 4× the
best so far (that point is recorded).  No validation runs.  Weights and the
optimizer state are saved in memory first and restored afterwards.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import torch

from shared.results import LrFindResult
from shared.spec import LrFind
from workers.training.data import Batch
from workers.training.learner import ADAM_BETAS, Learner
from workers.training.loop import forward_backward
from workers.training.schedule import Smoother, lr_find_lr, suggest_lr, suggest_minimum


def lr_find(
    learner: Learner,
    epoch_batches: Callable[[int], Iterator[Batch]],
    params: LrFind,
    *,
    stage: str,
    should_stop: Callable[[], bool] = lambda: False,
    accumulate: int = 1,
    agree: Callable[[float, bool], tuple[float, bool]] | None = None,
) -> LrFindResult:
    """Sweep the lr over training batches and suggest one; the learner is restored.

    ``accumulate`` splits every batch in micro-batches (after running out of
    GPU memory) without changing what a step is.
    """
    assert learner.optimizer is not None
    optimizer = learner.optimizer
    model_state = copy.deepcopy(learner.core.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    n_groups = len(learner.groups)
    smoother = Smoother()
    lrs: list[float] = []
    losses: list[float] = []
    best = math.inf
    stopped_early = False
    step = 0
    learner.core.train()
    try:
        epoch = 0
        while step < params.num_it:
            progressed = False
            for x, y in epoch_batches(epoch):
                progressed = True
                lr = lr_find_lr(
                    step, start_lr=params.start_lr, end_lr=params.end_lr, num_it=params.num_it
                )
                learner.set_hyper([lr] * n_groups, ADAM_BETAS[0])
                value = forward_backward(
                    learner, x, y, accumulate, always_backward=agree is not None
                )
                stop = False
                if agree is not None:  # DDP: the ranks' mean loss, one decision for all
                    value, stop = agree(value, should_stop())
                if not math.isfinite(value):
                    stopped_early = True  # a NaN is not recorded: JSON cannot hold it
                    break
                learner.precision.scaler.step(optimizer)
                learner.precision.scaler.update()
                optimizer.zero_grad(set_to_none=True)
                smooth = smoother.add(value)
                lrs.append(lr)
                losses.append(smooth)
                best = smooth if step == 0 else min(best, smooth)
                step += 1
                if step >= params.num_it:
                    break
                if params.stop_div and (smooth > 4 * best or not math.isfinite(smooth)):
                    stopped_early = True
                    break
                if stop or (agree is None and should_stop()):
                    stopped_early = True
                    break
            if stopped_early or not progressed:
                break
            epoch += 1
    finally:
        optimizer.zero_grad(set_to_none=True)
        learner.core.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        optimizer.zero_grad(set_to_none=True)
    return LrFindResult(
        stage=stage,
        lrs=lrs,
        losses=losses,
        suggestion=suggest_lr(params.suggest, lrs, losses),
        suggest_method=params.suggest,
        min_loss_lr_div10=suggest_minimum(lrs, losses),
        stopped_early=stopped_early,
    )


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state (for tests and ``keep: best``)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
