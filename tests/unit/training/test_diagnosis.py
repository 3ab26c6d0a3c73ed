"""The notes' "What can go wrong?" rules, on the course's printed numbers (reference §8)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from shared.results import EpochRow, StageReport
from workers.training.diagnosis import diagnose, format_findings


def _stage(
    losses: Sequence[tuple[float | None, float | None]],
    errors: Sequence[float | None] | None,
    *,
    name: str = "stage-1",
    metric: str = "error_rate",
    diverged: bool = False,
    kept: str = "last",
    kept_epoch: int | None = None,
) -> StageReport:
    rows = []
    for epoch, (train, valid) in enumerate(losses):
        metrics: dict[str, float | None] = {}
        if errors is not None:
            metrics[metric] = errors[epoch]
        rows.append(
            EpochRow(
                stage=name,
                epoch=epoch,
                train_loss=train,
                valid_loss=valid,
                metrics=metrics,
                seconds=1.0,
                images_per_second=100.0,
                lr=3e-3,
            )
        )
    return StageReport(
        name=name,
        train="head",
        epochs=len(rows),
        schedule="one_cycle",
        lrs=[3e-3],
        rows=rows,
        diverged=diverged,
        kept=kept,
        kept_epoch=kept_epoch,
    )


def _codes(findings) -> list[str]:
    return [f.code for f in findings]


# --- healthy ---------------------------------------------------------------------------------


def test_healthy_run_has_no_findings():
    # train < valid (as the notes say it should be) and the error falls to ~0.02.
    stage = _stage(
        [(0.40, 0.45), (0.20, 0.25), (0.10, 0.15), (0.06, 0.12)],
        [0.12, 0.06, 0.03, 0.02],
    )
    assert diagnose([stage], n_classes=3) == []


def test_train_far_below_valid_is_not_overfitting():
    # The notes: train loss < valid loss is NOT a sign of overfitting.
    stage = _stage(
        [(0.3, 0.5), (0.1, 0.5), (0.03, 0.55), (0.01, 0.6)],
        [0.10, 0.08, 0.07, 0.07],
    )
    assert diagnose([stage], n_classes=3) == []


# --- diverged ----------------------------------------------------------------------------------


def test_non_finite_valid_loss_is_diverged_only():
    stage = _stage([(0.8, 0.5), (25.0, float("nan"))], [0.2, 0.67])
    findings = diagnose([stage], n_classes=3)
    assert _codes(findings) == ["diverged"]
    finding = findings[0]
    assert finding.severity == "error"
    assert finding.evidence["non_finite"] == [{"epoch": 1, "train_loss": 25.0, "valid_loss": "nan"}]
    assert "re-create the learner" in finding.advice
    assert "lower learning rate" in finding.advice
    json.dumps(finding.evidence, allow_nan=False)  # report.json stays strict JSON


def test_engine_flagged_divergence_without_rows():
    findings = diagnose([_stage([], None, diverged=True)], n_classes=3)
    assert _codes(findings) == ["diverged"]
    assert findings[0].evidence["flagged_by_engine"] is True


# --- R1: LR too high ---------------------------------------------------------------------------


def test_r1_course_numbers_fire_lr_too_high():
    # fit_one_cycle(1, max_lr=0.5): train 12.2, valid ≈1.1e9, error 0.77 (3 classes).
    findings = diagnose([_stage([(12.2, 1.1e9)], [0.77])], n_classes=3)
    assert _codes(findings) == ["lr_too_high"]
    finding = findings[0]
    assert finding.severity == "error"
    assert finding.stage == "stage-1"
    assert finding.evidence["epochs"] == [0]
    assert finding.evidence["signals"][0]["valid_loss"] == 1.1e9
    assert finding.evidence["signals"][0]["error"] == 0.77
    assert finding.evidence["chance_error"] == pytest.approx(2 / 3)
    assert "1.1e+09" in finding.message
    assert "0.77" in finding.message
    assert "re-create the learner" in finding.advice.lower()


def test_r1_blow_up_relative_to_first_epoch():
    stage = _stage([(0.9, 0.6), (3.0, 45.0), (6.0, 80.0)], [0.2, 0.66, 0.7])
    findings = diagnose([stage], n_classes=3)
    assert _codes(findings) == ["lr_too_high"]
    assert findings[0].evidence["epochs"] == [1, 2]
    assert "80" in findings[0].message  # the worst epoch is quoted


def test_r1_needs_error_near_chance():
    # A large valid loss with a good error rate is a confident model, not a blown-up LR.
    stage = _stage([(0.5, 0.4), (0.1, 15.0)], [0.1, 0.05])
    assert "lr_too_high" not in _codes(diagnose([stage], n_classes=3))


def test_r1_reads_accuracy_when_error_rate_is_absent():
    stage = _stage([(12.2, 1.1e9)], [0.23], metric="accuracy")
    findings = diagnose([stage], n_classes=3)
    assert _codes(findings) == ["lr_too_high"]
    assert findings[0].evidence["signals"][0]["error"] == pytest.approx(0.77)


def test_r1_without_error_metric_uses_the_loss_alone():
    assert _codes(diagnose([_stage([(12.2, 1.1e9)], None)], n_classes=3)) == ["lr_too_high"]
    assert diagnose([_stage([(0.5, 0.6)], None)], n_classes=3) == []


# --- R2: LR too low ----------------------------------------------------------------------------


def test_r2_course_numbers_fire_lr_too_low():
    # max_lr=1e-5 for 5 epochs: error 0.61 -> 0.45, final train 1.32 > valid 0.98.
    stage = _stage(
        [(1.80, 1.35), (1.65, 1.22), (1.52, 1.10), (1.41, 1.03), (1.32, 0.98)],
        [0.61, 0.57, 0.52, 0.48, 0.45],
    )
    findings = diagnose([stage], n_classes=3)
    assert _codes(findings) == ["lr_too_low"]  # never together with too_few_epochs
    finding = findings[0]
    assert finding.severity == "warning"
    assert finding.evidence["first_error"] == 0.61
    assert finding.evidence["last_error"] == 0.45
    assert finding.evidence["train_loss"] == 1.32
    assert finding.evidence["valid_loss"] == 0.98
    assert "0.61" in finding.message
    assert "0.45" in finding.message
    assert "10–100x" in finding.advice


def test_r2_does_not_fire_when_train_below_valid():
    stage = _stage(
        [(0.9, 1.35), (0.8, 1.22), (0.7, 1.10), (0.6, 1.03), (0.5, 0.98)],
        [0.61, 0.57, 0.52, 0.48, 0.45],
    )
    assert diagnose([stage], n_classes=3) == []


# --- R3: too few epochs ------------------------------------------------------------------------


def test_r3_course_numbers_fire_too_few_epochs():
    # fit_one_cycle(1): train loss 0.60 vs valid 0.12.
    findings = diagnose([_stage([(0.60, 0.12)], [0.04])], n_classes=3)
    assert _codes(findings) == ["too_few_epochs"]
    finding = findings[0]
    assert finding.severity == "info"
    assert finding.evidence["train_loss"] == 0.60
    assert finding.evidence["valid_loss"] == 0.12
    assert "0.6" in finding.message
    assert "0.12" in finding.message
    assert "more epochs" in finding.advice
    assert "raise the learning rate" in finding.advice


def test_r3_error_falling_fast_is_too_few_epochs_not_lr_too_low():
    stage = _stage([(1.2, 0.5), (0.8, 0.3), (0.5, 0.2)], [0.20, 0.09, 0.05])
    assert _codes(diagnose([stage], n_classes=3)) == ["too_few_epochs"]


def test_r3_ignores_train_barely_above_valid():
    stage = _stage([(0.5, 0.4), (0.202, 0.2)], [0.1, 0.05])  # within the 5% margin
    assert diagnose([stage], n_classes=3) == []


# --- R4: overfitting ---------------------------------------------------------------------------


def test_r4_error_reaches_minimum_then_rises():
    errors = [0.20, 0.12, 0.08, 0.05, 0.04, 0.045, 0.05, 0.06, 0.07, 0.08]
    losses = [(0.5 - 0.04 * i, 0.3 + 0.02 * i) for i in range(10)]
    findings = diagnose([_stage(losses, errors)], n_classes=3)
    assert _codes(findings) == ["overfitting"]
    finding = findings[0]
    assert finding.severity == "warning"
    assert finding.evidence["best_epoch"] == 4
    assert finding.evidence["best_error"] == 0.04
    assert finding.evidence["last_error"] == 0.08
    assert finding.evidence["epochs_after_best"] == 5
    assert "epoch 4" in finding.message
    assert "fewer epochs" in finding.advice


def test_r4_mentions_keep_best():
    errors = [0.2, 0.05, 0.07, 0.09]
    stage = _stage([(0.1, 0.3)] * 4, errors, kept="best", kept_epoch=1)
    findings = diagnose([stage], n_classes=3)
    assert _codes(findings) == ["overfitting"]
    assert "already kept epoch 1" in findings[0].advice


@pytest.mark.parametrize(
    "errors",
    [
        [0.10, 0.05, 0.06, 0.05],  # back to the best: noise, not a rise
        [0.10, 0.05, 0.055, 0.052],  # ends within the margin of the best
        [0.10, 0.05, 0.08],  # only one epoch after the best
        [0.10, 0.05, 0.09, 0.07],  # never rose twice in a row
    ],
)
def test_r4_does_not_fire_on_noise(errors):
    stage = _stage([(0.1, 0.3)] * len(errors), errors)
    assert diagnose([stage], n_classes=3) == []


def test_overfitting_suppresses_too_few_epochs():
    errors = [0.2, 0.05, 0.07, 0.09]
    stage = _stage([(0.5, 0.3)] * 4, errors)  # train > valid at the end, error rising
    assert _codes(diagnose([stage], n_classes=3)) == ["overfitting"]


# --- several stages / output -------------------------------------------------------------------


def test_findings_follow_stage_order_and_format():
    stages = [
        _stage([(0.60, 0.12)], [0.04], name="frozen"),
        _stage([(12.2, 1.1e9)], [0.77], name="unfrozen"),
    ]
    findings = diagnose(stages, n_classes=3)
    assert [(f.stage, f.code) for f in findings] == [
        ("frozen", "too_few_epochs"),
        ("unfrozen", "lr_too_high"),
    ]
    lines = format_findings(findings)
    assert len(lines) == 2
    assert lines[0].startswith("INFO")
    assert "[frozen] too_few_epochs" in lines[0]
    assert lines[1].startswith("ERROR")
    assert "Advice:" in lines[1]
    for finding in findings:
        json.dumps(finding.evidence, allow_nan=False)


def test_two_class_chance_threshold():
    # Chance for 2 classes is 0.5, so "near chance" starts at 0.4.
    assert _codes(diagnose([_stage([(5.0, 2e4)], [0.45])], n_classes=2)) == ["lr_too_high"]
    assert diagnose([_stage([(5.0, 2e4)], [0.30])], n_classes=2) == []
