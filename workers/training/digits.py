"""A real, small image dataset with no download: scikit-learn's handwritten digits.

fastai's lesson 1 trains on ``MNIST_SAMPLE`` (3s and 7s).  Workers and tests
cannot reach the network, so we lay out scikit-learn's bundled 8x8 digits the
same way (``train/<class>/*.png``, ``valid/<class>/*.png``, ``labels.csv``): every
label strategy and split form can then be exercised on real pictures.
"""

from __future__ import annotations

import csv
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

_MAX_INK = 16.0  # load_digits values run from 0 (background) to 16 (full ink)


def _check(classes: Sequence[int], size: int, valid_pct: float) -> list[int]:
    """Refuse arguments that would build a useless or unloadable dataset."""
    chosen = list(classes)
    if not chosen:
        raise ValueError("classes must name at least one digit")
    wrong = [c for c in chosen if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 9]
    if wrong:
        raise ValueError(f"classes must be digits 0..9; not digits: {wrong}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"classes must not repeat: {chosen}")
    if not 8 <= size <= 4096:
        raise ValueError(f"size must be between 8 and 4096 pixels, got {size}")
    if not 0.0 <= valid_pct < 1.0:
        raise ValueError(f"valid_pct must be in [0, 1), got {valid_pct}")
    return chosen


def _prepare_target(out: Path) -> None:
    """Refuse to mix a new dataset into an existing one; an empty folder is fine."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder; choose another location")
        if any(out.iterdir()):
            raise FileExistsError(
                f"{out} already exists and is not empty; remove it or choose another folder"
            )
    out.parent.mkdir(parents=True, exist_ok=True)


def _to_image(pixels: np.ndarray, size: int) -> Image.Image:
    """8x8 ink values -> white-on-black grayscale PNG of ``size`` x ``size`` (bicubic)."""
    grey = np.clip(np.rint(pixels * (255.0 / _MAX_INK)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).resize((size, size), Image.Resampling.BICUBIC)


def build_digits(
    out: Path,
    *,
    classes: Sequence[int] = (3, 7),
    size: int = 28,
    valid_pct: float = 0.2,
    seed: int = 42,
) -> dict[str, int]:
    """Write an ``MNIST_SAMPLE``-like dataset of the given digits to ``out``.

    Layout: ``out/train/<class>/<index>.png`` and ``out/valid/<class>/<index>.png``,
    where ``<index>`` is the image's 4-digit index in ``load_digits()`` (traceable
    back to the source), plus ``out/labels.csv`` (``name,label``; one row per image,
    train and valid, sorted by name).

    The split is per class, so every class has validation images whenever the
    class has enough images: a ``RandomState(seed)`` permutation of each class's
    images (in class order), the first ``int(valid_pct * n)`` go to valid.  The
    same arguments always give the same files, byte for byte.

    Everything is written to a temporary folder next to ``out`` and renamed at the
    end, so a failure never leaves a half dataset behind.

    Returns:
        ``{"train": n_train, "valid": n_valid}``.

    Raises:
        ValueError: a class outside 0..9, a repeated class, a bad size or valid_pct.
        FileExistsError: ``out`` exists and is not an empty folder.
    """
    from sklearn.datasets import load_digits  # heavy; only this function needs it

    chosen = _check(classes, size, valid_pct)
    _prepare_target(out)
    bunch = load_digits()
    images: np.ndarray = bunch.images
    targets: np.ndarray = bunch.target
    rng = np.random.RandomState(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        rows: list[tuple[str, str]] = []
        for digit in chosen:
            indices = np.flatnonzero(targets == digit)
            perm = rng.permutation(len(indices))
            cut = int(valid_pct * len(indices))
            valid = set(perm[:cut].tolist())
            for position, index in enumerate(indices.tolist()):
                split = "valid" if position in valid else "train"
                rel = f"{split}/{digit}/{index:04d}.png"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                _to_image(images[index], size).save(tmp / rel, format="PNG")
                rows.append((rel, str(digit)))
        rows.sort()
        with (tmp / "labels.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["name", "label"])
            writer.writerows(rows)
        tmp.chmod(0o755)  # mkdtemp makes it private; a dataset is meant to be read by others
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a folder portably
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = {
        "train": sum(r[0].startswith("train/") for r in rows),
        "valid": sum(r[0].startswith("valid/") for r in rows),
    }
    logger.info("digits %s written to %s: %s", chosen, out, counts)
    return counts
