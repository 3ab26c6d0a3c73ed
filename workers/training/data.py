"""The DataBunch: labelled items turned into normalized, augmented batches.

Items come from :mod:`workers.training.items` (labels and split), pixels from
:mod:`workers.training.images` (decoded once) and the random train-time
transforms from :mod:`workers.training.augment` (per batch).  Loader semantics
are fastai's: train batches are shuffled with ``drop_last=True``; validation is
in dataset order and keeps its last partial batch.

Every random choice of an epoch (order, crop positions, augmentations) comes
from a generator seeded by (seed, stage, epoch), so a resumed epoch is the same
epoch.  Under DDP each rank takes an equal, disjoint slice of the same order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared.errors import DataError
from shared.results import SkippedFile
from shared.spec import Augment, Data
from workers.training.augment import augment_batch
from workers.training.images import (
    DEFAULT_CACHE_BYTES,
    ImageStore,
    check_readable,
    crop,
    target_size,
)
from workers.training.items import ItemSplit, LabeledItem, build_items

log = logging.getLogger(__name__)

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STATS_SAMPLE = 1024

Batch = tuple[torch.Tensor, torch.Tensor]


def batch_seed(seed: int, *parts: int) -> int:
    """A stable 63-bit seed from the run seed and (stage, epoch, purpose) numbers."""
    value = seed & 0x7FFFFFFF
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return value


@dataclass
class ImageSet:
    """One split: files, their targets and the decoded pixels."""

    items: list[LabeledItem]
    store: ImageStore
    targets: torch.Tensor  # int64 (N,) single-label; float (N, C) multi-label

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class DataBunch:
    """Everything the loop needs from the data, and what the report says of it."""

    classes: list[str]
    multi_label: bool
    train: ImageSet
    valid: ImageSet
    test: ImageStore | None
    test_files: list[Path]
    size: tuple[int, int]
    augment: Augment | None
    mean: torch.Tensor
    std: torch.Tensor
    source: Path
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def c(self) -> int:
        """Number of classes (fastai ``data.c``)."""
        return len(self.classes)

    def batches_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Train batches per epoch per rank: floor(n_train / batch_size) (drop_last)."""
        return len(self.train) // (batch_size * world_size)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std on the batch's device."""
        mean = self.mean.to(x.device, x.dtype).view(1, -1, 1, 1)
        std = self.std.to(x.device, x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] pixels for display."""
        mean = self.mean.to(x.device, x.dtype).view(1, -1, 1, 1)
        std = self.std.to(x.device, x.dtype).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0, 1)

    def train_batches(
        self,
        *,
        batch_size: int,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = True,
        start: int = 0,
    ) -> Iterator[Batch]:
        """One epoch of shuffled, augmented, normalized train batches (drop_last).

        ``batch_size`` is per rank; every rank walks the same permutation and
        takes its own contiguous part of each global batch.  ``start`` skips
        that many batches, drawing their random numbers without touching any
        pixel, so a run resumed mid-epoch continues with the very same batches.
        """
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.train), generator=gen)
        global_bs = batch_size * world_size
        for number, first in enumerate(range(0, len(order) - global_bs + 1, global_bs)):
            indices = order[first : first + global_bs]
            rows = torch.rand(global_bs, generator=gen)
            cols = torch.rand(global_bs, generator=gen)
            # Draw augmentations for the whole global batch so ranks stay in step.
            aug_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            if number < start:
                continue
            mine = slice(rank * batch_size, (rank + 1) * batch_size)
            x = self._pixels(
                self.train.store, indices[mine].tolist(), rows[mine], cols[mine], device
            )
            if augment and self.augment is not None:
                aug_gen = torch.Generator().manual_seed(aug_seed + rank)
                x = augment_batch(x, self.augment, aug_gen)
            yield self.normalize(x), self.train.targets[indices[mine]].to(device, non_blocking=True)

    def valid_batches(
        self, *, batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Validation batches in dataset order, centre-cropped: (x, y, indices).

        Under DDP rank r takes items r, r+W, r+2W...: no item is seen twice or
        dropped, so gathered sums equal single-process evaluation.
        """
        indices = list(range(rank, len(self.valid), world_size))
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            x = self._centre(self.valid.store, chunk, device)
            yield (
                self.normalize(x),
                self.valid.targets[chunk].to(device, non_blocking=True),
                torch.tensor(chunk),
            )

    def test_batches(self, *, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
        """Unlabeled test images, centre-cropped and normalized, in file order."""
        if self.test is None:
            return
        for start in range(0, len(self.test), batch_size):
            chunk = list(range(start, min(start + batch_size, len(self.test))))
            yield self.normalize(self._centre(self.test, chunk, device))

    def show_batch(self, n: int, *, seed: int) -> tuple[torch.Tensor, list[str]]:
        """n augmented train images in [0, 1] (N, 3, H, W) and their titles."""
        batch = next(
            self.train_batches(
                batch_size=min(n, len(self.train)), seed=seed, device=torch.device("cpu")
            ),
            None,
        )
        if batch is None:
            return torch.zeros(0, 3, *self.size), []
        x, y = batch
        return self.denormalize(x), [self.label_text(t) for t in y]

    def label_text(self, target: torch.Tensor) -> str:
        """Class name for a target (multi-label: names joined by ';')."""
        if self.multi_label:
            return ";".join(self.classes[i] for i in torch.nonzero(target).flatten().tolist())
        return self.classes[int(target)]

    def _pixels(
        self,
        store: ImageStore,
        indices: Sequence[int],
        rows: torch.Tensor,
        cols: torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        images = store.get_many(indices)
        crops = [
            crop(img, self.size, float(r), float(c))
            for img, r, c in zip(images, rows, cols, strict=True)
        ]
        return _to_float(torch.stack(crops), device)

    def _centre(
        self, store: ImageStore, indices: Sequence[int], device: torch.device
    ) -> torch.Tensor:
        images = store.get_many(indices)
        return _to_float(torch.stack([crop(img, self.size, 0.5, 0.5) for img in images]), device)


def _to_float(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 on the host -> float in [0, 1] on the device (the copy stays uint8)."""
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device).float().div_(255)


def _targets(items: Sequence[LabeledItem], classes: list[str], multi_label: bool) -> torch.Tensor:
    index = {name: i for i, name in enumerate(classes)}
    if not multi_label:
        return torch.tensor([index[str(item.label)] for item in items], dtype=torch.long)
    targets = torch.zeros(len(items), len(classes))
    for row, item in enumerate(items):
        labels = item.label if isinstance(item.label, tuple) else (item.label,)
        for label in labels:
            if label in index:
                targets[row, index[label]] = 1.0
    return targets


def _drop_unreadable(
    items: list[LabeledItem], skipped: list[SkippedFile], source: Path
) -> list[LabeledItem]:
    bad = dict(check_readable([item.path for item in items]))
    for index, reason in bad.items():
        skipped.append(SkippedFile(path=items[index].rel, reason=reason))
    return [item for i, item in enumerate(items) if i not in bad]


def _check_classes(split: ItemSplit, train: list[LabeledItem], valid: list[LabeledItem]) -> None:
    """After unreadable files are gone, every single-label class still needs images."""
    if not train:
        raise DataError("data: no readable training image is left (see skipped files)")
    if split.multi_label:
        return
    for name, items in (("train", train), ("valid", valid)):
        if name == "valid" and not split.valid:
            continue
        present = {str(item.label) for item in items}
        empty = [c for c in split.classes if c not in present]
        if empty:
            raise DataError(
                f"data: class(es) {', '.join(empty)} have no readable image in the {name} set"
            )


def dataset_stats(store: ImageStore, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over (up to) the first STATS_SAMPLE centre crops."""
    count = min(len(store), STATS_SAMPLE)
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for start in range(0, count, 256):
        chunk = store.get_many(range(start, min(start + 256, count)))
        x = torch.stack([crop(img, size, 0.5, 0.5) for img in chunk]).double() / 255
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        pixels += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / pixels
    std = (total_sq / pixels - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def build_data(data: Data, source_dir: Path, *, cache_bytes: int | None = None) -> DataBunch:
    """Read labels and split, drop unreadable files, and set up the image stores.

    Raises DataError before any training time is spent when the data cannot
    serve the spec.
    """
    split = build_items(data, source_dir)
    skipped = list(split.skipped)
    train = _drop_unreadable(split.train, skipped, source_dir)
    valid = _drop_unreadable(split.valid, skipped, source_dir)
    _check_classes(split, train, valid)
    size = target_size(data.size)
    mode = data.resolved_resize
    budget = DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes
    train_store = ImageStore([i.path for i in train], size, mode, cache_bytes=budget)
    valid_store = ImageStore([i.path for i in valid], size, mode, cache_bytes=budget)
    test_store = None
    test_files = list(split.test)
    if test_files:
        bad = dict(check_readable(test_files))
        for index, reason in bad.items():
            skipped.append(SkippedFile(path=str(test_files[index]), reason=reason))
        test_files = [p for i, p in enumerate(test_files) if i not in bad]
        test_store = ImageStore(test_files, size, mode, cache_bytes=budget)
    if data.normalize == "imagenet":
        mean, std = torch.tensor(IMAGENET_STATS[0]), torch.tensor(IMAGENET_STATS[1])
    elif data.normalize == "dataset":
        mean, std = dataset_stats(train_store, size)
    else:
        mean, std = torch.zeros(3), torch.ones(3)
    if skipped:
        log.warning("%d files skipped (listed in the report)", len(skipped))
    return DataBunch(
        classes=split.classes,
        multi_label=split.multi_label,
        train=ImageSet(train, train_store, _targets(train, split.classes, split.multi_label)),
        valid=ImageSet(valid, valid_store, _targets(valid, split.classes, split.multi_label)),
        test=test_store,
        test_files=test_files,
        size=size,
        augment=data.augment_params,
        mean=mean,
        std=std,
        source=source_dir,
        skipped=skipped,
    )


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """fastai's len(train_dl) with drop_last."""
    return max(0, math.floor(n_train / batch_size))
