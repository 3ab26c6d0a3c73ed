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
4. **Peak RSS** (VmHWM, see :func:`peak_rss_mib`) of one epoch of a larger
   network (resnet34 at 64 px on digits 3 vs 7 by default), each in its own child
   process: a bare ``import torch``, the hand-written loop, and the engine
   (``augment: default``), so the engine's memory overhead is the difference of
   the last two.

Why the comparison is fair: both sides run in this process with the same torch
thread count, fp32 on the CPU, the same batch size and model, and train-mode
forward + backward + optimizer step on every batch.  Only training time is
counted on both sides (the engine's rate excludes validation and checkpoints).
What the engine does more is exactly its overhead: per-batch cropping,
uint8->float, normalization, schedule, loss smoothing, recorder points and
callbacks.  The two are interleaved batch by batch (see :class:`PairedTimer`): the machine
is shared, and consecutive runs of the very same loop were seen to differ 2.5x.
Beside the ratio of rates, the table gives the median over all batches of a
per-batch ratio (see :class:`Samples`), which one burst of load cannot move much.

Run:  ``PYTHONPATH=. python bench/engine.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
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
    epochs=3,
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
    """One contender over the repetitions.

    ``rates``: per run, images / training seconds of the timed batches.
    ``ratios``: per run, that rate over the baseline's rate *in the same run*.
    ``pair_ratios``: for every timed engine batch, the mean seconds of the two
    baseline batches run just before and just after it / its own seconds (all
    runs pooled); its median is the estimate a burst of load from another
    process moves least.
    """

    label: str
    note: str = ""
    rates: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    pair_ratios: list[float] = field(default_factory=list)
    error_rate: float | None = None


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


class BaselineLoop:
    """The hand-written loop, one batch per :meth:`step`: what the engine is measured against."""

    def __init__(
        self, arch: str, n_classes: int, x: torch.Tensor, y: torch.Tensor, batch_size: int
    ) -> None:
        torch.manual_seed(SEED)  # the engine seeds the same way before build_model
        self.model = build_model(arch, n_classes, Head())
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=MAX_LR, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=WD
        )
        self.stream = _shuffled_batches(x, y, batch_size, torch.Generator().manual_seed(SEED))

    def step(self) -> float:
        """Train on the next batch; returns its seconds (fetch included)."""
        began = time.perf_counter()
        xb, yb = next(self.stream)
        loss = F.cross_entropy(self.model(xb), yb)
        torch.autograd.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began


class PairedTimer(NullReporter):
    """Interleaves the baseline with the engine batch by batch, and times both.

    After every engine batch (its ``on_batch`` call) one baseline batch runs, so
    each engine batch and its baseline twin see the same load from the rest of
    the machine.  The engine's batch time runs from the end of the previous
    call to the start of this one (pipeline, forward, backward, step and its
    bookkeeping).  Time spent in here is counted per epoch as ``stolen``, to be
    taken out of the engine's own epoch timer.  In epoch 0 (the engine's
    warm-up) only ``warmup`` baseline batches run, untimed.
    """

    def __init__(self, label: str, loop: BaselineLoop, warmup: int) -> None:
        self.label = label
        self.loop = loop
        self.warmup = warmup
        self.last: tuple[int, float] | None = None
        self.engine_s: dict[int, list[float]] = defaultdict(list)
        self.loop_s: dict[int, list[float]] = defaultdict(list)
        self.stolen: dict[int, float] = defaultdict(float)

    def on_batch(self, stage: str, epoch: int, batch: int, batches: int, loss: float) -> None:
        entered = time.perf_counter()
        # Within one epoch only: the gap across an epoch boundary holds validation.
        if self.last is not None and self.last[0] == epoch:
            self.engine_s[epoch].append(entered - self.last[1])
        if epoch >= 1:
            self.loop_s[epoch].append(self.loop.step())
        elif batch <= self.warmup:
            self.loop.step()
        left = time.perf_counter()
        self.stolen[epoch] += left - entered
        self.last = (epoch, left)

    def on_epoch(self, row: EpochRow) -> None:
        print(
            f"    {self.label} epoch {row.epoch}: {row.seconds:6.1f} s (engine, interleaved "
            f"baseline, validation), error_rate {row.metrics.get('error_rate', 0.0):.3f}",
            flush=True,
        )


