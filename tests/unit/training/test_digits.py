"""The offline MNIST_SAMPLE stand-in built from scikit-learn's digits."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.spec import Data
from workers.training import digits
from workers.training.digits import build_digits
from workers.training.items import build_items


def read_labels(out: Path) -> list[list[str]]:
    with (out / "labels.csv").open(newline="") as handle:
        return list(csv.reader(handle))


def test_layout_labels_and_counts(tmp_path: Path) -> None:
    out = tmp_path / "mnist_sample"
    counts = build_digits(out)
    # load_digits has 183 threes and 179 sevens; int(0.2 * n) of each go to valid.
    assert counts == {"train": 147 + 144, "valid": 36 + 35}
    assert sorted(p.name for p in out.iterdir()) == ["labels.csv", "train", "valid"]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["3", "7"]
    assert len(list((out / "valid" / "3").glob("*.png"))) == 36
    assert len(list((out / "valid" / "7").glob("*.png"))) == 35

    rows = read_labels(out)
    assert rows[0] == ["name", "label"]
    body = rows[1:]
    assert len(body) == counts["train"] + counts["valid"]
    assert body == sorted(body)
    for name, label in body:
        split, digit, file = name.split("/")
        assert split in {"train", "valid"}
        assert digit == label
        assert (out / name).is_file()
        assert len(file) == len("0000.png")
    assert {r[0] for r in body} == {p.relative_to(out).as_posix() for p in out.rglob("*.png")}


def test_images_are_white_on_black_grayscale(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    out = tmp_path / "d"
    build_digits(out, classes=(0,), size=16, valid_pct=0.0)
    files = sorted((out / "train" / "0").glob("*.png"))
    first = files[0]
    with Image.open(first) as image:
        assert image.mode == "L"
        assert image.size == (16, 16)
        pixels = np.asarray(image)
    # The corners of a digit are background (ink 0 -> black), the stroke is bright.
    assert pixels[0, 0] == 0
    assert pixels.max() > 200
    # The file name is the index in load_digits: its 8x8 source upscales to this image.
    index = int(first.stem)
    source = load_digits().images[index]
    assert load_digits().target[index] == 0
    expected = Image.fromarray(np.rint(source * 255 / 16).astype(np.uint8)).resize(
        (16, 16), Image.Resampling.BICUBIC
    )
    assert np.array_equal(pixels, np.asarray(expected))


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    def snapshot(out: Path) -> dict[str, bytes]:
        return {
            p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()
        }

    build_digits(tmp_path / "a", seed=1)
    build_digits(tmp_path / "b", seed=1)
    build_digits(tmp_path / "c", seed=2)
    a, b, c = snapshot(tmp_path / "a"), snapshot(tmp_path / "b"), snapshot(tmp_path / "c")
    assert a == b
    assert set(a) != set(c)  # another seed moves other images to valid


def test_refuses_non_empty_out_but_accepts_empty(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        build_digits(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_digits(empty, classes=(1,), valid_pct=0.5)["valid"] > 0
    assert (empty / "labels.csv").is_file()


@pytest.mark.parametrize(
    ("classes", "message"),
    [((3, 10), r"digits 0\.\.9; not digits: \[10\]"), ((), "at least one"), ((3, 3), "repeat")],
)
def test_bad_classes(tmp_path: Path, classes: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_digits(tmp_path / "x", classes=classes)
    assert not (tmp_path / "x").exists()


def test_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = digits._to_image

    def flaky(pixels: np.ndarray, size: int) -> Image.Image:
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("disk full")
        return real(pixels, size)

    monkeypatch.setattr(digits, "_to_image", flaky)
    with pytest.raises(OSError, match="disk full"):
        build_digits(tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor the temporary folder


def test_builds_data_the_items_layer_reads(tmp_path: Path) -> None:
    out = tmp_path / "mnist_sample"
    counts = build_digits(out)
    by_folder = build_items(Data.model_validate({"source": "x"}), out)
    assert by_folder.classes == ["3", "7"]
    assert len(by_folder.train) == counts["train"]
    assert len(by_folder.valid) == counts["valid"]
    by_csv = build_items(
        Data.model_validate({"source": "x", "labels": {"from": "csv"}, "split": {"by": "folder"}}),
        out,
    )
    assert [i.rel for i in by_csv.train] == [i.rel for i in by_folder.train]
