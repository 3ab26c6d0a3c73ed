"""Training-throughput and memory benchmark of the fitfleet engine (a benchmark, not a test).

What is measured, in one run of this script:

1. **Engine vs a hand-written loop, no augmentation.**  ``run_experiment`` trains
   one stage (``train: all``, one-cycle, ``augment: none``, ImageNet normalization,
   the cheap end: no show_batch, no top losses, no confusion matrix) on
   scikit-learn's digits, all 10 classes.  Its speed is the ``images_per_second``
   of its epoch rows, the first epoch left out as warm-up (decoding, caches,
   oneDNN kernels).  The baseline is the smallest honest PyTorch loop: the same
   network (``build_model``, same arch, head and seed), AdamW with fastai's betas
   (0.9, 0.99) and wd 1e-2, cross-entropy, and the *same decoded pixels*
   preloaded once as one normalized float tensor; each batch is a shuffled
   index into it (``drop_last``).  It is timed over exactly as many batches as
   the engine's measured epochs, after a few warm-up batches.
2. **The same with ``augment: default``** (fastai's ``get_transforms()``): the
   baseline does no augmentation, so this ratio shows what augmentation costs on
   top of the engine's own overhead, not an apples-to-apples loss.
3. **fastai v1** ``cnn_learner(..., pretrained=False)`` + ``fit_one_cycle`` on the
   same folder when ``import fastai`` gives a 1.x version; skipped otherwise.
4. **Peak RSS** (``ru_maxrss`` of a child process, via ``os.wait4``) of one
   engine epoch of a larger network (resnet34 at 64 px by default), beside a
   child that only imports torch.

Why the comparison is fair: both sides run in this process with the same torch
thread count, fp32 on the CPU, the same batch size and model, and train-mode
forward + backward + optimizer step on every batch.  Only training time is
counted on both sides (the engine's rate excludes validation and checkpoints).
What the engine does more is exactly its overhead: per-batch cropping,
uint8->float, normalization, schedule, loss smoothing, recorder points and
callbacks.  Runs are interleaved (baseline, engine, engine-augmented, then the
reverse order) and the median of each is reported, because the machine is noisy.

Run:  ``PYTHONPATH=. python bench/engine.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from shared.results import EpochRow
from shared.spec import ExperimentSpec, Head
from workers.training.data import build_data
from workers.training.digits import build_digits
from workers.training.engine import EngineOptions, Runtime, run_experiment
from workers.training.images import crop
from workers.training.learner import ADAM_BETAS, ADAM_EPS
from workers.training.models import build_model
from workers.training.reporter import NullReporter

SEED = 42
MAX_LR = 3e-3  # fastai's default max_lr; the value does not change the speed
WD = 1e-2
BASELINE_WARMUP_BATCHES = 3
TARGET_RATIO = 0.95
ALL_DIGITS = tuple(range(10))
MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """Everything that defines one benchmark run."""

    arch: str
    size: int
    batch_size: int
    epochs: int
    reps: int
    threads: int
    classes: tuple[int, ...]
    rss_arch: str
    rss_size: int
    rss_classes: tuple[int, ...]
    skip_rss: bool


FULL = Config(
    arch="resnet18",
    size=32,
    batch_size=64,
    epochs=2,
    reps=2,
    threads=torch.get_num_threads(),
    classes=ALL_DIGITS,
    rss_arch="resnet34",
    rss_size=64,
    rss_classes=(3, 7),  # one epoch of resnet34 at 64 px on 2 CPU cores: ~4 batches, not 22
    skip_rss=False,
)
QUICK = replace(
    FULL, epochs=2, reps=1, classes=(3, 7), rss_arch="resnet18", rss_size=32, rss_classes=(3, 7)
)


@dataclass
class Samples:
    """Images/second of repeated runs of one contender.

    ``rates``: images / training seconds over the timed batches of each run (the
    headline).  ``batch_rates``: batch_size / the *median* seconds of one batch in
    each run, which a burst of load from other processes barely moves.
    """

    label: str
    rates: list[float] = field(default_factory=list)
    batch_rates: list[float] = field(default_factory=list)
    note: str = ""
    error_rate: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def batch_median(self) -> float:
        return statistics.median(self.batch_rates)

    def add(self, rate: float, batch_seconds: list[float], batch_size: int) -> None:
        self.rates.append(rate)
        if batch_seconds:
            self.batch_rates.append(batch_size / statistics.median(batch_seconds))


# --------------------------------------------------------------------------- data


def dataset_name(classes: tuple[int, ...], size: int) -> str:
    return f"digits-{''.join(map(str, classes))}-{size}px"


def make_dataset(root: Path, classes: tuple[int, ...], size: int) -> Path:
    """scikit-learn's digits laid out as train/<class>/*.png, valid/<class>/*.png."""
    out = root / dataset_name(classes, size)
    if not out.exists():
        build_digits(out, classes=classes, size=size)
    return out


