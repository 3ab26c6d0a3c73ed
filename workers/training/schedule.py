"""Learning-rate and momentum schedules as pure functions of the step.

Everything here is fastai v1.0.61's arithmetic (reference §3, §4), written as
plain functions so each oracle of the reference is a one-line unit test and the
training loop never keeps schedule state of its own: the step number, saved in
every checkpoint, is the whole schedule position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

DEFAULT_MAX_LR = 3e-3
SMOOTH_BETA = 0.98


def cos_anneal(start: float, end: float, pct: float) -> float:
    """Cosine from ``start`` (pct=0) to ``end`` (pct=1)."""
    return end + (start - end) * (1 + math.cos(math.pi * pct)) / 2


def one_cycle_phase_lengths(total: int, pct_start: float) -> tuple[int, int]:
    """(a1, a2): batches in the warm-up and the annealing phase."""
    a1 = int(total * pct_start)
    return a1, total - a1


def one_cycle_lr(
    step: int,
    total: int,
    max_lr: float,
    *,
    div_factor: float = 25.0,
    pct_start: float = 0.3,
    final_div: float | None = None,
) -> float:
    """fastai's one-cycle lr for training batch ``step`` of ``total`` (0-based).

    Warm-up: cosine from max_lr/div_factor up to max_lr at step a1; then cosine
    down towards max_lr/final_div (final_div defaults to div_factor*1e4).
    """
    final = div_factor * 1e4 if final_div is None else final_div
    a1, a2 = one_cycle_phase_lengths(total, pct_start)
    if a1 > 0 and step <= a1:
        return cos_anneal(max_lr / div_factor, max_lr, step / a1)
    return cos_anneal(max_lr, max_lr / final, (step - a1) / max(a2, 1))


def one_cycle_momentum(
    step: int,
    total: int,
    *,
    moms: tuple[float, float] = (0.95, 0.85),
    pct_start: float = 0.3,
) -> float:
    """Adam's beta1 under one-cycle: the mirror image of the lr."""
    a1, a2 = one_cycle_phase_lengths(total, pct_start)
    if a1 > 0 and step <= a1:
        return cos_anneal(moms[0], moms[1], step / a1)
    return cos_anneal(moms[1], moms[0], (step - a1) / max(a2, 1))


def lr_range(max_lr: float | Sequence[float] | None, n_groups: int) -> list[float]:
    """Per-layer-group learning rates, fastai's ``Learner.lr_range``.

    * a number: the same lr for every group;
    * ``[high]`` (fastai ``slice(high)``): high/10 for all groups but the last;
    * ``[low, high]`` (fastai ``slice(low, high)``): geometric from low to high;
    * None: fastai's default ``slice(3e-3)``.
    """
    if max_lr is None:
        max_lr = [DEFAULT_MAX_LR]
    if isinstance(max_lr, int | float):
        return [float(max_lr)] * n_groups
    values = [float(v) for v in max_lr]
    if len(values) == 1:
        return [values[0] / 10] * (n_groups - 1) + [values[0]]
    if len(values) == 2:
        low, high = values
        if n_groups == 1:
            return [high]
        return [low * (high / low) ** (i / (n_groups - 1)) for i in range(n_groups)]
    if len(values) != n_groups:
        raise ValueError(f"{len(values)} learning rates for {n_groups} layer groups")
    return values


def lr_find_lr(step: int, *, start_lr: float, end_lr: float, num_it: int) -> float:
    """The LR finder's exponential sweep: start*(end/start)^(step/num_it)."""
    return float(start_lr * (end_lr / start_lr) ** (step / num_it))


class Smoother:
    """fastai's SmoothenValue: an EMA with bias correction (beta 0.98).

    Its state is two numbers so that a checkpoint can carry it and a resumed
    epoch prints exactly the train_loss an uninterrupted one would have.
    """

    def __init__(self, beta: float = SMOOTH_BETA, *, mov_avg: float = 0.0, n: int = 0) -> None:
        self.beta = beta
        self.mov_avg = mov_avg
        self.n = n

    def add(self, value: float) -> float:
        """Take one raw value; return the smoothed value so far."""
        self.n += 1
        self.mov_avg = self.beta * self.mov_avg + (1 - self.beta) * value
        return self.value

    @property
    def value(self) -> float:
        """The bias-corrected moving average."""
        if self.n == 0:
            return math.nan
        return self.mov_avg / (1 - self.beta**self.n)

    def state(self) -> dict[str, float]:
        """What a checkpoint stores."""
        return {"beta": self.beta, "mov_avg": self.mov_avg, "n": self.n}

    @classmethod
    def from_state(cls, state: dict[str, float]) -> Smoother:
        """Rebuild from :meth:`state`."""
        return cls(state["beta"], mov_avg=state["mov_avg"], n=int(state["n"]))


