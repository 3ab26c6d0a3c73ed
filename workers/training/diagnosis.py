"""The notes' "What can go wrong?" as rules checked on a finished run's epoch tables.

The course says that, when defaults fail, it is nearly always the learning
rate or the number of epochs, and names four symptoms (reference §8, R1–R4).
Here each one is a rule over a stage's :class:`EpochRow` list, plus outright
divergence.  The thresholds below are **our own choices** (the course gives
examples, not numbers); they are module constants so they are visible,
documented and testable:

* ``diverged`` (error): the engine flagged the stage as diverged, or a train
  or valid loss is NaN/inf.  Nothing else is checked for that stage.
* ``lr_too_high`` (error, R1): at some epoch the valid loss *blew up* — it is
  above :data:`BLOWUP_MIN_LOSS` (the notes: a healthy valid loss "is usually
  below 1") **and** more than :data:`BLOWUP_FACTOR` x the stage's first valid
  loss, or x the same epoch's train loss, or x the loss of a uniform guess
  (ln C) — **and** the error is near chance (``>= 1 - 1/C - CHANCE_MARGIN``).
  Near-chance is required because a blown-up loss alone also happens to a
  confident, overfit model; when no single-label error metric is available
  (multi-label), the loss blow-up alone decides.
* ``lr_too_low`` (warning, R2): at the stage's end train loss exceeds valid
  loss (by :data:`UNDERFIT_RATIO`) **and** the error fell slowly: over two or
  more epochs it did not even halve (last > :data:`SLOW_FALL_RATIO` x first)
  and is still at least :data:`SLOW_MIN_ERROR`.
* ``too_few_epochs`` (info, R3): train loss exceeds valid loss at the end but
  the error is not falling slowly (or there is a single epoch, where the two
  causes cannot be told apart — the notes: "too few epochs and too low
  learning rate look similar").  Never emitted together with ``lr_too_low``.
* ``overfitting`` (warning, R4): after the best (lowest) error, at least
  :data:`OVERFIT_MIN_EPOCHS` later epochs stayed above it, the error rose two
  epochs in a row somewhere after it, and the last epoch ends worse than the
  best by ``max(OVERFIT_ABS_MARGIN, OVERFIT_REL_MARGIN x best)``.  When it
  fires, ``too_few_epochs`` is not emitted for that stage (contradictory advice).

Train loss *below* valid loss is never flagged: the notes are explicit that
this is how a correctly trained model looks, not overfitting.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

from shared.results import HIGHER_IS_BETTER, EpochRow, Finding, StageReport

#: A valid loss counts as blown up only above this (the notes: "it is usually below 1").
BLOWUP_MIN_LOSS = 1.0
#: ... and when it exceeds this multiple of a reference loss (first epoch, train, uniform guess).
BLOWUP_FACTOR = 10.0
#: The error is "near chance" within this much of 1 - 1/n_classes.
CHANCE_MARGIN = 0.1
#: "train loss > valid loss" needs this ratio, so near-equal noisy losses do not count.
UNDERFIT_RATIO = 1.05
#: The error "fell slowly" when its last value is above this fraction of its first ...
SLOW_FALL_RATIO = 0.5
#: ... and still at least this high (an error already this low is not "too slow").
SLOW_MIN_ERROR = 0.10
#: Overfitting needs at least this many epochs after the best one, all above it.
OVERFIT_MIN_EPOCHS = 2
#: ... and the final error above the best by max(ABS, REL x best).
OVERFIT_ABS_MARGIN = 0.01
OVERFIT_REL_MARGIN = 0.10

#: Metrics for which "chance" is 1 - 1/n_classes (single-label argmax metrics).
_SINGLE_LABEL = frozenset({"error_rate", "accuracy"})

_ADVICE_LR_TOO_HIGH = (
    "The learning rate was too high and training cannot recover from this: re-create the "
    "learner (or reload the previous stage's weights) and train again with a lower learning "
    "rate (the default 3e-3, or one from the steep part of the lr_find curve)."
)
_ADVICE_LR_TOO_LOW = (
    "The error rate decreases too slowly and training loss > validation loss (it should be the "
    "opposite): the learning rate is too low. Raise the LR by 10–100x."
)
_ADVICE_TOO_FEW_EPOCHS = (
    "Training loss > validation loss means the model is still underfitting: train more epochs. "
    "If that is slow, raise the learning rate; if the loss then explodes, go back."
)
_ADVICE_OVERFITTING = (
    "The error rate improved for a while and then got worse: too many epochs (overfitting). "
    "Use fewer epochs{hint}."
)

Severity = Literal["info", "warning", "error"]


def diagnose(
    stages: Sequence[StageReport], *, n_classes: int, error_metric: str = "error_rate"
) -> list[Finding]:
    """Check every stage against the notes' rules and return what fired, stage by stage.

    Args:
        stages: the run's stages with their epoch tables.
        n_classes: number of classes, for the chance-level error (1 - 1/C) and loss (ln C).
        error_metric: metric to read as the error.  ``accuracy``-like metrics
            are turned into ``1 - value``; if the metric is absent, ``error_rate``
            and then ``accuracy`` are tried before the error-based rules give up.

    Returns:
        Findings in stage order; within a stage: diverged, lr_too_high,
        lr_too_low, too_few_epochs, overfitting.
    """
    findings: list[Finding] = []
    for stage in stages:
        findings.extend(_diagnose_stage(stage, n_classes=n_classes, error_metric=error_metric))
    return findings


def format_findings(findings: Sequence[Finding]) -> list[str]:
    """One terminal line per finding: severity, stage, code, message and advice."""
    return [
        f"{f.severity.upper():<7} [{f.stage}] {f.code}: {f.message} Advice: {f.advice}"
        for f in findings
    ]


# --- per stage ------------------------------------------------------------------------------


def _diagnose_stage(stage: StageReport, *, n_classes: int, error_metric: str) -> list[Finding]:
    """All findings for one stage; a diverged or blown-up stage gets no further rules."""
    rows = list(stage.rows)
    diverged = _check_diverged(stage, rows)
    if diverged is not None:
        return [diverged]
    if not rows:
        return []
    metric, errors = _error_series(rows, error_metric)
    chance = _chance_error(metric, n_classes)

    too_high = _check_lr_too_high(stage, rows, errors, chance, n_classes, metric)
    if too_high is not None:
        return [too_high]

    out: list[Finding] = []
    overfit = _check_overfitting(stage, errors, metric)
    underfit = _check_underfitting(stage, rows, errors, metric)
    if underfit is not None and not (overfit is not None and underfit.code == "too_few_epochs"):
        out.append(underfit)
    if overfit is not None:
        out.append(overfit)
    return out


def _check_diverged(stage: StageReport, rows: list[EpochRow]) -> Finding | None:
    """Engine-flagged divergence or any non-finite loss in the table."""
    bad = [
        {"epoch": row.epoch, "train_loss": _num(row.train_loss), "valid_loss": _num(row.valid_loss)}
        for row in rows
        if not (_finite_or_none(row.train_loss) and _finite_or_none(row.valid_loss))
    ]
    if not stage.diverged and not bad:
        return None
    if bad:
        first = bad[0]
        what = (
            f"a non-finite loss at epoch {first['epoch']} "
            f"(train {first['train_loss']}, valid {first['valid_loss']})"
        )
    else:
        what = "a non-finite training loss (the engine stopped the stage)"
    return _finding(
        "diverged",
        stage,
        "error",
        f"Stage '{stage.name}' diverged: {what}.",
        {"flagged_by_engine": stage.diverged, "non_finite": bad, "max_lr": stage.lrs},
        _ADVICE_LR_TOO_HIGH,
    )


def _check_lr_too_high(
    stage: StageReport,
    rows: list[EpochRow],
    errors: dict[int, float],
    chance: float | None,
    n_classes: int,
    metric: str | None,
) -> Finding | None:
    """R1: a blown-up valid loss together with a near-chance error (see module docstring)."""
    valid_rows = [(r, v) for r in rows if (v := r.valid_loss) is not None]
    if not valid_rows:
        return None
    first_row, first_valid = valid_rows[0]
    uniform_loss = math.log(n_classes) if n_classes >= 2 else None
    near_chance_at = None if chance is None else chance - CHANCE_MARGIN
    signals: list[dict[str, Any]] = []
    for row, valid in valid_rows:
        if valid <= BLOWUP_MIN_LOSS:
            continue
        reasons: list[str] = []
        if row is not first_row and valid > BLOWUP_FACTOR * first_valid:
            reasons.append(f"valid_loss > {BLOWUP_FACTOR:g}x the stage's first valid_loss")
        if row.train_loss is not None and valid > BLOWUP_FACTOR * row.train_loss:
            reasons.append(f"valid_loss > {BLOWUP_FACTOR:g}x train_loss")
        if uniform_loss is not None and valid > BLOWUP_FACTOR * uniform_loss:
            reasons.append(f"valid_loss > {BLOWUP_FACTOR:g}x ln(n_classes)")
        if not reasons:
            continue
        error = errors.get(row.epoch)
        if near_chance_at is not None and (error is None or error < near_chance_at):
            continue  # loss blew up but the model still classifies: not R1
        signals.append(
            {
                "epoch": row.epoch,
                "train_loss": _num(row.train_loss),
                "valid_loss": valid,
                "error": error,
                "reasons": reasons,
            }
        )
    if not signals:
        return None
    worst = max(signals, key=lambda s: float(s["valid_loss"]))
    chance_part = ""
    if worst["error"] is not None and chance is not None:
        chance_part = f" with {metric} {_fmt(worst['error'])} near chance ({_fmt(chance)})"
    message = (
        f"Learning rate too high in stage '{stage.name}': at epoch {worst['epoch']} valid loss "
        f"was {_fmt(worst['valid_loss'])} (train {_fmt(worst['train_loss'])}){chance_part}."
    )
    evidence: dict[str, Any] = {
        "epochs": [s["epoch"] for s in signals],
        "signals": signals,
        "first_valid_loss": first_valid,
        "error_metric": metric,
        "chance_error": chance,
        "near_chance_threshold": near_chance_at,
        "max_lr": stage.lrs,
    }
    return _finding("lr_too_high", stage, "error", message, evidence, _ADVICE_LR_TOO_HIGH)


def _check_underfitting(
    stage: StageReport, rows: list[EpochRow], errors: dict[int, float], metric: str | None
) -> Finding | None:
    """R2 / R3: train loss above valid loss at the stage's end; slow error fall decides which."""
    last = next(
        (r for r in reversed(rows) if r.train_loss is not None and r.valid_loss is not None), None
    )
    if last is None or last.train_loss is None or last.valid_loss is None:
        return None
    train, valid = last.train_loss, last.valid_loss
    if not train > UNDERFIT_RATIO * valid:
        return None
    evidence: dict[str, Any] = {
        "epoch": last.epoch,
        "train_loss": train,
        "valid_loss": valid,
        "error_metric": metric,
        "errors": _errors_evidence(errors),
    }
    losses = f"train loss {_fmt(train)} > valid loss {_fmt(valid)} at epoch {last.epoch}"
    series = sorted(errors.items())
    if len(series) >= 2:
        (first_epoch, first_err), (last_epoch, last_err) = series[0], series[-1]
        slow = last_err > SLOW_FALL_RATIO * first_err and last_err >= SLOW_MIN_ERROR
        evidence.update(
            first_error=first_err, last_error=last_err, epochs_measured=len(series), slow=slow
        )
        fell = (
            f"{metric} went {_fmt(first_err)} -> {_fmt(last_err)} "
            f"over epochs {first_epoch}-{last_epoch}"
        )
        if slow:
            return _finding(
                "lr_too_low",
                stage,
                "warning",
                f"Learning rate too low in stage '{stage.name}': {fell}, not even halving, "
                f"and {losses}.",
                evidence,
                _ADVICE_LR_TOO_LOW,
            )
        detail = f"{losses} ({fell})"
    elif series:
        detail = f"{losses} after a single epoch ({metric} {_fmt(series[0][1])})"
    else:
        detail = losses
    return _finding(
        "too_few_epochs",
        stage,
        "info",
        f"Too few epochs (or too low a learning rate) in stage '{stage.name}': {detail}.",
        evidence,
        _ADVICE_TOO_FEW_EPOCHS,
    )