@dataclass
class PairedRun:
    """One engine run and the baseline batches interleaved with its timed epochs."""

    engine_rate: float  # from the EpochRows, the baseline's stolen time taken out
    loop_rate: float
    pair_ratios: list[float]  # mean s of the 2 baseline batches around an engine batch / its s
    error_rate: float | None

    @property
    def ratio(self) -> float:
        return self.engine_rate / self.loop_rate


def run_paired(
    cfg: Config, root: Path, source: str, loop: BaselineLoop, *, augment: str
) -> PairedRun:
    """``run_experiment`` with the baseline interleaved; epochs 1.. are measured."""
    spec = engine_spec(
        cfg, source, augment=augment, epochs=cfg.epochs, arch=cfg.arch, size=cfg.size
    )
    timer = PairedTimer(augment, loop, BASELINE_WARMUP_BATCHES)
    with tempfile.TemporaryDirectory(prefix="run-", dir=root) as out:
        options = EngineOptions(out_dir=Path(out), data_roots=[root], weights_dir=root / "weights")
        report = run_experiment(spec, options, timer, Runtime())
    rows = report.stages[0].rows[1:]
    images = engine_seconds = loop_seconds = 0.0
    pairs: list[float] = []
    for row in rows:
        engine_s, loop_s = timer.engine_s[row.epoch], timer.loop_s[row.epoch]
        seen = len(loop_s) * cfg.batch_size  # one baseline batch per engine batch
        # EpochRow.images_per_second = seen / training seconds, which include our callback.
        engine_seconds += seen / row.images_per_second - timer.stolen[row.epoch]
        loop_seconds += sum(loop_s)
        images += seen
        # engine_s[k] is engine batch k+1 (batch 0's start is unknown): loop_s[k] ran just
        # before it and loop_s[k+1] just after, so their mean cancels a load that drifts.
        pairs.extend(
            (before + after) / 2 / en
            for en, before, after in zip(engine_s, loop_s[:-1], loop_s[1:], strict=True)
        )
    return PairedRun(
        engine_rate=images / engine_seconds,
        loop_rate=images / loop_seconds,
        pair_ratios=pairs,
        error_rate=report.stages[0].rows[-1].metrics.get("error_rate"),
    )


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

    The loop trains only; the engine also validates, checkpoints and writes its
    report, as one real epoch does.  Prints ``{"peak_rss_mib": ...}`` last.
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
            run_experiment(spec, options, None, Runtime())
    else:
        x, y, n_classes = preload_train(spec, root / source)
        loop = BaselineLoop(cfg.rss_arch, n_classes, x, y, cfg.batch_size)
        for _ in range(len(x) // cfg.batch_size):
            loop.step()
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


@dataclass
class Memory:
    """Peak RSS of the three children, MiB."""

    bare: float
    engine: float
    loop: float


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
    parser.add_argument(
        "--reps", type=int, help=f"runs per engine mode, each with its baseline ({FULL.reps})"
    )
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


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}" if values else "-"