def engine_spec(
    cfg: Config, source: str, *, augment: str, epochs: int, arch: str, size: int
) -> ExperimentSpec:
    """One ``train: all`` one-cycle stage with a cheap end (no interpretation plots)."""
    return ExperimentSpec.model_validate(
        {
            "name": "bench",
            "seed": SEED,
            "data": {
                "source": source,
                "size": size,
                "batch_size": cfg.batch_size,
                "augment": augment,
                "normalize": "imagenet",
            },
            "model": {"arch": arch, "pretrained": "none"},
            "metrics": ["error_rate"],
            "stages": [
                {
                    "name": "train",
                    "train": "all",
                    "epochs": epochs,
                    "max_lr": MAX_LR,
                    "schedule": "one_cycle",
                    "wd": WD,
                }
            ],
            "interpret": {"show_batch": None, "top_losses": 0, "confusion_matrix": False},
            "resources": {"gpus": 0, "precision": "fp32"},
        }
    )


def preload_train(spec: ExperimentSpec, source: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The engine's own decoded train images as one normalized float tensor, its targets, c."""
    data = build_data(spec.data, source)
    images = data.train.store.get_many(range(len(data.train)))
    pixels = torch.stack([crop(img, data.size, 0.5, 0.5) for img in images]).float().div_(255)
    return data.normalize(pixels).contiguous(), data.train.targets.clone(), data.c


# --------------------------------------------------------------------------- contenders


class _EpochPrinter(NullReporter):
    """Prints each epoch row, and keeps the time between consecutive batches per epoch."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last: tuple[int, float] | None = None
        self.gaps: dict[int, list[float]] = {}

    def on_batch(self, stage: str, epoch: int, batch: int, batches: int, loss: float) -> None:
        now = time.perf_counter()
        # Within one epoch only: the gap across an epoch boundary holds validation.
        if self.last is not None and self.last[0] == epoch:
            self.gaps.setdefault(epoch, []).append(now - self.last[1])
        self.last = (epoch, now)

    def on_epoch(self, row: EpochRow) -> None:
        print(
            f"    {self.label} epoch {row.epoch}: {row.images_per_second:7.1f} img/s train, "
            f"{row.seconds:6.1f} s with validation, error_rate {row.metrics.get('error_rate')}",
            flush=True,
        )


def run_engine(
    cfg: Config, root: Path, source: str, *, augment: str, label: str
) -> tuple[float, list[float], float | None]:
    """Train through ``run_experiment``.

    Returns the train img/s over epochs 1.. (from the epoch rows), the seconds of
    each of their batches but the first of an epoch, and the final error rate.
    """
    spec = engine_spec(
        cfg, source, augment=augment, epochs=cfg.epochs, arch=cfg.arch, size=cfg.size
    )
    with tempfile.TemporaryDirectory(prefix="run-", dir=root) as out:
        options = EngineOptions(out_dir=Path(out), data_roots=[root], weights_dir=root / "weights")
        printer = _EpochPrinter(label)
        report = run_experiment(spec, options, printer, Runtime())
    rows = report.stages[0].rows
    measured = rows[1:] if len(rows) > 1 else rows
    # Every epoch has the same number of images, so the combined rate is the harmonic mean.
    rate = statistics.harmonic_mean([r.images_per_second for r in measured])
    gaps = [g for row in measured for g in printer.gaps.get(row.epoch, [])]
    return rate, gaps, rows[-1].metrics.get("error_rate")


def _shuffled_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled epochs, drop_last, by indexing the preloaded tensors."""
    per_epoch = len(x) // batch_size
    while True:
        order = torch.randperm(len(x), generator=gen)
        for i in range(per_epoch):
            index = order[i * batch_size : (i + 1) * batch_size]
            yield x[index], y[index]


def run_baseline(
    cfg: Config,
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    batches: int,
    *,
    warmup: int = BASELINE_WARMUP_BATCHES,
) -> tuple[float, list[float]]:
    """A minimal PyTorch loop on the same model: (img/s over ``batches``, each batch's s)."""
    torch.manual_seed(SEED)
    model = build_model(cfg.arch, n_classes, Head())
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=MAX_LR, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=WD
    )
    stream = _shuffled_batches(x, y, cfg.batch_size, torch.Generator().manual_seed(SEED))

    def step() -> None:
        xb, yb = next(stream)
        loss = F.cross_entropy(model(xb), yb)
        torch.autograd.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    stamps = [time.perf_counter()]
    for _ in range(batches):
        step()
        stamps.append(time.perf_counter())
    gaps = [after - before for before, after in itertools.pairwise(stamps)]
    return batches * cfg.batch_size / (stamps[-1] - stamps[0]), gaps


