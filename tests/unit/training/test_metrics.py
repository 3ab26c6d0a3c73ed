"""Validation metrics weighted by batch size (oracle 20) and the multi-label metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.training.learner import Learner, Precision
from workers.training.loop import validate
from workers.training.metrics import (
    METRICS,
    accuracy_sum,
    accuracy_thresh_sum,
    error_rate_sum,
    fbeta_sum,
)

CPU = torch.device("cpu")
RTOL = 1e-6


def logits_learner(*, multi_label: bool = False) -> Learner:
    """A learner whose model returns its input: each batch's x *is* the logits."""
    core = nn.Sequential(nn.Sequential(nn.Identity()), nn.Identity())
    return Learner(core, "tiny", CPU, multi_label, Precision.choose("auto", CPU))


def batch_with_accuracy(
    n: int, n_right: int, seed: int, offset: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 3, generator=gen) * (1 + seed)
    predicted = logits.argmax(dim=1)
    targets = predicted.clone()
    targets[n_right:] = (predicted[n_right:] + 1) % 3
    return logits, targets, torch.arange(offset, offset + n)


# --- oracle 20 -----------------------------------------------------------------------------


def test_oracle_20_batches_weighted_by_size():
    first = batch_with_accuracy(64, 32, seed=0, offset=0)
    second = batch_with_accuracy(36, 36, seed=3, offset=64)
    result = validate(logits_learner(), iter([first, second]), ["accuracy", "error_rate"])
    assert result.count == 100
    assert result.metrics["accuracy"] == pytest.approx(0.68, rel=RTOL)
    assert result.metrics["error_rate"] == pytest.approx(0.32, rel=RTOL)
    loss_1 = float(F.cross_entropy(first[0], first[1]))
    loss_2 = float(F.cross_entropy(second[0], second[1]))
    expected = (64 * loss_1 + 36 * loss_2) / 100
    assert result.loss == pytest.approx(expected, rel=RTOL)
    # The unweighted mean of the batch means is a different number.
    assert not math.isclose(expected, (loss_1 + loss_2) / 2, rel_tol=1e-3)
    all_logits = torch.cat([first[0], second[0]])
    all_targets = torch.cat([first[1], second[1]])
    assert result.loss == pytest.approx(float(F.cross_entropy(all_logits, all_targets)), rel=RTOL)
    assert result.logits is None


def test_validate_keeps_outputs_in_order():
    first = batch_with_accuracy(5, 2, seed=1, offset=0)
    second = batch_with_accuracy(3, 3, seed=2, offset=5)
    result = validate(logits_learner(), iter([first, second]), ["accuracy"], keep_outputs=True)
    assert result.logits is not None
    assert result.targets is not None
    assert result.indices is not None
    assert torch.equal(result.logits, torch.cat([first[0], second[0]]))
    assert torch.equal(result.targets, torch.cat([first[1], second[1]]))
    assert result.indices.tolist() == list(range(8))
    assert result.metrics["accuracy"] == pytest.approx(5 / 8, rel=RTOL)


def test_validate_all_reduce_sums_the_totals():
    first = batch_with_accuracy(64, 32, seed=0, offset=0)
    second = batch_with_accuracy(36, 36, seed=3, offset=64)
    single = validate(logits_learner(), iter([first, second]), ["accuracy"])
    # Two ranks holding identical shards: the sums double, the means do not move.
    doubled = validate(
        logits_learner(), iter([first, second]), ["accuracy"], all_reduce=lambda t: t * 2
    )
    assert doubled.count == 200
    assert doubled.loss == pytest.approx(single.loss, rel=RTOL)
    assert doubled.metrics["accuracy"] == pytest.approx(0.68, rel=RTOL)


def test_validate_empty_set():
    result = validate(logits_learner(), iter([]), ["accuracy", "error_rate"])
    assert result.count == 0
    assert result.loss is None
    assert result.metrics == {"accuracy": None, "error_rate": None}


def test_validate_runs_in_eval_mode_and_restores_train_mode():
    learner = logits_learner()
    modes: list[bool] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            modes.append(self.training)
            return x

    learner.core[1] = Probe()
    learner.model = learner.core
    learner.core.train()
    validate(learner, iter([batch_with_accuracy(4, 4, seed=0, offset=0)]), ["accuracy"])
    assert modes == [False]
    assert learner.core.training


