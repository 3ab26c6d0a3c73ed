"""Decoding images once, resized for their crop, and cutting them to ``size``.

fastai resizes and augments every item on every fetch.  fitfleet decodes and
resizes each file once (the expensive part), keeps the result as a uint8
tensor, and does the random parts (crop position, flips, affine, lighting) per
batch in :mod:`workers.training.augment`.  The geometry is fastai's (reference
§1 ``size``): CROP rescales the shorter side to the size then cuts (random
position in train, centred elsewhere), SQUISH resizes directly, PAD fits the
longer side and reflection-pads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# Decoded images are kept in memory up to this many bytes; past it they are
# decoded again for every batch (large datasets on big machines).
DEFAULT_CACHE_BYTES = 4 * 1024**3


def target_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the final images."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def resized_shape(height: int, width: int, size: tuple[int, int], mode: str) -> tuple[int, int]:
    """Shape after the one-time resize, before the crop (reference oracle 5).

    crop: ratio = min(H/h, W/w), new = round(H/ratio) x round(W/ratio);
    pad: ratio = max(...) so the longer side fits; squish: exactly ``size``.
    """
    if mode == "squish":
        return size
    ratios = (height / size[0], width / size[1])
    ratio = min(ratios) if mode == "crop" else max(ratios)
    return max(1, round(height / ratio)), max(1, round(width / ratio))


def decode(path: Path, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Open one file as RGB (grayscale and RGBA become 3 channels) and resize it.

    Returns a uint8 CHW tensor; for ``pad`` it is already padded to ``size``.
    Raises OSError/ValueError subclasses for unreadable files (callers skip them).
    """
    with Image.open(path) as image:
        image.draft("RGB", (size[1] * 2, size[0] * 2))  # JPEG: decode at a reduced scale
        rgb = image.convert("RGB")
    height, width = rgb.height, rgb.width
    new_h, new_w = resized_shape(height, width, size, mode)
    if (new_h, new_w) != (height, width):
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    array = np.asarray(rgb, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    if mode == "pad" and (new_h, new_w) != size:
        tensor = reflection_pad(tensor, size)
    return tensor


def reflection_pad(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pad a uint8 CHW image to ``size`` with reflection, centred (fastai PAD)."""
    pad_h, pad_w = size[0] - image.shape[1], size[1] - image.shape[2]
    top, left = pad_h // 2, pad_w // 2
    padding = (left, pad_w - left, top, pad_h - top)
    mode = "reflect" if pad_h < image.shape[1] and pad_w < image.shape[2] else "replicate"
    padded = F.pad(image.unsqueeze(0).float(), padding, mode=mode)
    return padded.squeeze(0).round().clamp(0, 255).to(torch.uint8)


def crop(
    image: torch.Tensor, size: tuple[int, int], row_pct: float, col_pct: float
) -> torch.Tensor:
    """Cut ``size`` out of ``image`` at a relative position (0.5, 0.5 = centre).

    fastai's offset: int((W - w + 1) * pct), the same for rows.
    """
    height, width = image.shape[1], image.shape[2]
    top = min(int((height - size[0] + 1) * row_pct), height - size[0])
    left = min(int((width - size[1] + 1) * col_pct), width - size[1])
    return image[:, max(top, 0) : max(top, 0) + size[0], max(left, 0) : max(left, 0) + size[1]]


@dataclass
class ImageStore:
    """Decoded images by index, cached while they fit in ``cache_bytes``."""

    paths: Sequence[Path]
    size: tuple[int, int]
    mode: str
    cache_bytes: int = DEFAULT_CACHE_BYTES
    threads: int = 4
    _cache: dict[int, torch.Tensor] = field(default_factory=dict)
    _cached_bytes: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, index: int) -> torch.Tensor:
        """One decoded image (uint8 CHW, resized, not yet cropped)."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        image = decode(self.paths[index], self.size, self.mode)
        if self._cached_bytes + image.numel() <= self.cache_bytes:
            self._cache[index] = image
            self._cached_bytes += image.numel()
        return image

    def get_many(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """Several images, decoding the missing ones in parallel threads."""
        missing = [i for i in indices if i not in self._cache]
        if len(missing) > 1 and self.threads > 1:
            with ThreadPoolExecutor(self.threads) as pool:
                list(pool.map(self.get, missing))
        return [self.get(i) for i in indices]


def check_readable(paths: Sequence[Path], *, threads: int = 4) -> list[tuple[int, str]]:
    """Indices of files PIL cannot read, with the reason; nothing is decoded fully."""

    def probe(index: int) -> tuple[int, str] | None:
        try:
            with Image.open(paths[index]) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            return index, f"unreadable image: {type(exc).__name__}: {exc}"
        return None

    with ThreadPoolExecutor(threads) as pool:
        results = pool.map(probe, range(len(paths)))
    return [r for r in results if r is not None]