def run_fastai(cfg: Config, source: Path) -> tuple[float, float | None] | None:
    """fastai v1's cnn_learner + fit_one_cycle on the same folder, or None when absent.

    Written against fastai 1.0.61's API; it cannot run next to torch 2.x, so this
    path only runs in an environment that has fastai v1 (and its torch).
    """
    try:
        import fastai  # type: ignore[import-not-found]
    except ImportError:
        print("fastai not installed: skipped")
        return None
    version = str(getattr(fastai, "__version__", "?"))
    if not version.startswith("1."):
        print(f"fastai {version} is not fastai v1: skipped")
        return None
    from fastai.basic_train import Callback  # type: ignore[import-not-found]
    from fastai.vision import (  # type: ignore[import-not-found]
        ImageDataBunch,
        cnn_learner,
        error_rate,
        imagenet_stats,
        models,
    )

    class TrainTimer(Callback):  # type: ignore[misc]
        """Seconds from epoch start to its last training batch, and images seen."""

        def __init__(self) -> None:
            self.rates: list[float] = []
            self.began = self.ended = 0.0
            self.images = 0

        def on_epoch_begin(self, **kwargs: Any) -> None:
            self.began, self.ended, self.images = time.perf_counter(), 0.0, 0

        def on_batch_end(self, **kwargs: Any) -> None:
            if kwargs.get("train"):
                self.images += int(kwargs["last_input"].shape[0])
                self.ended = time.perf_counter()

        def on_epoch_end(self, **kwargs: Any) -> None:
            self.rates.append(self.images / max(self.ended - self.began, 1e-9))

    data = ImageDataBunch.from_folder(
        source, train="train", valid="valid", ds_tfms=None, size=cfg.size, bs=cfg.batch_size
    ).normalize(imagenet_stats)
    torch.manual_seed(SEED)
    learn = cnn_learner(data, getattr(models, cfg.arch), pretrained=False, metrics=error_rate)
    timer = TrainTimer()
    learn.fit_one_cycle(cfg.epochs, MAX_LR, wd=WD, callbacks=[timer])
    rates = timer.rates[1:] if len(timer.rates) > 1 else timer.rates
    metrics = learn.recorder.metrics
    error = float(metrics[-1][0]) if metrics else None
    return statistics.harmonic_mean(rates), error


