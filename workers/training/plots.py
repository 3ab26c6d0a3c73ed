"""The run's figures (fastai's show_batch, Recorder.plot*, plot_top_losses, confusion matrix).

Every public function returns PNG bytes so the caller decides where they go
(the run folder locally, the artifact store in the worker).  Figures are
built with the object API (:class:`~matplotlib.figure.Figure` rendered by
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`) and never through
``pyplot``: there is no global figure registry to leak into, no GUI backend
to pick up from the environment, and two threads (or a Celery pool) can plot
at once.  Each ``_*_figure`` builder is separate from rendering so tests can
inspect what was drawn, not only that some PNG came out.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shared.results import EpochRow, LrFindResult, TopLoss

#: Rendering resolution; fixed so output does not depend on a user's matplotlibrc.
DPI = 100
#: Above this many classes the confusion matrix drops its per-cell numbers (unreadable).
CM_TEXT_MAX_CLASSES = 30
#: Switch the loss plot to a log y axis when the finite losses span more than this ratio,
#: so one exploded epoch (the notes' valid loss of ~1e9) does not flatten the rest.
LOG_Y_RATIO = 1e3


def plot_show_batch(images: np.ndarray, titles: Sequence[str]) -> bytes:
    """A square grid of already-denormalized images titled by class (fastai's ``show_batch``).

    Args:
        images: ``(N, H, W, 3)`` floats in [0, 1] (``(N, H, W)`` / ``(N, H, W, 1)``
            grayscale and uint8 are accepted too).
        titles: one class name per image.
    """
    return _render(_show_batch_figure(images, titles))


def plot_lr_find(result: LrFindResult, *, skip_start: int = 10, skip_end: int = 5) -> bytes:
    """Loss against learning rate on a log axis, trimmed like fastai's ``Recorder.plot``.

    The first ``skip_start`` and last ``skip_end`` points are dropped (early
    noise and the final blow-up) unless fewer than two points would remain,
    in which case the whole curve is shown.  The suggestion, when there is one,
    is a red dot with its value in the legend.
    """
    return _render(_lr_find_figure(result, skip_start=skip_start, skip_end=skip_end))


def plot_losses(
    train: Sequence[tuple[int, float]],
    valid: Sequence[tuple[int, float]],
    stage_bounds: Sequence[tuple[str, int]],
) -> bytes:
    """Smoothed train loss per batch and validation loss per epoch (fastai's ``plot_losses``).

    Args:
        train: ``(cumulative batch index, smoothed loss)`` for every training batch.
        valid: ``(cumulative batch count at the epoch's end, valid loss)`` per epoch.
        stage_bounds: ``(stage name, cumulative batch index where it starts)``;
            drawn as labelled dotted lines so the stages' curves can be told apart.
    """
    return _render(_losses_figure(train, valid, stage_bounds))


def plot_metrics(
    rows: Sequence[EpochRow], metrics: Sequence[str], batches_at_epoch_end: Sequence[int]
) -> bytes:
    """One panel per metric against the cumulative batch count (fastai's ``plot_metrics``)."""
    return _render(_metrics_figure(rows, metrics, batches_at_epoch_end))


def plot_top_losses(images: np.ndarray, top: Sequence[TopLoss]) -> bytes:
    """The validation items with the largest losses, titled like fastai's ``plot_top_losses``.

    Each title is ``predicted/actual / loss / probability of the actual class``.
    """
    return _render(_top_losses_figure(images, top))


def plot_confusion_matrix(
    cm: np.ndarray,
    classes: Sequence[str],
    *,
    normalize: bool = False,
    title: str = "Confusion matrix",
) -> bytes:
    """The confusion matrix (rows actual, columns predicted) as fastai draws it.

    ``normalize`` divides each row by its sum (an empty row stays 0).  The
    figure and fonts grow with the class count so ~100 classes stay legible;
    above :data:`CM_TEXT_MAX_CLASSES` classes the per-cell numbers are left out.
    """
    return _render(_confusion_matrix_figure(cm, classes, normalize=normalize, title=title))


# --- builders -------------------------------------------------------------------------------


def _show_batch_figure(images: np.ndarray, titles: Sequence[str]) -> Figure:
    """Build the ``show_batch`` grid: ceil(sqrt(n)) x ceil(sqrt(n))."""
    rgb = _as_rgb(images)
    n = rgb.shape[0]
    if len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} images")
    side = math.ceil(math.sqrt(n))
    size = min(3.0 * side, 15.0)
    fig = Figure(figsize=(size, size), dpi=DPI, layout="constrained")
    _fill_grid(fig, rgb, list(titles), rows=side, cols=side, title_size=_grid_font(side))
    return fig


def _lr_find_figure(result: LrFindResult, *, skip_start: int, skip_end: int) -> Figure:
    """Build the LR-finder curve with its suggestion marked."""
    if len(result.lrs) != len(result.losses):
        raise ValueError(f"{len(result.lrs)} lrs for {len(result.losses)} losses")
    lrs, losses = _trim(
        np.asarray(result.lrs, dtype=np.float64),
        np.asarray(result.losses, dtype=np.float64),
        skip_start=skip_start,
        skip_end=skip_end,
    )
    ok = np.isfinite(lrs) & (lrs > 0) & np.isfinite(losses)
    lrs, losses = lrs[ok], losses[ok]

    fig = Figure(figsize=(7.0, 4.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(lrs, losses, color="tab:blue", label="Loss (smoothed)")
    ax.set_xscale("log")
    ax.set_xlabel("Learning Rate")
    ax.set_ylabel("Loss")
    early = " (stopped early)" if result.stopped_early else ""
    ax.set_title(f"LR finder: {result.stage}{early}")
    if lrs.size == 0:
        ax.text(0.5, 0.5, "no finite losses recorded", ha="center", transform=ax.transAxes)

    suggestion = result.suggestion
    if suggestion is not None and math.isfinite(suggestion) and suggestion > 0:
        y = _loss_near(suggestion, lrs, losses, result)
        label = f"Suggestion ({result.suggest_method}): {suggestion:.2e}"
        ax.axvline(suggestion, color="red", linestyle="--", linewidth=0.8, alpha=0.6)
        if y is not None:
            ax.plot([suggestion], [y], "o", color="red", markersize=9, label=label)
        else:
            ax.plot([], [], "o", color="red", label=label)
    div10 = result.min_loss_lr_div10
    if div10 is not None and math.isfinite(div10) and div10 > 0:
        ax.axvline(
            div10, color="grey", linestyle=":", linewidth=1.0, label=f"Min loss / 10: {div10:.2e}"
        )
    ax.legend(loc="best")
    return fig


def _losses_figure(
    train: Sequence[tuple[int, float]],
    valid: Sequence[tuple[int, float]],
    stage_bounds: Sequence[tuple[str, int]],
) -> Figure:
    """Build the train/valid loss curves with stage boundaries."""
    tx, ty = _finite_xy(train)
    vx, vy = _finite_xy(valid)
    fig = Figure(figsize=(8.0, 4.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(tx, ty, color="tab:blue", label="Train")
    ax.plot(vx, vy, color="tab:orange", marker="o", label="Validation")
    both = np.concatenate([ty, vy])
    if both.size and both.min() > 0 and both.max() / both.min() > LOG_Y_RATIO:
        ax.set_yscale("log")
    # x in data units, y in axes units: the label sits at the top whatever the loss scale.
    to_top = ax.get_xaxis_transform()
    for name, start in stage_bounds:
        ax.axvline(start, color="grey", linestyle=":", linewidth=1.0)
        ax.text(
            start,
            0.98,
            f" {name}",
            transform=to_top,
            rotation=90,
            va="top",
            ha="left",
            fontsize=8,
            color="dimgrey",
            # A light box keeps the name legible where it crosses the curves.
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1.0},
        )
    ax.set_xlabel("Batches processed")
    ax.set_ylabel("Loss")
    ax.legend(loc="upper right")
    return fig


def _metrics_figure(
    rows: Sequence[EpochRow], metrics: Sequence[str], batches_at_epoch_end: Sequence[int]
) -> Figure:
    """Build one stacked panel per metric, with dotted lines where a stage begins."""
    if not metrics:
        raise ValueError("no metrics to plot")
    if len(rows) != len(batches_at_epoch_end):
        raise ValueError(f"{len(rows)} rows for {len(batches_at_epoch_end)} batch counts")
    x = np.asarray(batches_at_epoch_end, dtype=np.float64)
    starts = [
        batches_at_epoch_end[i - 1]
        for i in range(1, len(rows))
        if rows[i].stage != rows[i - 1].stage
    ]
    fig = Figure(figsize=(8.0, 0.6 + 2.6 * len(metrics)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, metrics, strict=True):
        y = np.asarray([_or_nan(row.metrics.get(name)) for row in rows], dtype=np.float64)
        ax.plot(x, y, marker="o", color="tab:green")
        ax.set_ylabel(name)
        ax.set_title(name, fontsize=10)
        for start in starts:
            ax.axvline(start, color="grey", linestyle=":", linewidth=1.0)
    axes[-1].set_xlabel("Batches processed")
    return fig


def _top_losses_figure(images: np.ndarray, top: Sequence[TopLoss]) -> Figure:
    """Build the top-losses grid: ceil(sqrt(k)) columns, ceil(k / cols) rows."""
    rgb = _as_rgb(images)
    k = rgb.shape[0]
    if len(top) != k:
        raise ValueError(f"{len(top)} top losses for {k} images")
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    fig = Figure(figsize=(12.0, 12.0 * rows / cols + 0.5), dpi=DPI, layout="constrained")
    fig.suptitle("Prediction/Actual/Loss/Probability", fontsize=14)
    titles = [f"{t.predicted}/{t.actual} / {t.loss:.2f} / {t.probability:.2f}" for t in top]
    _fill_grid(fig, rgb, titles, rows=rows, cols=cols, title_size=_grid_font(cols))
    return fig


def _confusion_matrix_figure(
    cm: np.ndarray, classes: Sequence[str], *, normalize: bool, title: str
) -> Figure:
    """Build the confusion-matrix heat map, scaled to the class count."""
    counts = np.asarray(cm)
    n = len(classes)
    if n == 0 or counts.shape != (n, n):
        raise ValueError(
            f"confusion matrix of shape {counts.shape} does not match {n} classes "
            "(multi-label runs have no confusion matrix)"
        )
    if normalize:
        sums = counts.sum(axis=1, keepdims=True).astype(np.float64)
        values = np.divide(
            counts.astype(np.float64), sums, out=np.zeros((n, n), dtype=np.float64), where=sums > 0
        )
    else:
        values = counts.astype(np.float64)

    # About 0.17 in per class beyond a 3 in margin for the labels, within 6..24 in.
    size = min(24.0, max(6.0, 3.0 + 0.17 * n))
    cell_pt = (size - 3.0) / n * 72.0
    tick_size = min(10.0, max(5.0, 0.7 * cell_pt))
    fig = Figure(figsize=(size, size), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(values, interpolation="nearest", cmap="Blues", vmin=0.0)
    ax.set_title(title)
    ticks = np.arange(n)
    ax.set_xticks(ticks)
    ax.set_xticklabels(list(classes), rotation=90, fontsize=tick_size)
    ax.set_yticks(ticks)
    ax.set_yticklabels(list(classes), fontsize=tick_size)
    ax.set_ylabel("Actual")
    ax.set_xlabel("Predicted")
    if n <= CM_TEXT_MAX_CLASSES:
        threshold = values.max() / 2.0
        text_size = min(12.0, max(6.0, 0.35 * cell_pt))
        for i in range(n):
            for j in range(n):
                text = f"{values[i, j]:.2f}" if normalize else str(int(counts[i, j]))
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=text_size,
                    color="white" if values[i, j] > threshold else "black",
                )
    ax.grid(False)
    return fig


# --- helpers --------------------------------------------------------------------------------


def _render(fig: Figure) -> bytes:
    """Render a figure to PNG bytes through the Agg canvas, then drop its artists."""
    try:
        FigureCanvasAgg(fig)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI)
        return buffer.getvalue()
    finally:
        fig.clear()


def _as_rgb(images: np.ndarray) -> np.ndarray:
    """Coerce a batch to ``(N, H, W, 3)`` floats in [0, 1] so ``imshow`` never warns or rescales.

    Denormalized images can overshoot [0, 1] slightly; clipping here is what
    fastai's ``show`` effectively does.  uint8 batches are scaled by 1/255.
    """
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, 3), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("no images to plot")
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    out = np.clip(arr.astype(np.float64) / scale, 0.0, 1.0)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out


def _fill_grid(
    fig: Figure, rgb: np.ndarray, titles: list[str], *, rows: int, cols: int, title_size: float
) -> None:
    """Draw images row-major into a rows x cols grid; hide every axis (and the empty cells)."""
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < rgb.shape[0]:
            ax.imshow(rgb[i])
            ax.set_title(titles[i], fontsize=title_size)


def _grid_font(cols: int) -> float:
    """Title font size for a grid ``cols`` wide: smaller as the cells shrink."""
    return max(6.0, 12.0 - cols)


def _trim(
    lrs: np.ndarray, losses: np.ndarray, *, skip_start: int, skip_end: int
) -> tuple[np.ndarray, np.ndarray]:
    """fastai's ``_split_list``: drop the ends, but never down to fewer than two points."""
    if skip_start < 0 or skip_end < 0:
        raise ValueError("skip_start and skip_end must be >= 0")
    stop = len(lrs) - skip_end
    if stop - skip_start < 2:
        return lrs, losses
    return lrs[skip_start:stop], losses[skip_start:stop]


def _loss_near(
    lr: float, lrs: np.ndarray, losses: np.ndarray, result: LrFindResult
) -> float | None:
    """The recorded loss at the lr closest (in log space) to ``lr``, to place the red dot.

    Looks in the plotted points first; when the suggestion lies outside them
    (more than a factor e away, e.g. it was computed on other bounds) it falls
    back to the untrimmed curve.  ``None`` when no finite point exists at all.
    """
    full_lrs = np.asarray(result.lrs, dtype=np.float64)
    full_losses = np.asarray(result.losses, dtype=np.float64)
    ok = np.isfinite(full_lrs) & (full_lrs > 0) & np.isfinite(full_losses)
    for xs, ys in ((lrs, losses), (full_lrs[ok], full_losses[ok])):
        if xs.size == 0:
            continue
        distance = np.abs(np.log(xs) - math.log(lr))
        nearest = int(np.argmin(distance))
        if distance[nearest] <= 1.0:
            return float(ys[nearest])
    return None


def _finite_xy(points: Sequence[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Split ``(x, y)`` pairs into arrays, dropping points whose y is not finite."""
    if not points:
        return np.zeros(0), np.zeros(0)
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    keep = np.isfinite(xy[:, 1])
    return xy[keep, 0], xy[keep, 1]


def _or_nan(value: float | None) -> float:
    """A metric value, or NaN (a gap in the line) when the epoch has none."""
    return float("nan") if value is None else float(value)
