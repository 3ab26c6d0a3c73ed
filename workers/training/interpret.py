"""fastai v1's ClassificationInterpretation, as pure functions over the validation outputs.

The engine runs the model once over the validation set (eval mode, valid
transforms, dataset order) and hands the raw logits here.  Everything below is
arithmetic on those logits, so it is testable with tiny tensors and never
touches a model, a loader or a device beyond moving the logits to the CPU.

Semantics follow reference §6: per-item losses are the loss function with
``reduction='none'`` on the *raw* logits, predictions are softmax (sigmoid for
multi-label), the confusion matrix has rows = actual and columns = predicted,
and ``most_confused`` sorts stably so ties keep row-major order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from shared.results import Interpretation, TopLoss

#: Multi-label decision threshold, as fastai's ``predict`` and ``accuracy_thresh`` use.
MULTI_LABEL_THRESHOLD = 0.5


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Count (actual, predicted) pairs into an ``n_classes`` x ``n_classes`` int64 matrix.

    Rows are the actual class and columns the predicted one, as fastai lays it
    out; one ``bincount`` over ``actual * n + predicted`` keeps it O(N).

    Raises:
        ValueError: shapes differ, or a label lies outside ``[0, n_classes)``.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    actual = np.asarray(actual).reshape(-1).astype(np.int64)
    predicted = np.asarray(predicted).reshape(-1).astype(np.int64)
    if actual.shape != predicted.shape:
        raise ValueError(
            f"actual and predicted differ in length: {actual.shape[0]} vs {predicted.shape[0]}"
        )
    for name, labels in (("actual", actual), ("predicted", predicted)):
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"{name} labels must lie in [0, {n_classes}), got {labels.tolist()}")
    flat = np.bincount(actual * n_classes + predicted, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes).astype(np.int64)


def most_confused(
    cm: np.ndarray, classes: Sequence[str], min_val: int = 1
) -> list[tuple[str, str, int]]:
    """The off-diagonal cells with at least ``min_val`` items, most frequent first.

    fastai zeroes the diagonal and sorts ``(actual, predicted, count)`` by count,
    descending.  Python's sort is stable (also with ``reverse=True``), so ties
    keep row-major order, which is what users compare against.  The diagonal is
    skipped outright, so even ``min_val=0`` never lists a correct prediction.
    """
    cm = np.asarray(cm)
    n = len(classes)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {n} classes")
    cells = [
        (classes[i], classes[j], int(cm[i, j]))
        for i in range(n)
        for j in range(n)
        if i != j and cm[i, j] >= min_val
    ]
    return sorted(cells, key=lambda cell: cell[2], reverse=True)


def top_losses(
    losses: np.ndarray, k: int | None = None, largest: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest (or smallest) per-item losses and their indices.

    Like fastai's ``top_losses`` (``torch.topk``) but with a stable sort, so
    equal losses come out in index order and reruns print the same items.
    A NaN loss counts as the largest (as ``topk`` treats it) and, when
    ``largest=False``, sorts last.  ``k=None`` returns every item; a ``k``
    larger than the number of items is clipped rather than refused, because
    asking for the 9 worst of 5 validation images should still show 5.

    Returns:
        ``(values, indices)``: float64 losses and int64 indices into ``losses``.
    """
    values = np.asarray(losses, dtype=np.float64).reshape(-1)
    if k is not None and k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    # Largest: negate so a stable ascending sort gives descending losses, NaN -> -inf first.
    # Smallest: numpy already sorts NaN to the end.
    keys = np.where(np.isnan(values), -np.inf, -values) if largest else values
    order = np.argsort(keys, kind="stable")
    if k is not None:
        order = order[:k]
    return values[order], order.astype(np.int64)


