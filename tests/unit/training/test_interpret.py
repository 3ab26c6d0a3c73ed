"""ClassificationInterpretation: reference oracles 22-24, stable ties, multi-label."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from workers.training.interpret import confusion_matrix, interpret, most_confused, top_losses

CLASSES3 = ["c0", "c1", "c2"]


def _np_log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return out


# --- oracle 22 -------------------------------------------------------------------------------


def test_oracle_22_confusion_matrix_rows_are_actual():
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    assert cm.dtype == np.int64
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_oracle_22_most_confused_skips_diagonal():
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    assert most_confused(cm, CLASSES3, 1) == [("c0", "c1", 1), ("c2", "c0", 1)]
    # Even min_val=0 never lists a correct prediction (diagonal cell).
    listed = most_confused(cm, CLASSES3, 0)
    assert all(actual != pred for actual, pred, _ in listed)
    assert len(listed) == 6


def test_oracle_22_through_interpret():
    # Logits whose argmax is ŷ=[0,1,1,2,0] for y=[0,0,1,2,2].
    pred = [0, 1, 1, 2, 0]
    logits = torch.full((5, 3), -1.0)
    for i, p in enumerate(pred):
        logits[i, p] = 2.0
    result = interpret(
        logits,
        torch.tensor([0, 0, 1, 2, 2]),
        classes=CLASSES3,
        files=[f"f{i}.jpg" for i in range(5)],
        k=5,
        min_val=1,
    )
    assert result.confusion_matrix == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert result.most_confused == [("c0", "c1", 1), ("c2", "c0", 1)]
    assert result.most_confused_min == 1
    assert result.classes == CLASSES3


def test_most_confused_sorted_by_count_with_stable_ties():
    cm = np.array([[5, 1, 3], [3, 5, 1], [2, 3, 5]])
    got = most_confused(cm, CLASSES3, 2)
    # counts 3 appear at (0,2), (1,0), (2,1) in row-major order; then the 2 at (2,0).
    assert got == [("c0", "c2", 3), ("c1", "c0", 3), ("c2", "c1", 3), ("c2", "c0", 2)]


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError, match="lie in"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="differ in length"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 3)


# --- oracle 23 -------------------------------------------------------------------------------


def test_oracle_23_losses_are_cross_entropy_and_non_increasing():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 4, generator=gen) * 3
    targets = torch.randint(0, 4, (20,), generator=gen)
    result = interpret(
        logits,
        targets,
        classes=["a", "b", "c", "d"],
        files=[f"img{i}.png" for i in range(20)],
        k=20,
        min_val=1,
    )
    losses = [t.loss for t in result.top_losses]
    assert len(losses) == 20
    assert all(a >= b for a, b in itertools.pairwise(losses))
    log_sm = _np_log_softmax(logits.numpy().astype(np.float64))
    for t in result.top_losses:
        target = int(targets[t.index])
        expected = -log_sm[t.index, target]
        assert t.loss == pytest.approx(expected, rel=1e-6)
        assert t.file == f"img{t.index}.png"
        assert t.actual == "abcd"[target]
        assert t.predicted == "abcd"[int(logits[t.index].argmax())]


def test_top_losses_values_and_indices():
    values, idx = top_losses(np.array([0.5, 2.0, 1.0]))
    assert values.tolist() == [2.0, 1.0, 0.5]
    assert idx.tolist() == [1, 2, 0]
    values, idx = top_losses(np.array([0.5, 2.0, 1.0]), k=2, largest=False)
    assert values.tolist() == [0.5, 1.0]
    assert idx.tolist() == [0, 2]


def test_top_losses_ties_keep_index_order():
    losses = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    _, idx = top_losses(losses)
    assert idx.tolist() == [1, 2, 4, 3, 0]
    _, idx = top_losses(losses, largest=False)
    assert idx.tolist() == [0, 3, 1, 2, 4]


def test_top_losses_k_clipped_and_nan_counts_as_largest():
    values, idx = top_losses(np.array([0.1, np.nan, 0.3]), k=10)
    assert idx.tolist() == [1, 2, 0]
    assert np.isnan(values[0])
    _, idx = top_losses(np.array([0.1, np.nan, 0.3]), largest=False)
    assert idx.tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="k must be"):
        top_losses(np.array([1.0]), k=-1)


def test_interpret_ties_keep_index_order():
    logits = torch.zeros(4, 2)  # identical rows -> identical losses
    result = interpret(
        logits,
        torch.tensor([1, 0, 1, 0]),
        classes=["x", "y"],
        files=["a", "b", "c", "d"],
        k=3,
        min_val=1,
    )
    assert [t.index for t in result.top_losses] == [0, 1, 2]


# --- oracle 24 -------------------------------------------------------------------------------


def test_oracle_24_probability_is_of_actual_class():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-3.0, 1.0], [1.0, 1.5]])
    targets = torch.tensor([1, 0, 1, 0])  # items 0 and 3 misclassified
    result = interpret(logits, targets, classes=["cat", "dog"], files=list("abcd"), k=4, min_val=1)
    preds = torch.softmax(logits.double(), dim=1)
    for t in result.top_losses:
        assert t.probability == pytest.approx(float(preds[t.index, targets[t.index]]), rel=1e-6)
        if t.predicted != t.actual:
            assert t.probability <= 0.5
        else:
            assert t.probability > 0.5
    assert {t.index for t in result.top_losses if t.predicted != t.actual} == {0, 3}
    assert result.top_losses[0].index == 0  # the most confident mistake has the largest loss


def test_interpret_k_limits_and_validation():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    result = interpret(
        logits,
        torch.tensor([0, 1, 2, 0, 1, 2]),
        classes=CLASSES3,
        files=list("abcdef"),
        k=2,
        min_val=1,
    )
    assert len(result.top_losses) == 2
    with pytest.raises(ValueError, match="file names"):
        interpret(
            logits, torch.zeros(6, dtype=torch.long), classes=CLASSES3, files=["a"], k=1, min_val=1
        )
    with pytest.raises(ValueError, match="class names"):
        interpret(
            logits,
            torch.zeros(6, dtype=torch.long),
            classes=["a"],
            files=list("abcdef"),
            k=1,
            min_val=1,
        )


def test_interpret_empty_validation_set():
    result = interpret(
        torch.zeros(0, 3),
        torch.zeros(0, dtype=torch.long),
        classes=CLASSES3,
        files=[],
        k=9,
        min_val=1,
    )
    assert result.top_losses == []
    assert result.confusion_matrix == [[0, 0, 0]] * 3
    assert result.most_confused == []


# --- multi-label ---------------------------------------------------------------------------


def test_interpret_multi_label():
    logits = torch.tensor([[3.0, -2.0, 0.5], [-1.0, -1.0, -1.0], [0.0, 4.0, -4.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    result = interpret(
        logits,
        targets,
        classes=["sky", "road", "tree"],
        files=["p0", "p1", "p2"],
        k=3,
        min_val=1,
        multi_label=True,
    )
    assert result.confusion_matrix == []
    assert result.most_confused == []
    z = logits.numpy().astype(np.float64)
    y = targets.numpy().astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(axis=1)
    assert [t.index for t in result.top_losses] == list(np.argsort(-bce, kind="stable"))
    by_index = {t.index: t for t in result.top_losses}
    for i in range(3):
        assert by_index[i].loss == pytest.approx(bce[i], rel=1e-6)
    assert by_index[0].actual == "sky;tree"
    assert by_index[0].predicted == "sky;tree"
    assert by_index[0].probability == pytest.approx((p[0, 0] + p[0, 2]) / 2, rel=1e-6)
    assert by_index[1].actual == "road"
    assert by_index[1].predicted == ""
    assert by_index[1].probability == pytest.approx(p[1, 1], rel=1e-6)
    assert by_index[2].actual == ""
    assert by_index[2].predicted == "sky;road"  # sigmoid(0) = 0.5 counts as predicted
    assert by_index[2].probability == pytest.approx((1 - p[2]).mean(), rel=1e-6)


def test_interpret_multi_label_needs_one_hot_targets():
    with pytest.raises(ValueError, match="one-hot"):
        interpret(
            torch.zeros(2, 3),
            torch.tensor([0, 1]),
            classes=CLASSES3,
            files=["a", "b"],
            k=2,
            min_val=1,
            multi_label=True,
        )