def print_summary(
    cfg: Config,
    counts: tuple[int, int],
    batches: int,
    rows: list[Samples],
    memory: Memory | None,
    loads: tuple[str, str],
    wall: float,
) -> None:
    """The final table (medians over runs), the verdict and the memory numbers."""
    plain = rows[1]
    width = 110
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
        f"({counts[0]} train / {counts[1]} valid), fp32 on the CPU"
    )
    print(
        f"each run: {cfg.epochs} engine epochs, epoch 0 = warm-up; epochs 1..{cfg.epochs - 1} "
        f"timed ({batches} batches), a baseline batch after each engine batch; "
        f"{cfg.reps} rep(s) per mode, medians"
    )
    print(rule)
    print(f"{'train throughput':<27}{'img/s':>7}{'ratio':>7}{'pairs':>7}   runs: img/s (ratio)")
    print(rule)
    for row in rows:
        notes = [row.note] if row.note else []
        if row.error_rate is not None:
            notes.insert(0, f"final error_rate {row.error_rate:.3f}")
        if row.rates:
            pairs = _median(row.pair_ratios) if row is not rows[0] else "1"
            runs = ", ".join(
                f"{r:.1f} ({q:.2f})" for r, q in zip(row.rates, row.ratios, strict=True)
            )
            print(
                f"{row.label:<27}{statistics.median(row.rates):>7.1f}{_median(row.ratios):>7}"
                f"{pairs:>7}   {runs}"
            )
        else:
            print(f"{row.label:<27}{'-':>7}{'-':>7}{'-':>7}")
        if notes:
            print(f"{'':<27}  ({'; '.join(notes)})")
    print(rule)
    ratio = statistics.median(plain.ratios)
    pair_ratio = statistics.median(plain.pair_ratios) if plain.pair_ratios else ratio
    verdict = "meets" if min(ratio, pair_ratio) >= TARGET_RATIO else "MISSES"
    print(
        f"engine (augment none) / baseline: {ratio:.3f} by epoch rates, {pair_ratio:.3f} by "
        f"batch pairs: {verdict} the target >= {TARGET_RATIO}"
    )
    print(
        "img/s: median over runs of images / training seconds of the timed batches (engine: "
        "its EpochRow\n  .images_per_second with the interleaved baseline's time taken out)."
        "  ratio: median over runs of\n  engine img/s / baseline img/s of the same run.  pairs: "
        "median over all timed engine batches\n  of (mean seconds of the baseline batches just "
        "before and after it) / its seconds: the\n  estimate least moved by bursts of load from "
        "other processes; trust it over ratio when they differ"
    )
    if memory is None:
        print("peak RSS: skipped (--skip-rss) or failed (see above)")
    else:
        print(
            f"peak RSS (VmHWM), one epoch of {cfg.rss_arch} @ {cfg.rss_size}px, batch "
            f"{cfg.batch_size}, digits {','.join(map(str, cfg.rss_classes))}, each in a child:"
        )
        print(f"  bare `import torch`            {memory.bare:8.0f} MiB")
        print(
            f"  hand-written loop              {memory.loop:8.0f} MiB  "
            f"(+{memory.loop - memory.bare:.0f} over bare)"
        )
        print(
            f"  engine, augment default        {memory.engine:8.0f} MiB  "
            f"(+{memory.engine - memory.bare:.0f} over bare, {memory.engine - memory.loop:+.0f} "
            "vs the loop)"
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
        baseline = Samples("hand-written PyTorch loop", "preloaded tensor, no augmentation")
        engines = {
            "none": Samples("engine, augment none"),
            "default": Samples("engine, augment default", "includes fastai's default augmentation"),
        }
        for rep in range(cfg.reps):
            modes = ["none", "default"] if rep % 2 == 0 else ["default", "none"]
            for mode in modes:
                print(f"  rep {rep + 1}/{cfg.reps}: augment {mode}  (load {_load()})", flush=True)
                loop = BaselineLoop(cfg.arch, n_classes, x, y, cfg.batch_size)
                run = run_paired(cfg, root, source.name, loop, augment=mode)
                print(
                    f"    [{time.perf_counter() - began:4.0f} s] engine {run.engine_rate:6.1f} "
                    f"img/s, baseline {run.loop_rate:6.1f} img/s: ratio {run.ratio:.3f}, "
                    f"pairs {_median(run.pair_ratios)}",
                    flush=True,
                )
                baseline.rates.append(run.loop_rate)
                baseline.ratios.append(1.0)
                engine = engines[mode]
                engine.rates.append(run.engine_rate)
                engine.ratios.append(run.ratio)
                engine.pair_ratios.extend(run.pair_ratios)
                engine.error_rate = run.error_rate
                del loop
                gc.collect()
        fastai = Samples("fastai v1 cnn_learner", "not paired: ratio to the baseline's median")
        result = run_fastai(cfg, source)
        if result is None:
            fastai.note = "fastai v1 not installed: skipped"
        else:
            rate = result[0]
            fastai.rates.append(rate)
            fastai.ratios.append(rate / statistics.median(baseline.rates))
            fastai.error_rate = result[1]
        memory = None
        if not cfg.skip_rss:
            print(f"  peak RSS: one {cfg.rss_arch} @ {cfg.rss_size}px epoch per child", flush=True)
            try:
                memory = measure_rss(cfg, root)
            except (subprocess.CalledProcessError, RuntimeError, ValueError) as exc:
                print(f"  peak RSS failed: {exc}", flush=True)
    print_summary(
        cfg,
        (len(x), n_valid),
        batches,
        [baseline, engines["none"], engines["default"], fastai],
        memory,
        (load_start, _load()),
        time.perf_counter() - began,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