def _check_overfitting(
    stage: StageReport, errors: dict[int, float], metric: str | None
) -> Finding | None:
    """R4: the error reached its best and then kept rising (see module docstring)."""
    series = sorted(errors.items())
    if len(series) < OVERFIT_MIN_EPOCHS + 1:
        return None
    values = [e for _, e in series]
    best = min(values)
    # The *last* epoch at the best value, so every later epoch is strictly worse.
    best_pos = max(i for i, v in enumerate(values) if v == best)
    after = values[best_pos + 1 :]
    if len(after) < OVERFIT_MIN_EPOCHS:
        return None
    margin = max(OVERFIT_ABS_MARGIN, OVERFIT_REL_MARGIN * best)
    if values[-1] - best < margin:
        return None
    tail = values[best_pos:]
    longest = run = 0
    for prev, cur in itertools.pairwise(tail):
        run = run + 1 if cur > prev else 0
        longest = max(longest, run)
    if longest < 2:
        return None
    best_epoch, last_epoch = series[best_pos][0], series[-1][0]
    hint = f" (about {best_pos + 1} for this stage"
    if stage.kept == "best":
        hint += f"; keep: best already kept epoch {stage.kept_epoch})"
    else:
        hint += ", or set keep: best)"
    message = (
        f"Overfitting in stage '{stage.name}': {metric} reached its best {_fmt(best)} at epoch "
        f"{best_epoch}, then was worse for the next {len(after)} epochs, ending at "
        f"{_fmt(values[-1])} at epoch {last_epoch}."
    )
    evidence: dict[str, Any] = {
        "error_metric": metric,
        "best_epoch": best_epoch,
        "best_error": best,
        "last_epoch": last_epoch,
        "last_error": values[-1],
        "epochs_after_best": len(after),
        "longest_rise": longest,
        "margin": margin,
        "errors": _errors_evidence(errors),
        "kept": stage.kept,
        "kept_epoch": stage.kept_epoch,
    }
    return _finding(
        "overfitting", stage, "warning", message, evidence, _ADVICE_OVERFITTING.format(hint=hint)
    )