def smooth(values: Sequence[float], beta: float = SMOOTH_BETA) -> list[float]:
    """Smoothed values of a whole sequence (for tests and plots)."""
    smoother = Smoother(beta)
    return [smoother.add(v) for v in values]


def _trim(
    lrs: Sequence[float], losses: Sequence[float], skip_start: int, skip_end: int
) -> tuple[list[float], list[float], int]:
    """Cut the noisy ends like Recorder.plot, unless too little would be left."""
    end = len(losses) - skip_end if skip_end else len(losses)
    if end - skip_start < 2:
        return list(lrs), list(losses), 0
    return list(lrs[skip_start:end]), list(losses[skip_start:end]), skip_start


def _gradient(values: Sequence[float]) -> list[float]:
    """numpy.gradient with unit spacing: central differences, one-sided at the ends."""
    n = len(values)
    if n < 2:
        return [0.0] * n
    grads = [values[1] - values[0]]
    grads += [(values[i + 1] - values[i - 1]) / 2 for i in range(1, n - 1)]
    grads.append(values[-1] - values[-2])
    return grads


def _finite_prefix(
    lrs: Sequence[float], losses: Sequence[float]
) -> tuple[list[float], list[float]]:
    """Everything before the first non-finite loss."""
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            return list(lrs[:i]), list(losses[:i])
    return list(lrs), list(losses)


def suggest_steep(
    lrs: Sequence[float], losses: Sequence[float], *, skip_start: int = 10, skip_end: int = 5
) -> float | None:
    """fastai v1's ``min_grad_lr``: the lr where the trimmed loss falls fastest."""
    lrs, losses = _finite_prefix(lrs, losses)
    t_lrs, t_losses, _ = _trim(lrs, losses, skip_start, skip_end)
    if len(t_losses) < 2:
        return None
    grads = _gradient(t_losses)
    return t_lrs[min(range(len(grads)), key=grads.__getitem__)]


def suggest_minimum(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """fastai's other printed value: the lr at the loss minimum, divided by 10."""
    lrs, losses = _finite_prefix(lrs, losses)
    if not losses:
        return None
    return lrs[min(range(len(losses)), key=losses.__getitem__)] / 10


def suggest_valley(
    lrs: Sequence[float], losses: Sequence[float], *, skip_start: int = 10, skip_end: int = 5
) -> float | None:
    """fastai 2's ``valley``: inside the longest decreasing run, a third plus a sixth in."""
    lrs, losses = _finite_prefix(lrs, losses)
    t_lrs, t_losses, _ = _trim(lrs, losses, skip_start, skip_end)
    n = len(t_losses)
    if n < 2:
        return None
    # Longest decreasing subsequence ending at each index (dynamic programming).
    length = [1] * n
    for i in range(1, n):
        for j in range(i):
            if t_losses[i] < t_losses[j] and length[j] + 1 > length[i]:
                length[i] = length[j] + 1
    end = max(range(n), key=length.__getitem__)
    run = length[end]
    # fastai 2's index arithmetic: start = end - run, then run/3 + run/6 further in
    # (clamped at 0 where fastai's negative index would wrap to the last lr).
    idx = end - run + run // 3 + run // 6
    return t_lrs[max(0, min(idx, n - 1))]


def suggest_lr(method: str, lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """Dispatch to a named suggestion rule."""
    if method == "steep":
        return suggest_steep(lrs, losses)
    if method == "minimum":
        return suggest_minimum(lrs, losses)
    if method == "valley":
        return suggest_valley(lrs, losses)
    raise ValueError(f"unknown lr suggestion rule {method!r}")