# --------------------------------------------------------------------------- memory


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def peak_rss_mib() -> float:
    """This process's own peak RSS in MiB: VmHWM of /proc/self/status (Linux only).

    Not ``ru_maxrss``: on Linux a child's ``ru_maxrss`` (RUSAGE_SELF in it, or
    RUSAGE_CHILDREN / wait4 in the parent) starts from the *parent's* high-water
    mark, carried over fork and exec, so a child of a 1.2 GiB benchmark process
    reports >= 1.2 GiB however small it is.  VmHWM belongs to the exec'd address
    space alone.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / MIB  # the kernel writes kB
    raise RuntimeError("no VmHWM in /proc/self/status")


# The bare baseline must not import fitfleet (pydantic, torchvision...): only torch.
_BARE_CHILD = """
import json, torch
from pathlib import Path
kib = next(l.split()[1] for l in Path("/proc/self/status").read_text().splitlines()
           if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mib": int(kib) / 1024}))
"""


def child_json(command: list[str]) -> dict[str, float]:
    """Run ``command`` as a child process and parse the JSON of its last stdout line."""
    done = subprocess.run(command, stdout=subprocess.PIPE, env=_child_env(), cwd=REPO, check=True)
    result: dict[str, float] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def rss_child(cfg: Config, root: Path, mode: str) -> None:
    """Child mode: one epoch of the engine (augment default) or of the hand-written loop.

    Prints ``{"peak_rss_mib": ..., "images_per_second": ...}`` as its last line.
    """
    torch.set_num_threads(cfg.threads)
    source = dataset_name(cfg.rss_classes, cfg.rss_size)
    spec = engine_spec(
        cfg, source, augment="default", epochs=1, arch=cfg.rss_arch, size=cfg.rss_size
    )
    if mode == "engine":
        with tempfile.TemporaryDirectory(prefix="rss-", dir=root) as out:
            options = EngineOptions(
                out_dir=Path(out), data_roots=[root], weights_dir=root / "weights"
            )
            report = run_experiment(spec, options, None, Runtime())
        rate = report.stages[0].rows[0].images_per_second
    else:
        x, y, n_classes = preload_train(spec, root / source)
        loop_cfg = replace(cfg, arch=cfg.rss_arch, size=cfg.rss_size)
        rate, _ = run_baseline(loop_cfg, x, y, n_classes, len(x) // cfg.batch_size, warmup=0)
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "images_per_second": rate}))


@dataclass
class Memory:
    """Peak RSS of the three children, MiB, and the children's train rates."""

    bare: float
    engine: float
    loop: float
    engine_rate: float
    loop_rate: float


def measure_rss(cfg: Config, root: Path) -> Memory:
    """Peak RSS of a bare ``import torch``, one engine epoch and one hand-written epoch."""
    make_dataset(root, cfg.rss_classes, cfg.rss_size)
    bare = child_json([sys.executable, "-c", _BARE_CHILD])
    results = {}
    for mode in ("engine", "loop"):
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--rss-child",
            str(root),
            "--rss-mode",
            mode,
            "--threads",
            str(cfg.threads),
            "--batch-size",
            str(cfg.batch_size),
            "--rss-arch",
            cfg.rss_arch,
            "--rss-size",
            str(cfg.rss_size),
            "--rss-classes",
            ",".join(map(str, cfg.rss_classes)),
        ]
        results[mode] = child_json(command)
    return Memory(
        bare=bare["peak_rss_mib"],
        engine=results["engine"]["peak_rss_mib"],
        loop=results["loop"]["peak_rss_mib"],
        engine_rate=results["engine"]["images_per_second"],
        loop_rate=results["loop"]["images_per_second"],
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[Config, Path | None, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--arch", help=f"network for the throughput runs ({FULL.arch})")
    parser.add_argument("--size", type=int, help=f"image size in px ({FULL.size})")
    parser.add_argument("--batch-size", type=int, help=f"batch size ({FULL.batch_size})")
    parser.add_argument(
        "--epochs", type=int, help=f"engine epochs per run, the first is warm-up ({FULL.epochs})"
    )
    parser.add_argument("--reps", type=int, help=f"repetitions of each contender ({FULL.reps})")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--rss-arch", help=f"network for the peak-RSS epoch ({FULL.rss_arch})")
    parser.add_argument("--rss-size", type=int, help=f"image size for it ({FULL.rss_size})")
    parser.add_argument("--rss-classes", help="digits for it, comma separated (3,7)")
    parser.add_argument("--skip-rss", action="store_true", help="leave out the peak-RSS part")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 3 vs 7, 2 epochs, 1 rep, small RSS"
    )
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rss-mode", choices=("engine", "loop"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    given = {
        "arch": args.arch,
        "size": args.size,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "reps": args.reps,
        "threads": args.threads,
        "rss_arch": args.rss_arch,
        "rss_size": args.rss_size,
        "rss_classes": (
            tuple(int(c) for c in args.rss_classes.split(",")) if args.rss_classes else None
        ),
    }
    cfg = replace(base, **{k: v for k, v in given.items() if v is not None})
    cfg = replace(cfg, skip_rss=args.skip_rss or base.skip_rss)
    if cfg.epochs < 2:
        parser.error("--epochs must be at least 2: the first engine epoch is warm-up")
    if cfg.reps < 1:
        parser.error("--reps must be at least 1")
    return cfg, args.rss_child, args.rss_mode or "engine"


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def print_summary(
    cfg: Config,
    counts: tuple[int, int],
    batches: int,
    rows: list[Samples],
    memory: Memory | None,
    loads: tuple[str, str],
    wall: float,
) -> None:
    """The final table: medians, ratios to the baseline (the first row), memory."""
    baseline, plain = rows[0], rows[1]
    width = 100
    rule = "-" * width
    print()
    print("=" * width)
    print(
        f"fitfleet engine benchmark  {date.today().isoformat()}  torch {torch.__version__}  "
        f"{torch.get_num_threads()} torch threads  {os.cpu_count()} CPUs  "
        f"load 1m/5m {loads[0]} at start, {loads[1]} at end"
    )
    print(
        f"{cfg.arch} @ {cfg.size}px, batch {cfg.batch_size}, digits {len(cfg.classes)} classes "
        f"({counts[0]} train / {counts[1]} valid), fp32 CPU"
    )
    print(
        f"engine: {cfg.epochs} epochs per run, epoch 0 = warm-up, epochs 1..{cfg.epochs - 1} "
        f"timed ({batches} batches); baseline: {batches} batches after "
        f"{BASELINE_WARMUP_BATCHES} warm-up batches; {cfg.reps} interleaved rep(s), medians"
    )
    print(rule)
    print(
        f"{'train throughput':<27}{'img/s':>7}{'ratio':>7}{'batch-med':>11}{'ratio':>7}   "
        f"{'runs (img/s)':<19}note"
    )
    print(rule)
    for row in rows:
        if not row.rates:
            print(f"{row.label:<27}{'-':>7}{'-':>7}{'-':>11}{'-':>7}   {'':<19}{row.note}")
            continue
        runs = ", ".join(f"{r:.1f}" for r in row.rates)
        ratio = f"{row.median / baseline.median:.3f}"
        if row.batch_rates:
            batch = f"{row.batch_median:.1f}"
            batch_ratio = f"{row.batch_median / baseline.batch_median:.3f}"
        else:
            batch = batch_ratio = "-"
        notes = [row.note] if row.note else []
        if row.error_rate is not None:
            notes.insert(0, f"final error_rate {row.error_rate:.3f}")
        print(
            f"{row.label:<27}{row.median:>7.1f}{ratio:>7}{batch:>11}{batch_ratio:>7}   "
            f"{runs:<19}{'; '.join(notes)}"
        )
    print(rule)
    plain_ratio = plain.median / baseline.median
    verdict = "meets" if plain_ratio >= TARGET_RATIO else "MISSES"
    print(
        f"engine (augment none) / baseline = {plain_ratio:.3f} "
        f"(batch-median {plain.batch_median / baseline.batch_median:.3f}): "
        f"{verdict} the target >= {TARGET_RATIO}"
    )
    print(
        "img/s = images / training seconds of the timed batches (engine: its EpochRow"
        ".images_per_second);\nbatch-med = batch size / median seconds per batch (robust to "
        "bursts of load from other processes)"
    )
    if memory is None:
        print("peak RSS: skipped")
    else:
        print(
            f"peak RSS (VmHWM), one epoch of {cfg.rss_arch} @ {cfg.rss_size}px, batch "
            f"{cfg.batch_size}, digits {','.join(map(str, cfg.rss_classes))}, each in a child:"
        )
        print(f"  bare `import torch`            {memory.bare:8.0f} MiB")
        print(
            f"  hand-written loop (1 epoch)    {memory.loop:8.0f} MiB  "
            f"(+{memory.loop - memory.bare:.0f} over bare; {memory.loop_rate:.1f} img/s)"
        )
        print(
            f"  engine, augment default        {memory.engine:8.0f} MiB  "
            f"(+{memory.engine - memory.bare:.0f} over bare, {memory.engine - memory.loop:+.0f} "
            f"vs loop; {memory.engine_rate:.1f} img/s)"
        )
    print(f"total wall time {wall:.0f} s")
    print("=" * width)


