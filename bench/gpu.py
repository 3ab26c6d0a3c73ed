"""GPU training throughput of the fitfleet engine vs the GPU's own matmul peak (a benchmark).

What is measured, in one run of this script, on one device:

1. **Matmul peak.**  ``torch.matmul`` of two ``--matmul-n`` square matrices
   (8192 on CUDA), repeated, timed with CUDA events after a warm-up: bf16,
   tf32 and plain fp32 on CUDA; fp32 only on a CPU.  TFLOP/s = 2 n^3 / second.
   The bf16 figure (fp32 on a CPU, the precision ``auto`` picks there) is the
   "peak" every training row is compared with: it is what this very GPU reaches
   on the easiest possible work, measured in the same run, not a datasheet.
2. **Training images/second** for each ``--archs`` network (resnet50 and
   resnet34) at ``--size`` px (224), batch ``--batch`` (256), train mode,
   forward + backward + AdamW step on every batch, with
   ``torch.backends.cudnn.benchmark = True``, in two data modes:

   * **synthetic**: one random normalized batch already on the device, reused.
     Nothing but the model, loss and optimizer is timed.
   * **real**: ``--images`` JPEGs (random gradients + noise, 256-320 px, 10
     classes) written into a temporary folder with PIL and decoded by fitfleet's
     own pipeline: ``build_data`` (a :class:`shared.spec.Data` spec pointing at
     the folder, ``augment: default``, ImageNet normalization) and
     ``DataBunch.train_batches`` wrapped in the engine's ``prefetch``, exactly as
     ``run_experiment`` feeds its loop.  The engine decodes each file once and
     caches the pixels, so the first epoch (JPEG decoding, 4 threads) is
     reported on its own row (``real, decode epoch``) and the timed ``real``
     rows run on cached pixels (crop, uint8 -> float, the GPU-side augmentation
     and normalization per batch).  Real-data rows may be input-bound.

   The **engine** rows run fitfleet's pieces unchanged: ``build_model(arch, 10,
   Head())`` (torchvision body + fastai head), ``Learner`` with
   ``Precision.choose("auto", device)`` (bf16 autocast where supported,
   channels_last on CUDA, fused AdamW in fastai's 6 parameter groups),
   ``set_train("all")``, and ``workers.training.loop.train_epoch`` (one-cycle
   schedule, ``float(loss)`` divergence check and loss smoothing every batch).

   The **baseline** rows are the smallest honest hand-written loop: a plain
   torchvision ``resnetXX(num_classes=10)``, ``torch.optim.AdamW`` (fused on
   CUDA, betas (0.9, 0.99), wd 1e-2), ``torch.autocast`` in the same dtype,
   channels_last on CUDA, ``F.cross_entropy``, no per-batch sync.  Synthetic:
   the same random batch.  Real: the same JPEG folder through a
   ``torch.utils.data.DataLoader`` with ``--loader-workers`` processes that
   decode every file on every epoch (PIL, ``Resize`` + ``RandomCrop`` + flip),
   pinned memory, float conversion and normalization on the device.  (That is
   how a hand-written loop usually reads images; the engine caches instead, so
   the real-data ratio compares two input pipelines, not only two loops.)

   Timing: ``--warmup`` untimed steps first (cudnn autotuning, allocator,
   lazy init), then up to ``--steps`` steps between two
   ``torch.cuda.synchronize()`` calls.  Achieved model TFLOP/s = images/s x
   training FLOPs per image, where training FLOPs = 3 x the forward FLOPs of one
   image counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
   convolutions only, the usual convention); *of peak* = that / the measured
   bf16 matmul TFLOP/s.  *ratio* = engine img/s / baseline img/s of the same
   arch and data mode, measured back to back in this process.

Time budget: ``--budget-s`` (240 s) bounds the whole run; each measurement
gets a share of what is left and stops early (fewer timed steps, reported)
when it runs out, and anything that cannot start is printed as skipped.  On
an H200 the defaults finish in about 2 minutes.

Run:  ``PYTHONPATH=. python bench/gpu.py`` (CUDA), or on a CPU for a smoke run:
``PYTHONPATH=. python bench/gpu.py --device cpu --size 32 --batch 8 --steps 2
--warmup 1 --archs resnet18 --images 48 --matmul-n 512``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from shared.spec import Data, Head, Stage
from workers.training.data import IMAGENET_STATS, Batch, build_data
from workers.training.learner import ADAM_BETAS, ADAM_EPS, Learner, Precision
from workers.training.loop import StageCursor, StopRequested, train_epoch
from workers.training.models import build_model
from workers.training.prefetch import prefetch

N_CLASSES = 10
SEED = 42
LR = 1e-3
WD = 1e-2
MIN_SHARE_S = 4.0  # a measurement is never given less than this much time
GIB = 1024**3


# --------------------------------------------------------------------------- timing


class Budget:
    """The whole run's deadline, shared out between the measurements still to come."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def share(self, remaining_measurements: int) -> float:
        """Seconds the next measurement may take (0 when the budget is spent)."""
        left = self.left()
        if left <= 0:
            return 0.0
        return max(MIN_SHARE_S, left / max(1, remaining_measurements))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Peak:
    """One matmul peak measurement."""

    dtype: str
    n: int
    reps: int
    seconds: float
    tflops: float


