"""Tiny synthetic image folders for data tests: real PNGs, 4x4 pixels, no downloads."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from pathlib import Path

from PIL import Image


def write_image(path: Path, *, size: int = 4) -> Path:
    """A small RGB PNG whose colour depends on its name (so files differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shade = zlib.crc32(path.name.encode()) % 256
    Image.new("RGB", (size, size), (shade, 255 - shade, 128)).save(path)
    return path


def make_tree(root: Path, files: Iterable[str], *, size: int = 4) -> list[Path]:
    """Write each relative path: images for image suffixes, a line of text otherwise."""
    written: list[Path] = []
    for rel in files:
        path = root / rel
        if path.suffix.lower() in {".png", ".jpg", ".jpeg"}:
            write_image(path, size=size)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("not an image\n")
        written.append(path)
    return written


def three_vs_seven(root: Path, *, per_class: int = 3) -> list[str]:
    """MNIST_SAMPLE's layout: train/{3,7} and valid/{3,7} with ``per_class`` images each."""
    rels = [
        f"{split}/{digit}/{i:02d}.png"
        for split in ("train", "valid")
        for digit in ("3", "7")
        for i in range(per_class)
    ]
    make_tree(root, rels)
    return rels