# --- helpers --------------------------------------------------------------------------------


def _error_series(rows: list[EpochRow], error_metric: str) -> tuple[str | None, dict[int, float]]:
    """The error per epoch from the first available metric (accuracy-like ones as 1 - value)."""
    candidates = [error_metric, *(m for m in ("error_rate", "accuracy") if m != error_metric)]
    for name in candidates:
        series = {
            row.epoch: float(value)
            for row in rows
            if (value := row.metrics.get(name)) is not None and math.isfinite(value)
        }
        if series:
            if name in HIGHER_IS_BETTER:
                series = {epoch: 1.0 - v for epoch, v in series.items()}
            label = name if name not in HIGHER_IS_BETTER else f"1 - {name}"
            return label, series
    return None, {}


def _chance_error(metric: str | None, n_classes: int) -> float | None:
    """1 - 1/C for single-label argmax metrics; unknown (None) otherwise."""
    if metric is None or n_classes < 2:
        return None
    base = metric.removeprefix("1 - ")
    return 1.0 - 1.0 / n_classes if base in _SINGLE_LABEL else None


def _finding(
    code: Literal["diverged", "lr_too_high", "lr_too_low", "too_few_epochs", "overfitting"],
    stage: StageReport,
    severity: Severity,
    message: str,
    evidence: dict[str, Any],
    advice: str,
) -> Finding:
    """Build a Finding (keeps the call sites short)."""
    return Finding(
        code=code,
        stage=stage.name,
        severity=severity,
        message=message,
        evidence=evidence,
        advice=advice,
    )


def _errors_evidence(errors: dict[int, float]) -> list[dict[str, float | int]]:
    """The error series as JSON-friendly ``[{"epoch": e, "error": v}, ...]``."""
    return [{"epoch": epoch, "error": value} for epoch, value in sorted(errors.items())]


def _finite_or_none(value: float | None) -> bool:
    """True for a finite number or a missing one (no validation set is not divergence)."""
    return value is None or math.isfinite(value)


def _num(value: float | None) -> float | str | None:
    """A loss for the evidence dict: NaN/inf as strings so report.json stays valid JSON."""
    if value is None or math.isfinite(value):
        return value
    return str(value)


def _fmt(value: float | str | None) -> str:
    """Short human number: 0.613, 1.1e+09, nan."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.3g}"