def main(argv: list[str] | None = None) -> int:
    cfg, child_root, child_mode = parse_args(argv)
    if child_root is not None:
        rss_child(cfg, child_root, child_mode)
        return 0
    began = time.perf_counter()
    load_start = _load()
    torch.set_num_threads(cfg.threads)
    print(
        f"bench: {cfg.arch} @ {cfg.size}px, batch {cfg.batch_size}, {cfg.epochs} epochs, "
        f"{cfg.reps} rep(s), {cfg.threads} torch threads, load {load_start}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="fitfleet-bench-") as tmp:
        root = Path(tmp)
        source = make_dataset(root, cfg.classes, cfg.size)
        spec = engine_spec(
            cfg, source.name, augment="none", epochs=cfg.epochs, arch=cfg.arch, size=cfg.size
        )
        x, y, n_classes = preload_train(spec, source)
        n_valid = sum(1 for _ in (source / "valid").rglob("*.png"))
        batches = (len(x) // cfg.batch_size) * (cfg.epochs - 1)
        baseline = Samples("hand-written PyTorch loop", note="preloaded tensor, no augmentation")
        plain = Samples("engine, augment none")
        augmented = Samples(
            "engine, augment default", note="includes fastai's default augmentation"
        )
        order = ["baseline", "none", "default"]
        for rep in range(cfg.reps):
            for which in order if rep % 2 == 0 else order[::-1]:
                print(f"  rep {rep + 1}/{cfg.reps}: {which}  (load {_load()})", flush=True)
                if which == "baseline":
                    rate, gaps = run_baseline(cfg, x, y, n_classes, batches)
                    baseline.add(rate, gaps, cfg.batch_size)
                    print(f"    baseline: {rate:7.1f} img/s over {batches} batches", flush=True)
                else:
                    target = plain if which == "none" else augmented
                    rate, gaps, error = run_engine(
                        cfg, root, source.name, augment=which, label=which
                    )
                    target.add(rate, gaps, cfg.batch_size)
                    target.error_rate = error
                gc.collect()
        fastai = Samples("fastai v1 cnn_learner")
        result = run_fastai(cfg, source)
        if result is None:
            fastai.note = "fastai v1 not installed: skipped"
        else:
            fastai.rates.append(result[0])
            fastai.error_rate = result[1]
        memory = None
        if not cfg.skip_rss:
            print(f"  peak RSS: one {cfg.rss_arch} @ {cfg.rss_size}px epoch per child", flush=True)
            memory = measure_rss(cfg, root)
    print_summary(
        cfg,
        (len(x), n_valid),
        batches,
        [baseline, plain, augmented, fastai],
        memory,
        (load_start, _load()),
        time.perf_counter() - began,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