def matmul_peak(
    device: torch.device, dtype: torch.dtype, name: str, n: int, max_seconds: float
) -> Peak:
    """TFLOP/s of repeated n x n x n matmuls; reps are sized from a first timing."""
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    sync(device)
    began = time.perf_counter()
    torch.matmul(a, b, out=out)
    sync(device)
    one = max(time.perf_counter() - began, 1e-6)
    reps = int(max(3, min(200, max_seconds / one)))
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        began = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        seconds = time.perf_counter() - began
    del a, b, out
    return Peak(name, n, reps, seconds, 2 * n**3 * reps / seconds / 1e12)


def measure_peaks(device: torch.device, n: int, budget: Budget) -> list[Peak]:
    """bf16, tf32 and fp32 on CUDA (tf32 setting restored); fp32 on a CPU."""
    if device.type != "cuda":
        return [matmul_peak(device, torch.float32, "fp32", n, min(1.0, budget.share(8)))]
    peaks = [matmul_peak(device, torch.bfloat16, "bf16", n, 1.0)]
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        peaks.append(matmul_peak(device, torch.float32, "tf32", n, 1.0))
        torch.backends.cuda.matmul.allow_tf32 = False
        peaks.append(matmul_peak(device, torch.float32, "fp32", n, 1.0))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return peaks


def forward_flops(model: nn.Module, size: int) -> int:
    """Forward FLOPs of one image (FlopCounterMode: matmuls and convolutions), on a CPU copy."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    model.train(was_training)
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One measurement."""

    arch: str
    data: str  # "synthetic", "real" or "real, decode epoch"
    loop: str  # "engine" or "baseline"
    images_per_second: float | None
    steps: int
    seconds: float
    train_gflop_per_image: float
    model_tflops: float | None = None
    of_peak: float | None = None
    ratio: float | None = None
    peak_mem_gib: float | None = None
    final_loss: float | None = None
    note: str = ""


def finish_row(row: Row, images: int, seconds: float, peak: float, device: torch.device) -> Row:
    row.seconds = seconds
    if images > 0 and seconds > 0:
        row.images_per_second = images / seconds
        row.model_tflops = row.images_per_second * row.train_gflop_per_image / 1000
        row.of_peak = row.model_tflops / peak
    if device.type == "cuda":
        row.peak_mem_gib = torch.cuda.max_memory_allocated(device) / GIB
    return row


# --------------------------------------------------------------------------- data


def write_jpegs(folder: Path, count: int, seed: int = SEED) -> None:
    """``count`` train JPEGs (+ 2 valid per class), 256-320 px a side, gradients + noise.

    Layout ``train/classK/*.jpg`` and ``valid/classK/*.jpg`` (a folder split), so
    the validation set covers every class whatever ``count`` is.
    """
    rng = np.random.default_rng(seed)
    classes = min(N_CLASSES, count)  # a valid label must occur in train
    for index in range(count + 2 * classes):
        height, width = (int(v) for v in rng.integers(256, 321, size=2))
        ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
        xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
        colour = rng.random((2, 1, 1, 3), dtype=np.float32)
        pixels = ys * colour[0] + xs * colour[1] + rng.normal(0, 0.08, (height, width, 3))
        array = (np.clip(pixels / 2, 0, 1) * 255).astype(np.uint8)
        split = "train" if index < count else "valid"
        target = folder / split / f"class{index % classes}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(target / f"img{index:05d}.jpg", quality=90)