def interpret(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    classes: Sequence[str],
    files: Sequence[str],
    k: int,
    min_val: int,
    multi_label: bool = False,
) -> Interpretation:
    """Build the run's :class:`Interpretation` from validation logits and targets.

    Single-label: per-item cross-entropy on the raw logits, softmax
    predictions, argmax classes, a confusion matrix and ``most_confused``; each
    top loss carries the probability of the *actual* class (what fastai's
    ``plot_top_losses`` titles show).

    Multi-label (``targets`` float one-hot ``(N, C)``): per-item loss is the
    BCE-with-logits averaged over classes, predictions are sigmoid, and a
    class is predicted at sigmoid >= 0.5.  A confusion matrix is not defined
    for several labels per item, so ``confusion_matrix`` and ``most_confused``
    are empty; ``predicted``/``actual`` are ``;``-joined class names and
    ``probability`` is the mean probability of the actual classes (for an item
    with no actual class: the mean probability that each class is absent).

    Losses are computed in float64 so that ties and reported values do not
    depend on the precision the model ran in.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    n_items, n_classes = logits.shape
    if len(classes) != n_classes:
        raise ValueError(f"{len(classes)} class names for {n_classes} logit columns")
    if len(files) != n_items:
        raise ValueError(f"{len(files)} file names for {n_items} items")
    logits64 = logits.detach().to(device="cpu", dtype=torch.float64)
    targets_cpu = targets.detach().cpu()

    if multi_label:
        return _interpret_multi_label(
            logits64, targets_cpu, classes=classes, files=files, k=k, min_val=min_val
        )

    if targets_cpu.shape != (n_items,):
        raise ValueError(f"single-label targets must be (N,), got {tuple(targets_cpu.shape)}")
    target_idx = targets_cpu.long()
    with torch.no_grad():
        losses = F.cross_entropy(logits64, target_idx, reduction="none").numpy()
        preds = torch.softmax(logits64, dim=1).numpy()
    actual = target_idx.numpy()
    pred_class = preds.argmax(axis=1) if n_items else np.zeros(0, dtype=np.int64)
    cm = confusion_matrix(actual, pred_class, n_classes)
    _, order = top_losses(losses, k)
    top = [
        TopLoss(
            index=int(i),
            file=str(files[i]),
            predicted=classes[int(pred_class[i])],
            actual=classes[int(actual[i])],
            loss=float(losses[i]),
            probability=float(preds[i, actual[i]]),
        )
        for i in order
    ]
    return Interpretation(
        classes=list(classes),
        confusion_matrix=cm.tolist(),
        most_confused=most_confused(cm, classes, min_val),
        most_confused_min=min_val,
        top_losses=top,
    )


def _interpret_multi_label(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    classes: Sequence[str],
    files: Sequence[str],
    k: int,
    min_val: int,
) -> Interpretation:
    """The multi-label half of :func:`interpret` (no confusion matrix)."""
    if targets.shape != logits.shape:
        raise ValueError(
            f"multi-label targets must be one-hot (N, C) like the logits {tuple(logits.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    target_f = targets.to(torch.float64)
    with torch.no_grad():
        per_class = F.binary_cross_entropy_with_logits(logits, target_f, reduction="none")
        losses = per_class.mean(dim=1).numpy()
        probs = torch.sigmoid(logits).numpy()
    truth = target_f.numpy() >= MULTI_LABEL_THRESHOLD
    predicted = probs >= MULTI_LABEL_THRESHOLD
    _, order = top_losses(losses, k)
    top: list[TopLoss] = []
    for i in order:
        if truth[i].any():
            probability = float(probs[i, truth[i]].mean())
        else:
            probability = float((1.0 - probs[i]).mean())
        top.append(
            TopLoss(
                index=int(i),
                file=str(files[i]),
                predicted=_join_labels(classes, predicted[i]),
                actual=_join_labels(classes, truth[i]),
                loss=float(losses[i]),
                probability=probability,
            )
        )
    return Interpretation(
        classes=list(classes),
        confusion_matrix=[],
        most_confused=[],
        most_confused_min=min_val,
        top_losses=top,
    )


def _join_labels(classes: Sequence[str], mask: np.ndarray) -> str:
    """``;``-join the class names selected by a boolean mask, in class order."""
    return ";".join(name for name, on in zip(classes, mask, strict=True) if on)
