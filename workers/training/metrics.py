"""Validation metrics, fastai's definitions, as sums so batches weight by their size.

Each function returns the metric summed over the batch's items; the loop
divides by the validation set size at the end, giving fastai's
Σ(metric·bs)/N (reference §5, oracle 20) and an exact DDP all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def accuracy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of items whose argmax is the target."""
    return (logits.argmax(dim=-1) == targets).float().sum()


def error_rate_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of items whose argmax is not the target (1 - accuracy, summed)."""
    return (logits.argmax(dim=-1) != targets).float().sum()


def accuracy_thresh_sum(
    logits: torch.Tensor, targets: torch.Tensor, thresh: float = 0.5
) -> torch.Tensor:
    """Multi-label: per item, the fraction of classes right at sigmoid >= thresh."""
    predicted = torch.sigmoid(logits) > thresh
    return (predicted == targets.bool()).float().mean(dim=-1).sum()


def fbeta_sum(
    logits: torch.Tensor, targets: torch.Tensor, thresh: float = 0.2, beta: float = 2.0
) -> torch.Tensor:
    """Multi-label F-beta per item (fastai: thresh 0.2, beta 2), summed."""
    predicted = (torch.sigmoid(logits) > thresh).float()
    truth = targets.float()
    true_pos = (predicted * truth).sum(dim=-1)
    precision = true_pos / (predicted.sum(dim=-1) + 1e-9)
    recall = true_pos / (truth.sum(dim=-1) + 1e-9)
    b2 = beta**2
    return ((1 + b2) * precision * recall / (precision * b2 + recall + 1e-9)).sum()


METRICS: dict[str, MetricFn] = {
    "accuracy": accuracy_sum,
    "error_rate": error_rate_sum,
    "accuracy_thresh": accuracy_thresh_sum,
    "fbeta": fbeta_sum,
}
