"""Plots: every one renders a decodable PNG, and draws what fastai's version draws."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from PIL import Image

from shared.results import EpochRow, LrFindResult, TopLoss
from workers.training import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[3]


def _decode(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(png)) as img:
        img.load()
        assert img.format == "PNG"
        return img.size


def _assert_sane(png: bytes, *, min_px: int = 300, max_px: int = 3000) -> tuple[int, int]:
    width, height = _decode(png)
    assert min_px <= width <= max_px
    assert min_px <= height <= max_px
    return width, height


def _xdata(line: Line2D) -> np.ndarray:
    return np.asarray(line.get_xdata(), dtype=np.float64)


def _ydata(line: Line2D) -> np.ndarray:
    return np.asarray(line.get_ydata(), dtype=np.float64)


def _legend(ax: Axes) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None
    return [text.get_text() for text in legend.get_texts()]


def _images(n: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((n, size, size, 3))


def _lr_result(*, suggestion: float | None, n: int = 100) -> LrFindResult:
    lrs = list(1e-7 * (10 / 1e-7) ** (np.arange(n) / 100))
    x = np.log10(lrs)
    losses = list(2.0 - 1.5 / (1 + np.exp(-(x + 3))) + np.exp(x))  # falls, then explodes
    return LrFindResult(
        stage="unfrozen",
        lrs=lrs,
        losses=losses,
        suggestion=suggestion,
        suggest_method="steep",
        min_loss_lr_div10=1e-2 if suggestion is not None else None,
        stopped_early=False,
    )


def _row(stage: str, epoch: int, *, err: float, acc: float | None = None) -> EpochRow:
    metrics: dict[str, float | None] = {"error_rate": err}
    metrics["accuracy"] = acc
    return EpochRow(
        stage=stage,
        epoch=epoch,
        train_loss=0.5,
        valid_loss=0.4,
        metrics=metrics,
        seconds=1.0,
        images_per_second=100.0,
        lr=1e-3,
    )


def test_pyplot_is_never_imported():
    # pyplot keeps global figure state and may pick a GUI backend; the plots must not load it.
    code = (
        "import sys, numpy as np\n"
        "from workers.training import plots\n"
        "png = plots.plot_show_batch(np.zeros((1, 4, 4, 3)), ['a'])\n"
        "assert png.startswith(b'\\x89PNG')\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


# --- show_batch ------------------------------------------------------------------------------


def test_show_batch_grid_is_square_and_titled():
    fig = plots._show_batch_figure(_images(5), ["cat", "dog", "cat", "bird", "dog"])
    axes = fig.get_axes()
    assert len(axes) == 9  # ceil(sqrt(5)) = 3 -> 3 x 3
    assert [ax.get_title() for ax in axes[:5]] == ["cat", "dog", "cat", "bird", "dog"]
    assert all(not ax.axison for ax in axes)
    assert [len(ax.images) for ax in axes] == [1] * 5 + [0] * 4


def test_show_batch_png():
    _assert_sane(plots.plot_show_batch(_images(9), [f"c{i}" for i in range(9)]))


def test_show_batch_accepts_grayscale_and_clips():
    images = np.linspace(-0.5, 1.5, 2 * 8 * 8).reshape(2, 8, 8)
    fig = plots._show_batch_figure(images, ["a", "b"])
    shown = fig.get_axes()[0].images[0].get_array()
    assert shown is not None
    assert shown.shape == (8, 8, 3)
    assert float(shown.min()) >= 0.0
    assert float(shown.max()) <= 1.0


def test_show_batch_rejects_mismatched_titles():
    with pytest.raises(ValueError, match="titles"):
        plots.plot_show_batch(_images(2), ["only one"])


# --- lr_find -------------------------------------------------------------------------------


def test_lr_find_with_suggestion():
    result = _lr_result(suggestion=1e-4)
    fig = plots._lr_find_figure(result, skip_start=10, skip_end=5)
    ax = fig.get_axes()[0]
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "Learning Rate"
    assert ax.get_ylabel() == "Loss"
    curve = ax.get_lines()[0]
    assert len(_xdata(curve)) == 85  # 100 - 10 - 5
    assert _xdata(curve)[0] == pytest.approx(result.lrs[10])
    legend = _legend(ax)
    assert any("1.00e-04" in text and "steep" in text for text in legend)
    red_dots = [
        line for line in ax.get_lines() if line.get_color() == "red" and line.get_marker() == "o"
    ]
    assert len(red_dots) == 1
    assert _xdata(red_dots[0])[0] == pytest.approx(1e-4)
    _assert_sane(plots.plot_lr_find(result))


def test_lr_find_without_suggestion():
    result = _lr_result(suggestion=None)
    fig = plots._lr_find_figure(result, skip_start=10, skip_end=5)
    ax = fig.get_axes()[0]
    assert not [line for line in ax.get_lines() if line.get_color() == "red"]
    legend = _legend(ax)
    assert not any("Suggestion" in text for text in legend)
    _assert_sane(plots.plot_lr_find(result))


def test_lr_find_short_curve_is_not_trimmed():
    result = _lr_result(suggestion=None, n=12)  # 12 - 10 - 5 < 2 points
    fig = plots._lr_find_figure(result, skip_start=10, skip_end=5)
    assert len(_xdata(fig.get_axes()[0].get_lines()[0])) == 12
    fig = plots._lr_find_figure(result, skip_start=5, skip_end=5)
    assert len(_xdata(fig.get_axes()[0].get_lines()[0])) == 2
    _assert_sane(plots.plot_lr_find(result))


def test_lr_find_drops_non_finite_losses():
    result = _lr_result(suggestion=1e-3, n=30)
    result.losses[-7] = float("nan")
    result.losses[-6] = float("inf")
    fig = plots._lr_find_figure(result, skip_start=0, skip_end=0)
    assert len(_xdata(fig.get_axes()[0].get_lines()[0])) == 28
    _assert_sane(plots.plot_lr_find(result, skip_start=0, skip_end=0))


# --- losses / metrics ----------------------------------------------------------------------


def test_plot_losses_labels_and_stage_lines():
    train = [(i, 1.0 / (1 + i)) for i in range(40)]
    valid = [(10, 0.6), (20, 0.4), (30, 0.3), (40, 0.25)]
    bounds = [("frozen", 0), ("unfrozen", 20)]
    fig = plots._losses_figure(train, valid, bounds)
    ax = fig.get_axes()[0]
    assert ax.get_xlabel() == "Batches processed"
    assert ax.get_ylabel() == "Loss"
    assert _legend(ax) == ["Train", "Validation"]
    labels = [t.get_text().strip() for t in ax.texts]
    assert labels == ["frozen", "unfrozen"]
    dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert sorted(_xdata(line)[0] for line in dotted) == [0, 20]
    assert ax.get_yscale() == "linear"
    _assert_sane(plots.plot_losses(train, valid, bounds))


def test_plot_losses_survives_an_exploded_epoch():
    train = [(i, 1.0) for i in range(10)] + [(10, float("nan"))]
    valid = [(5, 0.9), (10, 1.1e9)]
    fig = plots._losses_figure(train, valid, [("s", 0)])
    ax = fig.get_axes()[0]
    assert ax.get_yscale() == "log"
    assert len(_xdata(ax.get_lines()[0])) == 10  # the NaN train point is dropped
    _assert_sane(plots.plot_losses(train, valid, [("s", 0)]))


def test_plot_metrics_one_panel_per_metric():
    rows = [_row("a", 0, err=0.3, acc=0.7), _row("a", 1, err=0.2, acc=0.8)]
    rows += [_row("b", 0, err=0.1, acc=None)]
    fig = plots._metrics_figure(rows, ["error_rate", "accuracy"], [10, 20, 30])
    axes = fig.get_axes()
    assert len(axes) == 2
    assert [ax.get_ylabel() for ax in axes] == ["error_rate", "accuracy"]
    assert axes[-1].get_xlabel() == "Batches processed"
    assert list(_xdata(axes[0].get_lines()[0])) == [10, 20, 30]
    assert list(_ydata(axes[0].get_lines()[0])) == pytest.approx([0.3, 0.2, 0.1])
    assert np.isnan(_ydata(axes[1].get_lines()[0])[2])
    stage_lines = [line for line in axes[0].get_lines() if line.get_linestyle() == ":"]
    assert [_xdata(line)[0] for line in stage_lines] == [20]
    _assert_sane(plots.plot_metrics(rows, ["error_rate", "accuracy"], [10, 20, 30]))


def test_plot_metrics_rejects_length_mismatch():
    with pytest.raises(ValueError, match="batch counts"):
        plots.plot_metrics([_row("a", 0, err=0.1)], ["error_rate"], [1, 2])


# --- top losses ----------------------------------------------------------------------------


def _top(k: int) -> list[TopLoss]:
    return [
        TopLoss(
            index=i,
            file=f"f{i}.jpg",
            predicted="dog",
            actual="cat",
            loss=3.14159 - i * 0.1,
            probability=0.0432,
        )
        for i in range(k)
    ]


def test_plot_top_losses_layout_and_titles():
    fig = plots._top_losses_figure(_images(7), _top(7))
    assert fig.get_suptitle() == "Prediction/Actual/Loss/Probability"
    axes = fig.get_axes()
    assert len(axes) == 9  # cols = ceil(sqrt(7)) = 3, rows = ceil(7/3) = 3
    assert axes[0].get_title() == "dog/cat / 3.14 / 0.04"
    assert axes[6].get_title() == "dog/cat / 2.54 / 0.04"
    assert [len(ax.images) for ax in axes] == [1] * 7 + [0] * 2


def test_plot_top_losses_grid_rows_shrink():
    fig = plots._top_losses_figure(_images(10), _top(10))
    assert len(fig.get_axes()) == 12  # cols = ceil(sqrt(10)) = 4, rows = ceil(10 / 4) = 3


def test_plot_top_losses_png():
    _assert_sane(plots.plot_top_losses(_images(9), _top(9)))


# --- confusion matrix ----------------------------------------------------------------------


def test_confusion_matrix_three_classes():
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]])
    fig = plots._confusion_matrix_figure(cm, ["a", "b", "c"], normalize=False, title="CM")
    ax = fig.get_axes()[0]
    assert ax.get_title() == "CM"
    assert ax.get_xlabel() == "Predicted"
    assert ax.get_ylabel() == "Actual"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert all(t.get_rotation() == 90 for t in ax.get_xticklabels())
    cells = {(t.get_position()): t for t in ax.texts}
    assert len(cells) == 9
    assert cells[(2, 2)].get_text() == "9"
    assert cells[(2, 2)].get_color() == "white"  # 9 > 9/2
    assert cells[(1, 0)].get_text() == "1"  # column 1, row 0
    assert cells[(1, 0)].get_color() == "black"
    _assert_sane(plots.plot_confusion_matrix(cm, ["a", "b", "c"]))


def test_confusion_matrix_normalized():
    cm = np.array([[3, 1], [0, 0]])
    fig = plots._confusion_matrix_figure(cm, ["a", "b"], normalize=True, title="t")
    texts = {t.get_position(): t.get_text() for t in fig.get_axes()[0].texts}
    assert texts[(0, 0)] == "0.75"
    assert texts[(1, 0)] == "0.25"
    assert texts[(0, 1)] == "0.00"  # an empty row stays 0, no NaN
    _assert_sane(plots.plot_confusion_matrix(cm, ["a", "b"], normalize=True))


def test_confusion_matrix_fifty_classes_scales_and_drops_cell_text():
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 5, size=(50, 50)) + np.eye(50, dtype=np.int64) * 40
    classes = [f"class_{i:02d}" for i in range(50)]
    fig = plots._confusion_matrix_figure(cm, classes, normalize=False, title="t")
    ax = fig.get_axes()[0]
    assert len(ax.texts) == 0
    assert len(ax.get_xticklabels()) == 50
    small = plots._confusion_matrix_figure(
        np.eye(3, dtype=int), list("abc"), normalize=False, title="t"
    )
    assert fig.get_figwidth() > small.get_figwidth()
    width, _ = _assert_sane(plots.plot_confusion_matrix(cm, classes))
    assert width >= 1000
    # ~100 classes still renders within bounds.
    hundred = [f"c{i}" for i in range(100)]
    _assert_sane(plots.plot_confusion_matrix(np.eye(100, dtype=np.int64), hundred))


def test_confusion_matrix_rejects_multi_label_empty():
    with pytest.raises(ValueError, match="does not match"):
        plots.plot_confusion_matrix(np.array([]), ["a", "b"])
