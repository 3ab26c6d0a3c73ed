"""Decoding, resize geometry (oracle 5), crop, reflection padding and the image cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workers.training import images
from workers.training.images import (
    ImageStore,
    check_readable,
    crop,
    decode,
    reflection_pad,
    resized_shape,
    target_size,
)

# --- geometry (oracle 5) -------------------------------------------------------------------


def test_oracle_5_crop_resize_shape():
    assert resized_shape(300, 400, (224, 224), "crop") == (224, 299)
    assert resized_shape(400, 300, (224, 224), "crop") == (299, 224)


def test_oracle_5_centre_crop_offset_is_38_columns():
    columns = torch.arange(299, dtype=torch.int32).expand(1, 224, 299)
    out = crop(columns, (224, 224), 0.5, 0.5)
    assert out.shape == (1, 224, 224)
    assert int((299 - 224 + 1) * 0.5) == 38
    assert int(out[0, 0, 0]) == 38
    assert int(out[0, 0, -1]) == 38 + 223
    rows = torch.arange(299, dtype=torch.int32).view(1, 299, 1).expand(1, 299, 224)
    assert int(crop(rows, (224, 224), 0.5, 0.5)[0, 0, 0]) == 38


def test_crop_extremes_stay_inside_the_image():
    columns = torch.arange(299, dtype=torch.int32).expand(1, 224, 299)
    assert int(crop(columns, (224, 224), 0.0, 0.0)[0, 0, 0]) == 0
    right = crop(columns, (224, 224), 1.0, 1.0)
    assert right.shape == (1, 224, 224)
    assert int(right[0, 0, -1]) == 298
    assert int(crop(columns, (224, 224), 0.999, 0.999)[0, 0, -1]) == 298


def test_squish_and_pad_shapes():
    assert resized_shape(300, 400, (224, 224), "squish") == (224, 224)
    assert resized_shape(300, 400, (100, 50), "squish") == (100, 50)
    # pad fits the longer side: ratio = max(300/224, 400/224).
    assert resized_shape(300, 400, (224, 224), "pad") == (168, 224)
    assert resized_shape(400, 300, (224, 224), "pad") == (224, 168)
    assert resized_shape(1, 1000, (16, 16), "pad") == (1, 16)
    assert target_size(32) == (32, 32)
    assert target_size((24, 40)) == (24, 40)


# --- decode --------------------------------------------------------------------------------


def _save(path: Path, image: Image.Image) -> Path:
    image.save(path)
    return path


def test_decode_grayscale_png(tmp_path):
    array = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    path = _save(tmp_path / "gray.png", Image.fromarray(array, mode="L"))
    out = decode(path, (8, 8), "squish")
    assert out.dtype == torch.uint8
    assert out.shape == (3, 8, 8)
    for channel in range(3):
        assert torch.equal(out[channel], torch.from_numpy(array))


def test_decode_rgba_png_drops_alpha(tmp_path):
    rgba = np.zeros((6, 6, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    path = _save(tmp_path / "rgba.png", Image.fromarray(rgba, mode="RGBA"))
    out = decode(path, (6, 6), "squish")
    assert out.dtype == torch.uint8
    assert out.shape == (3, 6, 6)
    assert out[:, 0, 0].tolist() == [10, 20, 30]


def test_decode_palette_png(tmp_path):
    image = Image.new("P", (5, 4))
    image.putpalette([255, 0, 0, 0, 255, 0, *([0] * (256 * 3 - 6))])
    image.putpixel((0, 0), 1)
    path = _save(tmp_path / "palette.png", image)
    out = decode(path, (4, 5), "squish")
    assert out.dtype == torch.uint8
    assert out.shape == (3, 4, 5)
    assert out[:, 0, 0].tolist() == [0, 255, 0]
    assert out[:, 1, 1].tolist() == [255, 0, 0]


def test_decode_crop_keeps_aspect(tmp_path):
    path = _save(tmp_path / "wide.png", Image.new("RGB", (40, 30), (1, 2, 3)))
    out = decode(path, (15, 15), "crop")
    assert out.shape == (3, 15, 20)
    assert out[:, 7, 10].tolist() == [1, 2, 3]


def test_decode_pad_fills_the_size(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = _save(tmp_path / "wide.png", Image.fromarray(array))
    out = decode(path, (20, 20), "pad")
    assert out.shape == (3, 20, 20)
    assert out.dtype == torch.uint8


def test_decode_squish_resizes_directly(tmp_path):
    path = _save(tmp_path / "img.jpg", Image.new("RGB", (64, 48), (200, 100, 50)))
    out = decode(path, (10, 30), "squish")
    assert out.shape == (3, 10, 30)
    # JPEG is lossy: a flat colour comes back close to itself.
    assert (out[:, 5, 15].int() - torch.tensor([200, 100, 50])).abs().max() <= 3


# --- reflection_pad ------------------------------------------------------------------------


def test_reflection_pad_reflects_and_centres():
    image = torch.randint(0, 256, (3, 16, 20), dtype=torch.uint8)
    out = reflection_pad(image, (20, 24))
    assert out.shape == (3, 20, 24)
    assert out.dtype == torch.uint8
    # top = 2, left = 2: the original sits in the middle.
    assert torch.equal(out[:, 2:18, 2:22], image)
    # Reflection does not repeat the edge row: padded row 0 is image row 2.
    assert torch.equal(out[:, 0, 2:22], image[:, 2])
    assert torch.equal(out[:, 1, 2:22], image[:, 1])


def test_reflection_pad_larger_than_the_image_falls_back_to_replicate():
    image = torch.randint(0, 256, (3, 2, 10), dtype=torch.uint8)
    out = reflection_pad(image, (10, 10))
    assert out.shape == (3, 10, 10)
    assert torch.equal(out[:, 4:6], image)
    assert torch.equal(out[:, 0], image[:, 0])
    assert torch.equal(out[:, -1], image[:, 1])


def test_reflection_pad_odd_amounts():
    image = torch.zeros(3, 5, 8, dtype=torch.uint8)
    assert reflection_pad(image, (8, 8)).shape == (3, 8, 8)
    assert reflection_pad(torch.zeros(3, 8, 5, dtype=torch.uint8), (8, 8)).shape == (3, 8, 8)


# --- ImageStore ----------------------------------------------------------------------------


def _store_files(tmp_path: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        array = np.full((8, 8, 3), 10 * (i + 1), dtype=np.uint8)
        paths.append(_save(tmp_path / f"{i}.png", Image.fromarray(array)))
    return paths


def _counting_decode(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = images.decode

    def counting(path: Path, size: tuple[int, int], mode: str) -> torch.Tensor:
        calls.append(path)
        return real(path, size, mode)

    monkeypatch.setattr(images, "decode", counting)
    return calls


def test_image_store_caches_within_budget_only(tmp_path, monkeypatch):
    paths = _store_files(tmp_path, 3)
    calls = _counting_decode(monkeypatch)
    one_image = 3 * 8 * 8
    store = ImageStore(paths, (8, 8), "squish", cache_bytes=2 * one_image, threads=1)
    assert len(store) == 3
    first = [store.get(i) for i in range(3)]
    second = [store.get(i) for i in range(3)]
    # Images 0 and 1 fit the budget and are decoded once; image 2 every time.
    assert calls == [paths[0], paths[1], paths[2], paths[2]]
    for i in range(3):
        assert torch.equal(first[i], second[i])
        assert int(first[i][0, 0, 0]) == 10 * (i + 1)
    assert store.get(0) is first[0]


def test_image_store_zero_budget_never_caches(tmp_path, monkeypatch):
    paths = _store_files(tmp_path, 2)
    calls = _counting_decode(monkeypatch)
    store = ImageStore(paths, (8, 8), "squish", cache_bytes=0, threads=1)
    store.get(0)
    store.get(0)
    assert calls == [paths[0], paths[0]]


def test_image_store_get_many_in_order(tmp_path, monkeypatch):
    paths = _store_files(tmp_path, 4)
    calls = _counting_decode(monkeypatch)
    store = ImageStore(paths, (8, 8), "squish", threads=2)
    got = store.get_many([3, 0, 2])
    assert [int(t[0, 0, 0]) for t in got] == [40, 10, 30]
    assert sorted(str(p) for p in calls) == sorted(str(paths[i]) for i in (0, 2, 3))
    again = store.get_many([0, 2, 3, 0])
    assert [int(t[0, 0, 0]) for t in again] == [10, 30, 40, 10]
    assert len(calls) == 3


def test_check_readable_flags_broken_files(tmp_path):
    good = _save(tmp_path / "good.png", Image.new("RGB", (4, 4)))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    problems = check_readable([good, bad], threads=1)
    assert [index for index, _ in problems] == [1]
    assert problems[0][1].startswith("unreadable image")