class JpegFolder(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """The baseline's dataset: decode + resize + random crop + flip on every fetch."""

    def __init__(self, files: list[Path], classes: list[str], size: int) -> None:
        from torchvision import transforms

        self.files = files
        self.targets = [classes.index(f.parent.name) for f in files]
        self.transform = transforms.Compose(
            [
                transforms.Resize(size),
                transforms.RandomCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.PILToTensor(),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[index]) as image:
            tensor = self.transform(image.convert("RGB"))
        return tensor, self.targets[index]


def endless(make_epoch: Callable[[int], Iterator[Batch]], first_epoch: int) -> Iterator[Batch]:
    """Epoch after epoch of batches, for as many steps as the consumer takes."""
    for epoch in itertools.count(first_epoch):
        yield from make_epoch(epoch)


# --------------------------------------------------------------------------- engine


def engine_learner(arch: str, device: torch.device, size: int) -> tuple[Learner, int]:
    """fitfleet's model and Learner as ``run_experiment`` builds them; and forward FLOPs."""
    torch.manual_seed(SEED)
    model = build_model(arch, N_CLASSES, Head())
    flops = forward_flops(model, size)
    learner = Learner(
        core=model,
        arch=arch,
        device=device,
        multi_label=False,
        precision=Precision.choose("auto", device),
    )
    learner.set_train("all", wd=WD)
    return learner, flops


def engine_run(
    learner: Learner,
    batches: Iterator[Batch],
    *,
    batch_size: int,
    steps: int,
    max_seconds: float,
) -> tuple[int, float, int, float]:
    """``train_epoch`` over ``batches`` for up to ``steps`` steps or ``max_seconds``.

    Returns (images, seconds, steps, last smoothed loss); the clock is read
    after a device sync on both ends.
    """
    stage = Stage(name="bench", train="all", epochs=1)
    cursor = StageCursor()
    device = learner.device
    sync(device)
    began = time.perf_counter()
    deadline = began + max_seconds

    def should_stop() -> bool:
        return cursor.batch >= steps or time.perf_counter() >= deadline

    with contextlib.suppress(StopRequested):
        train_epoch(
            learner,
            batches,
            stage=stage,
            cursor=cursor,
            total_steps=max(steps, 1),
            lrs=[LR] * len(learner.groups),
            on_batch=lambda _batch, _loss: None,
            should_stop=should_stop,
        )
    sync(device)
    seconds = time.perf_counter() - began
    loss = cursor.points[-1].smooth_loss if cursor.points else math.nan
    return cursor.batch * batch_size, seconds, cursor.batch, loss


# --------------------------------------------------------------------------- baseline


@dataclass
class Baseline:
    """A hand-written loop: plain torchvision resnet, AdamW, autocast, channels_last."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype | None
    flops: int

    @classmethod
    def build(cls, arch: str, device: torch.device, size: int) -> Baseline:
        from torchvision import models as tv_models

        torch.manual_seed(SEED)
        model: nn.Module = getattr(tv_models, arch)(weights=None, num_classes=N_CLASSES)
        flops = forward_flops(model, size)
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=LR,
            betas=ADAM_BETAS,
            eps=ADAM_EPS,
            weight_decay=WD,
            fused=device.type == "cuda",
        )
        dtype = Precision.choose("auto", device).dtype
        return cls(model, optimizer, device, dtype, flops)

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def run(
        self, batches: Iterator[Batch], *, steps: int, max_seconds: float
    ) -> tuple[int, float, int, float]:
        """Up to ``steps`` steps or ``max_seconds``; (images, seconds, steps, last loss)."""
        self.model.train()
        sync(self.device)
        began = time.perf_counter()
        images = done = 0
        loss = torch.zeros(())
        for x, y in batches:
            loss = self.step(x, y)
            images += int(x.shape[0])
            done += 1
            if done >= steps or time.perf_counter() - began >= max_seconds:
                break
        sync(self.device)
        return images, time.perf_counter() - began, done, float(loss)


def loader_batches(
    loader: torch.utils.data.DataLoader[tuple[torch.Tensor, int]], device: torch.device
) -> Iterator[Batch]:
    """The baseline's real-data batches: uint8 from the workers -> normalized float on device."""
    mean = torch.tensor(IMAGENET_STATS[0], device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STATS[1], device=device).view(1, 3, 1, 1)
    while True:
        for x, y in loader:
            x = x.to(device, non_blocking=True).float().div_(255)
            yield (x - mean) / std, y.to(device, non_blocking=True)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="cuda, cuda:N or cpu")
    parser.add_argument("--archs", default="resnet50,resnet34", help="comma-separated")
    parser.add_argument("--size", type=int, default=224, help="image size (px)")
    parser.add_argument("--batch", type=int, default=256, help="batch size")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps before each")
    parser.add_argument(
        "--images", type=int, default=0, help="JPEGs for the real-data rows (0: 10 batches' worth)"
    )
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=min(12, max(1, (os.cpu_count() or 2) - 2)),
        help="DataLoader worker processes of the baseline's real-data loop",
    )
    parser.add_argument("--matmul-n", type=int, default=0, help="matmul size (0: 8192 / 1024)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="time budget of the run")
    parser.add_argument("--skip-real", action="store_true", help="synthetic data only")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def header(device: torch.device, args: argparse.Namespace) -> list[str]:
    lines = [f"fitfleet GPU throughput benchmark  {date.today()}  torch {torch.__version__}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"device {props.name}, {props.total_memory / GIB:.0f} GiB, "
            f"{props.multi_processor_count} SMs, CUDA {torch.version.cuda}, "
            f"cudnn {torch.backends.cudnn.version()}, {os.cpu_count()} CPUs"
        )
    else:
        lines.append(
            f"device CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} torch threads)"
        )
        lines.append(
            "*** NO GPU: every number below is from the CPU (fp32, peak = fp32 matmul); "
            "a smoke run, not a GPU result ***"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch.cuda.is_available() is False")
        if device.index is None:  # plain "cuda": older torch wants an index here
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    cudnn_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    precision = Precision.choose("auto", device)
    lines = header(device, args)
    for line in lines:
        print(line, flush=True)
    print(
        f"precision auto -> {precision.name}; channels_last {device.type == 'cuda'}; "
        f"cudnn.benchmark True (was {cudnn_before} after importing the engine)",
        flush=True,
    )

    # 1. matmul peak
    n = args.matmul_n or (8192 if device.type == "cuda" else 1024)
    peaks = measure_peaks(device, n, budget)
    peak_name = "bf16" if device.type == "cuda" and precision.name == "bf16" else "fp32"
    if device.type == "cuda" and precision.name == "fp32":
        peak_name = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    peak = next(p for p in peaks if p.dtype == peak_name).tflops
    for p in peaks:
        print(
            f"matmul peak {p.dtype:>4}: {p.tflops:8.4g} TFLOP/s  ({p.n}^3 x {p.reps} in "
            f"{p.seconds:.3f} s){'  <- the peak of the table' if p.dtype == peak_name else ''}",
            flush=True,
        )

    # 2. real data on disk (written once, shared by every arch)
    tmp = None
    bunch = None
    files: list[Path] = []
    real_note = ""
    n_images = args.images or args.batch * 10
    if not args.skip_real:
        tmp = tempfile.TemporaryDirectory(prefix="fitfleet-bench-gpu-")
        folder = Path(tmp.name)
        began = time.perf_counter()
        write_jpegs(folder, n_images)
        spec = Data.model_validate(
            {
                "source": str(folder),
                "split": {"by": "folder"},
                "size": args.size,
                "batch_size": args.batch,
                "augment": "default",
                "normalize": "imagenet",
            }
        )
        bunch = build_data(spec, folder)
        files = [item.path for item in bunch.train.items]
        real_note = (
            f"real data: {n_images} JPEGs 256-320 px written in "
            f"{time.perf_counter() - began:.1f} s; engine: fitfleet build_data + "
            f"train_batches + prefetch (decode once, then cached; augment default); "
            f"baseline: DataLoader, {args.loader_workers} workers decoding every epoch"
        )
        print(real_note, flush=True)
        if len(bunch.train) < args.batch:
            raise SystemExit(f"--images {n_images}: fewer train images than one batch")

    modes = ["synthetic"] + ([] if args.skip_real else ["real"])
    # measurements per arch: engine+baseline per mode, plus the engine's decode epoch
    per_arch = 2 * len(modes) + (0 if args.skip_real else 1)
    remaining = per_arch * len(archs)
    rows: list[Row] = []

    def take_share() -> float:
        nonlocal remaining
        share = budget.share(remaining)
        remaining -= 1
        return share

    gen = torch.Generator().manual_seed(SEED)
    x_syn = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    y_syn = torch.randint(0, N_CLASSES, (args.batch,), generator=gen).to(device)

    def synthetic() -> Iterator[Batch]:
        return itertools.repeat((x_syn, y_syn))

    def measure(arch: str) -> None:
        """Every row of one arch, appended to ``rows``."""
        print(f"-- {arch} ({budget.elapsed():.0f} s)", flush=True)
        # Both contenders live side by side; each pair is warmed up first, then
        # timed back to back, so neither pays the first-use costs of the other.
        learner, fwd = engine_learner(arch, device, args.size)
        base = Baseline.build(arch, device, args.size)
        gflop, bgflop = 3 * fwd / 1e9, 3 * base.flops / 1e9
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def engine_row(data: str, batches: Iterator[Batch], steps: int, share: float) -> Row:
            images, seconds, done, loss = engine_run(
                learner, batches, batch_size=args.batch, steps=steps, max_seconds=share
            )
            row = Row(arch, data, "engine", None, done, 0.0, gflop, final_loss=loss)
            return finish_row(row, images, seconds, peak, device)

        def base_row(data: str, batches: Iterator[Batch], share: float) -> Row:
            images, seconds, done, loss = base.run(batches, steps=args.steps, max_seconds=share)
            row = Row(arch, data, "baseline", None, done, 0.0, bgflop, final_loss=loss)
            return finish_row(row, images, seconds, peak, device)

        share = min(take_share(), take_share())
        engine_run(
            learner, synthetic(), batch_size=args.batch, steps=args.warmup, max_seconds=share / 2
        )
        base.run(synthetic(), steps=args.warmup, max_seconds=share / 2)
        rows.append(engine_row("synthetic", synthetic(), args.steps, share / 2))
        rows.append(base_row("synthetic", synthetic(), share / 2))

        if bunch is not None:
            # epoch 0: the engine decodes every JPEG (4 threads) into its cache
            epoch0 = prefetch(bunch.train_batches(batch_size=args.batch, seed=SEED, device=device))
            row = engine_row(
                "real, decode epoch", epoch0, len(bunch.train) // args.batch, take_share()
            )
            row.note = "first epoch: JPEG decode into the cache"
            rows.append(row)

            def engine_epoch(epoch: int) -> Iterator[Batch]:
                assert bunch is not None
                return prefetch(
                    bunch.train_batches(batch_size=args.batch, seed=SEED + epoch, device=device)
                )

            workers = max(0, args.loader_workers)
            loader = torch.utils.data.DataLoader(
                JpegFolder(files, bunch.classes, args.size),
                batch_size=args.batch,
                shuffle=True,
                drop_last=True,
                num_workers=workers,
                pin_memory=device.type == "cuda",
                persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None,
            )
            share = min(take_share(), take_share())
            engine_batches = endless(engine_epoch, 1)
            loader_iter = loader_batches(loader, device)
            warm = min(args.warmup, 3)
            engine_run(
                learner, engine_batches, batch_size=args.batch, steps=warm, max_seconds=share / 3
            )
            base.run(loader_iter, steps=warm, max_seconds=share / 3)
            row = engine_row("real", engine_batches, args.steps, share * 2 / 3)
            row.note = "cached pixels"
            rows.append(row)
            row = base_row("real", loader_iter, share * 2 / 3)
            row.note = f"DataLoader, {workers} workers, decode every epoch"
            rows.append(row)
            del engine_batches, loader_iter, loader

    for arch in archs:
        if budget.left() <= 0:
            for loop in ("engine", "baseline"):
                for mode in modes:
                    rows.append(Row(arch, mode, loop, None, 0, 0.0, 0.0, note="skipped (budget)"))
            continue
        measure(arch)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ratios: engine / baseline, same arch and data mode
    for row in rows:
        if row.loop != "engine" or row.images_per_second is None:
            continue
        twin = next(
            (r for r in rows if r.arch == row.arch and r.data == row.data and r.loop == "baseline"),
            None,
        )
        if twin is not None and twin.images_per_second:
            row.ratio = row.images_per_second / twin.images_per_second
    if tmp is not None:
        tmp.cleanup()

    table = render(rows, args, peak_name, peak, device)
    elapsed = budget.elapsed()
    table.append(f"total wall time {elapsed:.1f} s (budget {args.budget_s:.0f} s)")
    print("\n".join(table), flush=True)
    if args.json is not None:
        payload: dict[str, Any] = {
            "date": str(date.today()),
            "torch": torch.__version__,
            "device": lines[1],
            "cpu_only": device.type != "cuda",
            "precision": precision.name,
            "size": args.size,
            "batch": args.batch,
            "peaks": [asdict(p) for p in peaks],
            "peak_used": {"dtype": peak_name, "tflops": peak},
            "real_data": real_note,
            "rows": [asdict(r) for r in rows],
            "elapsed_s": elapsed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"results written to {args.json}")
    return 0


def render(
    rows: list[Row], args: argparse.Namespace, peak_name: str, peak: float, device: torch.device
) -> list[str]:
    width = 118
    where = "GPU" if device.type == "cuda" else "CPU (NOT a GPU result)"
    out = [
        "=" * width,
        f"training throughput on the {where}: {args.size} px, batch {args.batch}, "
        f"up to {args.steps} timed steps after {args.warmup} warm-up; "
        f"peak = measured {peak_name} matmul {peak:.4g} TFLOP/s",
        "-" * width,
        f"{'arch':<10}{'data':<20}{'loop':<10}{'img/s':>10}{'ratio':>7}{'steps':>7}"
        f"{'GFLOP/img':>11}{'TFLOP/s':>9}{'of peak':>9}{'mem GiB':>9}  note",
        "-" * width,
    ]
    order = {"synthetic": 0, "real, decode epoch": 1, "real": 2}
    archs = list(dict.fromkeys(r.arch for r in rows))
    ordered = sorted(
        rows, key=lambda r: (archs.index(r.arch), order.get(r.data, 9), r.loop != "engine")
    )
    for r in ordered:
        ips = f"{r.images_per_second:10.1f}" if r.images_per_second else f"{'-':>10}"
        ratio = f"{r.ratio:7.3f}" if r.ratio is not None else f"{'':>7}"
        tflops = f"{r.model_tflops:9.3g}" if r.model_tflops is not None else f"{'-':>9}"
        of_peak = f"{r.of_peak:9.1%}" if r.of_peak is not None else f"{'-':>9}"
        mem = f"{r.peak_mem_gib:9.1f}" if r.peak_mem_gib is not None else f"{'-':>9}"
        out.append(
            f"{r.arch:<10}{r.data:<20}{r.loop:<10}{ips}{ratio}{r.steps:>7}"
            f"{r.train_gflop_per_image:>11.2f}{tflops}{of_peak}{mem}  {r.note}"
        )
    out += [
        "-" * width,
        "img/s: timed images / seconds between two device syncs, warm-up steps excluded.  "
        "ratio: engine / baseline img/s,",
        "  same arch and data.  GFLOP/img: 3 x forward FLOPs of one image (FlopCounterMode); "
        "TFLOP/s = img/s x GFLOP/img;",
        f"  of peak = TFLOP/s / measured {peak_name} matmul peak.  engine: build_model + Learner "
        "(precision auto) + train_epoch;",
        "  baseline: torchvision resnet + AdamW + autocast + channels_last (on CUDA), "
        "no per-step sync.",
        "=" * width,
    ]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