# --- single-label sums -------------------------------------------------------------------


def test_accuracy_and_error_rate_sums():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    targets = torch.tensor([1, 1, 1, 0])
    assert float(accuracy_sum(logits, targets)) == 3.0
    assert float(error_rate_sum(logits, targets)) == 1.0
    assert METRICS["accuracy"] is accuracy_sum
    assert METRICS["error_rate"] is error_rate_sum


# --- multi-label ---------------------------------------------------------------------------

MULTI_LOGITS = torch.tensor([[2.0, -2.0, 0.1], [-1.0, 3.0, -3.0], [0.0, 0.0, 0.0]])
MULTI_TARGETS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])


def test_accuracy_thresh_by_hand():
    # sigmoid > 0.5 <=> logit > 0 (strictly: sigmoid(0) = 0.5 is not above).
    # item 0: predicted [1,0,1] vs [1,0,0] -> 2/3; item 1: [0,1,0] vs [0,1,1] -> 2/3;
    # item 2: [0,0,0] vs [0,0,0] -> 1.
    total = float(accuracy_thresh_sum(MULTI_LOGITS, MULTI_TARGETS))
    assert total == pytest.approx(2 / 3 + 2 / 3 + 1, rel=RTOL)
    # A different threshold: sigmoid > 0.9 <=> logit > 2.197; only 3.0 passes.
    # item 0: [0,0,0] vs [1,0,0] -> 2/3; item 1: [0,1,0] vs [0,1,1] -> 2/3; item 2 -> 1.
    high = float(accuracy_thresh_sum(MULTI_LOGITS, MULTI_TARGETS, thresh=0.9))
    assert high == pytest.approx(2 / 3 + 2 / 3 + 1, rel=RTOL)
    low = float(accuracy_thresh_sum(MULTI_LOGITS, MULTI_TARGETS, thresh=0.1))
    # sigmoid > 0.1 <=> logit > -2.197: item 0 [1,1,1] -> 1/3; item 1 [1,1,0] -> 1/3;
    # item 2 [1,1,1] -> 0.
    assert low == pytest.approx(1 / 3 + 1 / 3, rel=RTOL)


FBETA_LOGITS = torch.tensor([[2.0, -3.0, -1.0], [3.0, 3.0, -5.0], [-5.0, -5.0, -5.0]])
FBETA_TARGETS = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def test_fbeta_by_hand():
    # thresh 0.2 <=> logit > ln(0.25) = -1.386.
    # item 0: predicted [1,0,1], truth [1,1,0]: P = R = 1/2, F2 = 5·(1/4)/(4·1/2 + 1/2) = 0.5
    # item 1: predicted [1,1,0] = truth: F2 = 1; item 2: nothing predicted: F2 = 0.
    assert float(fbeta_sum(FBETA_LOGITS, FBETA_TARGETS)) == pytest.approx(1.5, rel=RTOL)
    # beta = 1 with thresh 0.5: item 0 predicted [1,0,0]: P = 1, R = 1/2, F1 = 2/3.
    f1 = float(fbeta_sum(FBETA_LOGITS, FBETA_TARGETS, thresh=0.5, beta=1.0))
    assert f1 == pytest.approx(2 / 3 + 1, rel=RTOL)


def test_multi_label_metrics_through_validate():
    learner = logits_learner(multi_label=True)
    batches = [
        (FBETA_LOGITS[:2], FBETA_TARGETS[:2], torch.arange(2)),
        (FBETA_LOGITS[2:], FBETA_TARGETS[2:], torch.arange(2, 3)),
    ]
    result = validate(learner, iter(batches), ["accuracy_thresh", "fbeta"])
    assert result.count == 3
    assert result.metrics["fbeta"] == pytest.approx(0.5, rel=RTOL)
    expected_acc = float(accuracy_thresh_sum(FBETA_LOGITS, FBETA_TARGETS)) / 3
    assert result.metrics["accuracy_thresh"] == pytest.approx(expected_acc, rel=RTOL)
    bce = F.binary_cross_entropy_with_logits(FBETA_LOGITS, FBETA_TARGETS)
    assert result.loss == pytest.approx(float(bce), rel=RTOL)
