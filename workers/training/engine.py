"""Running a whole experiment: data, model, staged schedule, interpretation, report.

This is the notes' recipe as one function, :func:`run_experiment`.  It takes a
validated spec, a run folder and a :class:`Reporter`; it knows nothing of
Celery, HTTP or SQL.  Files it writes, all inside the run folder:

``checkpoints/<stage>-epoch<N>.pt`` (the latest epoch of the running stage),
``checkpoints/<stage>.pt`` (each stage's kept weights), ``checkpoints/latest.json``,
``plots/*.png``, ``report.json`` and ``test_predictions.csv``.

When the GPU runs out of memory during an epoch (or an lr_find), the engine
puts the model, the optimizer, the RNG and the cursor back where the epoch
began, halves the per-process micro-batch (doubling the gradient
accumulation, so the global batch stays the spec's) and runs the epoch again;
below :data:`workers.training.oom.MIN_MICRO_BATCH` it fails with a
TrainingError.  Each retry is an "oom" event and a ``StageReport.oom_retries``
record; the accumulation carries on to later epochs and stages and into
checkpoints.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.errors import DataError, Diverged, Stopped, TrainingError
from shared.results import EpochRow, Finding, OomRetry, Report, StageReport
from shared.spec import ExperimentSpec, Stage
from shared.spec_io import dump_spec
from workers.training import oom, plots
from workers.training.checkpoint import load_checkpoint, read_latest, save_checkpoint, write_latest
from workers.training.data import Batch, DataBunch, batch_seed, build_data
from workers.training.diagnosis import diagnose
from workers.training.distributed import Collectives
from workers.training.files import resolve_source
from workers.training.interpret import interpret
from workers.training.learner import Learner, Precision
from workers.training.loop import StageCursor, StopRequested, train_epoch, validate
from workers.training.lr_finder import lr_find
from workers.training.models import build_model, create_head, imagenet_weights_file
from workers.training.prefetch import prefetch
from workers.training.reporter import NullReporter, Reporter
from workers.training.schedule import Smoother, lr_range

log = logging.getLogger(__name__)

RunCheckpointResolver = Callable[[str, str | None], Path]
AllReduce = Callable[[torch.Tensor], torch.Tensor]
Agree = Callable[[float, bool], tuple[float, bool]]


@dataclass
class Runtime:
    """Where the engine runs: device and, under DDP, this rank and its collectives."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    collectives: Collectives | None = None

    @classmethod
    def distributed(cls, collectives: Collectives) -> Runtime:
        """The runtime of one DDP rank (see :mod:`workers.training.distributed`)."""
        return cls(
            device=collectives.device,
            rank=collectives.rank,
            world_size=collectives.world_size,
            collectives=collectives,
        )

    @property
    def is_main(self) -> bool:
        """Only rank 0 reports and writes files."""
        return self.rank == 0

    @property
    def all_reduce(self) -> AllReduce | None:
        """Sum across ranks, for validation totals (None in one process)."""
        return self.collectives.all_reduce if self.collectives is not None else None

    @property
    def agree(self) -> Agree | None:
        """Mean loss and any-stop across ranks, once per step (None in one process)."""
        return self.collectives.agree_step if self.collectives is not None else None


@dataclass
class EngineOptions:
    """How to run, apart from the spec: folders, resume, lookups."""

    out_dir: Path
    data_roots: list[Path]
    weights_dir: Path
    resume: bool = False
    resolve_run: RunCheckpointResolver | None = None
    cache_bytes: int | None = None
    # Test hook: training forward passes of this many images or more raise CUDA's
    # OutOfMemoryError (default: FITFLEET_TEST_OOM_AT_BATCH); see workers.training.oom.
    oom_at_batch: int | None = None


@dataclass
class _EpochStart:
    """Where an epoch began, on the CPU, to start it again after running out of memory."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    batch: int
    step: int
    smoother: dict[str, float]
    points: int
    epoch_seconds: float

    @classmethod
    def take(cls, learner: Learner, cursor: StageCursor) -> _EpochStart:
        assert learner.optimizer is not None
        cuda = learner.device.type == "cuda"
        return cls(
            model=_cpu_copy(learner.core.state_dict()),
            optimizer=_cpu_copy(learner.optimizer.state_dict()),
            rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(learner.device) if cuda else None,
            batch=cursor.batch,
            step=cursor.step,
            smoother=cursor.smoother.state(),
            points=len(cursor.points),
            epoch_seconds=cursor.epoch_seconds,
        )

    def restore(self, learner: Learner, cursor: StageCursor) -> None:
        assert learner.optimizer is not None
        learner.optimizer.zero_grad(set_to_none=True)
        learner.core.load_state_dict(self.model)
        learner.optimizer.load_state_dict(_cpu_copy(self.optimizer))
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, learner.device)
        cursor.batch = self.batch
        cursor.step = self.step
        cursor.smoother = Smoother.from_state(self.smoother)
        del cursor.points[self.points :]
        cursor.epoch_seconds = self.epoch_seconds


def _cpu_copy(value: Any) -> Any:
    """A copy of a state dict with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_cpu_copy(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_cpu_copy(item) for item in value)
    return value


def choose_device(gpus: int, local_rank: int = 0) -> torch.device:
    """CUDA when the spec asks for GPUs and there are some; CPU otherwise."""
    if gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class _Run:
    """The state of one run while it executes (one object so steps stay short)."""

    def __init__(
        self,
        spec: ExperimentSpec,
        options: EngineOptions,
        reporter: Reporter,
        runtime: Runtime,
    ) -> None:
        self.spec = spec
        self.options = options
        self.reporter = reporter
        self.runtime = runtime
        self.out = options.out_dir
        self.ckpt_dir = self.out / "checkpoints"
        self.plot_dir = self.out / "plots"
        self.report = Report(
            spec=dump_spec(spec), device=str(runtime.device), world_size=runtime.world_size
        )
        self.started = time.perf_counter()
        self.data: DataBunch
        self.learner: Learner
        self.batch_size = spec.data.batch_size
        self.accumulate = 1  # micro-batches per step; doubles on every CUDA out-of-memory
        hook = options.oom_at_batch
        self.oom_at_batch = hook if hook is not None else oom.hook_from_env()
        # Retrying needs a copy of the epoch's start: only where memory can run out.
        self.retry_oom = runtime.device.type == "cuda" or self.oom_at_batch is not None

    # ------------------------------------------------------------------ files

    def write_file(self, kind: str, relative: str, payload: bytes) -> None:
        """Write a file in the run folder (rank 0) and tell the reporter."""
        if not self.runtime.is_main:
            return
        path = self.out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(payload)
        tmp.replace(path)
        if relative not in self.report.artifacts:
            self.report.artifacts.append(relative)
        self.reporter.on_artifact(kind, path)

    def write_report(self) -> None:
        """report.json, rewritten at every checkpoint and at the end."""
        self.report.timings["total_seconds"] = round(time.perf_counter() - self.started, 3)
        if "report.json" not in self.report.artifacts:
            self.report.artifacts.append("report.json")
        if self.runtime.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / "report.json"
            tmp = path.with_name(".report.json.tmp")
            tmp.write_text(self.report.model_dump_json(indent=2))
            tmp.replace(path)
            self.reporter.on_artifact("report", path)

    def save_state(self, name: str, *, stage_index: int, cursor: StageCursor) -> None:
        """A checkpoint that resumes at (stage_index, cursor); latest.json points at it."""
        if not self.runtime.is_main:
            return
        assert self.learner.optimizer is not None
        payload = {
            "format": 1,
            "model": self.learner.core.state_dict(),
            "opt": self.learner.optimizer.state_dict(),
            "train_mode": self.learner.train_mode,
            "arch": self.spec.model.arch,
            "classes": list(self.data.classes),
            "multi_label": self.data.multi_label,
            "stage_index": stage_index,
            "cursor": cursor.state(),
            "rng": torch.get_rng_state(),
            "batch_size": self.batch_size,
            "accumulate": self.accumulate,
            "report": self.report.model_dump(mode="json"),
        }
        path = self.ckpt_dir / name
        save_checkpoint(path, payload)
        write_latest(
            self.ckpt_dir,
            name,
            {"stage_index": stage_index, "epoch": cursor.epoch, "batch": cursor.batch},
        )
        self.reporter.on_artifact("checkpoint", path)

    # ------------------------------------------------------------------ setup

    def load_data(self) -> None:
        began = time.perf_counter()
        source = resolve_source(self.spec.data.source, self.options.data_roots)
        self.data = build_data(self.spec.data, source, cache_bytes=self.options.cache_bytes)
        self.report.classes = list(self.data.classes)
        self.report.multi_label = self.data.multi_label
        self.report.counts = {
            "train": len(self.data.train),
            "valid": len(self.data.valid),
            "test": len(self.data.test_files),
            "skipped": len(self.data.skipped),
            "classes": self.data.c,
        }
        self.report.skipped_files = list(self.data.skipped)
        per_rank = max(1, self.batch_size // self.runtime.world_size)
        if len(self.data.train) < per_rank * self.runtime.world_size:
            self.batch_size = (
                len(self.data.train) // self.runtime.world_size * self.runtime.world_size
            )
            if self.batch_size == 0:
                raise DataError(
                    f"data: {len(self.data.train)} training images cannot feed "
                    f"{self.runtime.world_size} processes"
                )
            self.event(
                "batch_size",
                f"data.batch_size {self.spec.data.batch_size} is larger than the "
                f"{len(self.data.train)} training images; using {self.batch_size}",
            )
        self.report.timings["data_seconds"] = round(time.perf_counter() - began, 3)

    def build_learner(self) -> None:
        model_spec = self.spec.model
        weights = None
        if model_spec.pretrained == "imagenet":
            weights = imagenet_weights_file(model_spec.arch, self.options.weights_dir)
        model = build_model(model_spec.arch, self.data.c, model_spec.head, weights=weights)
        if model_spec.pretrained_run is not None:
            self.load_run_weights(model, *model_spec.pretrained_run)
        if self.runtime.collectives is not None:
            model = self.runtime.collectives.prepare(model)  # type: ignore[assignment]
            if self.spec.resources.sync_bn and self.runtime.device.type != "cuda":
                self.event("sync_bn", "resources.sync_bn needs CUDA: per-rank BatchNorm on CPU")
        precision = Precision.choose(self.spec.resources.precision, self.runtime.device)
        self.learner = Learner(
            core=model,
            arch=model_spec.arch,
            device=self.runtime.device,
            multi_label=self.data.multi_label,
            precision=precision,
            oom_at_batch=self.oom_at_batch,
        )
        self.report.device = f"{self.runtime.device} ({precision.name})"

    def load_run_weights(self, model: torch.nn.Sequential, run_id: str, stage: str | None) -> None:
        """``pretrained: run:<id>[:stage]``: earlier weights; a new head if classes differ."""
        if self.options.resolve_run is None:
            raise DataError("model.pretrained: run:<id> needs a place to find runs")
        payload = load_checkpoint(self.options.resolve_run(run_id, stage))
        if payload.get("arch") != self.spec.model.arch:
            raise DataError(
                f"model.pretrained: run {run_id} trained {payload.get('arch')}, "
                f"not {self.spec.model.arch}"
            )
        state = payload["model"]
        if list(payload.get("classes", [])) == self.data.classes:
            model.load_state_dict(state)
            return
        body = {k[2:]: v for k, v in state.items() if k.startswith("0.")}
        model[0].load_state_dict(body)
        features = int(state["1.2.weight"].shape[0]) // (
            2 if self.spec.model.head.concat_pool else 1
        )
        model[1] = create_head(features, self.data.c, self.spec.model.head)
        self.event("head", f"classes differ from run {run_id}: the head was re-made")

    def resume(self) -> tuple[int, StageCursor]:
        """Load the latest checkpoint when resuming; return where to continue."""
        latest = read_latest(self.ckpt_dir) if self.options.resume else None
        if latest is None:
            if self.options.resume:
                self.event("resume", "nothing to resume from: starting from the beginning")
            return 0, StageCursor()
        payload = load_checkpoint(self.ckpt_dir / str(latest["file"]))
        if list(payload["classes"]) != self.data.classes:
            raise DataError("cannot resume: the data's classes changed since the checkpoint")
        self.learner.core.load_state_dict(payload["model"])
        stage_index = int(payload["stage_index"])
        self.batch_size = int(payload.get("batch_size", self.batch_size))
        self.accumulate = int(payload.get("accumulate", 1))
        train_mode = str(payload["train_mode"])
        stage_wd = self.spec.stages[min(stage_index, len(self.spec.stages) - 1)].wd
        self.set_train(train_mode, wd=stage_wd)
        assert self.learner.optimizer is not None
        self.learner.optimizer.load_state_dict(payload["opt"])
        self.report = Report.model_validate(payload["report"])
        self.report.world_size = self.runtime.world_size
        torch.set_rng_state(payload["rng"])
        cursor = StageCursor.from_state(payload["cursor"])
        self.event(
            "resume",
            f"resumed at stage {stage_index}, epoch {cursor.epoch}, batch {cursor.batch}",
        )
        return stage_index, cursor

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        log.info("%s: %s", kind, message)
        if self.runtime.is_main:
            self.reporter.on_event(kind, message, data)

    # ------------------------------------------------------------------ stages

    def per_rank_batch(self) -> int:
        return self.batch_size // self.runtime.world_size

    def micro_batch(self) -> int:
        """Images per forward pass on this rank (the per-rank batch unless memory ran out)."""
        return oom.micro_batch(self.per_rank_batch(), self.accumulate)

    def eval_batch(self) -> int:
        """Validation and prediction batches: twice the training forward pass, as fastai."""
        return self.micro_batch() * 2

    def epoch_batches(self, seed: int, start: int = 0) -> Iterator[Batch]:
        """One epoch's training batches for this rank, prepared a batch or two ahead."""
        return prefetch(
            self.data.train_batches(
                batch_size=self.per_rank_batch(),
                seed=seed,
                device=self.runtime.device,
                rank=self.runtime.rank,
                world_size=self.runtime.world_size,
                start=start,
            )
        )

    def run_stage(self, index: int, cursor: StageCursor) -> None:
        stage = self.spec.stages[index]
        fresh = cursor.epoch == 0 and cursor.batch == 0 and index >= len(self.report.stages)
        if fresh:
            self.report.stages.append(
                StageReport(
                    name=stage.name,
                    train=stage.train,
                    epochs=stage.epochs,
                    schedule=stage.schedule,
                    lrs=[],
                    kept=stage.keep,
                )
            )
        report = self.report.stages[index]
        self.set_train(stage.train, wd=stage.wd)
        report.trainable_params = self.learner.trainable_parameters()
        finder = stage.lr_find_params
        while finder is not None and report.lr_find is None:
            error = None
            try:
                result = lr_find(
                    self.learner,
                    lambda epoch: self.epoch_batches(
                        batch_seed(self.spec.seed, index, 10_000 + epoch)
                    ),
                    finder,
                    stage=stage.name,
                    should_stop=self.reporter.should_stop,
                    accumulate=self.accumulate,
                    agree=self.runtime.agree,
                )
            except Exception as exc:  # only out of memory is handled; the rest re-raised
                if not (self.retry_oom and oom.is_out_of_memory(exc)):
                    raise
                error = _first_line(exc)
            if error is not None:
                # lr_find restored the learner itself; outside ``except`` the failed
                # step's tensors are garbage.
                self.shrink_micro_batch(stage, report, epoch=None, batch=0, error=error)
                continue
            report.lr_find = result
            if self.runtime.is_main:
                self.reporter.on_lr_find(result)
                png = plots.plot_lr_find(result)
                self.write_file("plot", f"plots/lr_find-{stage.name}.png", png)
                self.write_file("plot", "plots/lr_find.png", png)
        if not report.lrs:
            report.lrs = self.stage_lrs(stage, report)
        batches = self.data.batches_per_epoch(self.per_rank_batch(), self.runtime.world_size)
        total = batches * stage.epochs
        if self.runtime.is_main:
            self.reporter.on_stage_start(stage.name, index, stage.epochs, batches)
        began = time.perf_counter()
        best_loss = min(
            (r.valid_loss for r in report.rows if r.valid_loss is not None), default=None
        )
        for epoch in range(cursor.epoch, stage.epochs):
            valid_loss = self.run_epoch_retrying(index, stage, report, cursor, total, batches)
            improved = valid_loss is not None and (best_loss is None or valid_loss < best_loss)
            if stage.keep == "best" and improved and self.runtime.is_main:
                best_loss = valid_loss
                report.kept_epoch = epoch
                save_checkpoint(
                    self.ckpt_dir / f"{stage.name}-best.pt",
                    {"model": self.learner.core.state_dict(), "epoch": epoch},
                )
            self.save_epoch(index, stage, cursor)
        report.seconds = round(report.seconds + time.perf_counter() - began, 3)
        self.finish_stage(index, stage, report)

    def stage_lrs(self, stage: Stage, report: StageReport) -> list[float]:
        n_groups = len(self.learner.groups)
        if stage.max_lr == "suggested":
            suggestion = report.lr_find.suggestion if report.lr_find else None
            if suggestion is None:
                self.event("lr", f"stage {stage.name}: no lr suggestion; using fastai's default")
                return lr_range(None, n_groups)
            return lr_range([suggestion], n_groups)
        return lr_range(stage.max_lr, n_groups)

    def run_epoch_retrying(
        self,
        index: int,
        stage: Stage,
        report: StageReport,
        cursor: StageCursor,
        total: int,
        batches: int,
    ) -> float | None:
        """:meth:`run_epoch`, started again with a smaller micro-batch after each OOM.

        The retried epoch sees the same batches (they depend only on the seed,
        the stage and the epoch) from the same weights, optimizer state, RNG
        and cursor, so only the micro-batching differs.
        """
        start = _EpochStart.take(self.learner, cursor) if self.retry_oom else None
        while True:
            error = ""
            failed_at = 0
            try:
                return self.run_epoch(index, stage, report, cursor, total, batches)
            except Exception as exc:  # only out of memory is handled; the rest re-raised
                if start is None or not oom.is_out_of_memory(exc):
                    raise
                error = _first_line(exc)
                failed_at = cursor.batch
            # Outside ``except``: the traceback, and the activations it kept, are gone.
            assert self.learner.optimizer is not None
            self.learner.optimizer.zero_grad(set_to_none=True)
            self.shrink_micro_batch(stage, report, epoch=cursor.epoch, batch=failed_at, error=error)
            start.restore(self.learner, cursor)

    def shrink_micro_batch(
        self, stage: Stage, report: StageReport, *, epoch: int | None, batch: int, error: str
    ) -> None:
        """After an OOM: free memory and double the accumulation, or fail at the floor."""
        oom.release_memory(self.runtime.device)
        per_rank = self.per_rank_batch()
        before = self.micro_batch()
        accumulate = oom.next_accumulate(per_rank, self.accumulate)
        where = f"stage {stage.name}, " + ("lr_find" if epoch is None else f"epoch {epoch}")
        if accumulate is None:
            raise TrainingError(
                f"{where}: out of memory even at micro-batch {before} "
                f"(batch_size {self.batch_size}): use a smaller image size or model ({error})"
            )
        self.accumulate = accumulate
        record = OomRetry(
            stage=stage.name,
            epoch=epoch,
            batch=batch,
            batch_size=self.batch_size,
            per_rank_batch=per_rank,
            micro_batch_before=before,
            micro_batch_after=self.micro_batch(),
            accumulate=accumulate,
            error=error,
        )
        report.oom_retries.append(record)
        self.event(
            "oom",
            f"{where}: out of memory at micro-batch {before}; retrying with micro-batch "
            f"{record.micro_batch_after} x {accumulate} accumulated "
            f"(batch_size {self.batch_size} unchanged)",
            record.model_dump(mode="json"),
        )

    def run_epoch(
        self,
        index: int,
        stage: Stage,
        report: StageReport,
        cursor: StageCursor,
        total: int,
        batches: int,
    ) -> float | None:
        seed = batch_seed(self.spec.seed, index, cursor.epoch)
        began = time.perf_counter()
        start_batch = cursor.batch

        def on_batch(batch: int, loss: float) -> None:
            if self.runtime.is_main:
                self.reporter.on_batch(stage.name, cursor.epoch, batch, batches, loss)

        try:
            seen = train_epoch(
                self.learner,
                self.epoch_batches(seed, start=start_batch),
                stage=stage,
                cursor=cursor,
                total_steps=total,
                lrs=report.lrs,
                on_batch=on_batch,
                should_stop=self.reporter.should_stop,
                accumulate=self.accumulate,
                agree=self.runtime.agree,
            )
        except StopRequested:
            cursor.epoch_seconds += time.perf_counter() - began
            self.save_state(
                f"{stage.name}-epoch{cursor.epoch}.pt", stage_index=index, cursor=cursor
            )
            self.report.status = "stopped"
            self.write_report()
            raise Stopped(
                f"stopped at stage {stage.name}, epoch {cursor.epoch}, batch {cursor.batch}; "
                "a checkpoint was saved: resume to continue"
            ) from None
        except Diverged:
            report.diverged = True
            raise
        train_seconds = time.perf_counter() - began
        seconds = cursor.epoch_seconds + time.perf_counter() - began
        result = validate(
            self.learner,
            self.data.valid_batches(
                batch_size=self.eval_batch(),
                device=self.runtime.device,
                rank=self.runtime.rank,
                world_size=self.runtime.world_size,
            ),
            self.spec.metrics,
            all_reduce=self.runtime.all_reduce,
        )
        seconds = cursor.epoch_seconds + time.perf_counter() - began
        images = seen * self.runtime.world_size
        row = EpochRow(
            stage=stage.name,
            epoch=cursor.epoch,
            train_loss=cursor.smoother.value if cursor.smoother.n else None,
            valid_loss=result.loss,
            metrics=result.metrics,
            seconds=round(seconds, 3),
            images_per_second=round(images / train_seconds, 1) if train_seconds > 0 else 0.0,
            lr=cursor.points[-1].lr if cursor.points else report.lrs[-1],
            batch_size=self.batch_size,
            micro_batch_size=self.micro_batch(),
            accumulate=self.accumulate,
            valid_count=result.count,
        )
        report.rows.append(row)
        report.batches = list(cursor.points)
        if self.runtime.is_main:
            self.reporter.on_epoch(row)
        if result.loss is not None and not _finite(result.loss):
            report.diverged = True
            raise Diverged(
                f"stage {stage.name}: the validation loss became {result.loss} at epoch "
                f"{cursor.epoch}: the learning rate is too high"
            )
        cursor.epoch += 1
        cursor.batch = 0
        cursor.epoch_seconds = 0.0
        return result.loss

    def save_epoch(self, index: int, stage: Stage, cursor: StageCursor) -> None:
        """Checkpoint after an epoch; the previous epoch's file of this stage goes."""
        name = f"{stage.name}-epoch{cursor.epoch - 1}.pt"
        self.save_state(name, stage_index=index, cursor=cursor)
        previous = self.ckpt_dir / f"{stage.name}-epoch{cursor.epoch - 2}.pt"
        if self.runtime.is_main and cursor.epoch >= 2:
            previous.unlink(missing_ok=True)
        self.write_report()

    def set_train(self, train: str, *, wd: float) -> None:
        """Freeze or unfreeze; under DDP re-wrap, since DDP fixes its parameters when made."""
        if self.learner.set_train(train, wd=wd) and self.runtime.collectives is not None:
            self.learner.wrap(self.runtime.collectives.wrap(self.learner.core))

    def load_weights(self, path: Path) -> None:
        """Model weights from a checkpoint only rank 0 wrote; every rank ends with them.

        On several nodes only rank 0's disk has the file, so rank 0 reads it
        and broadcasts the weights.
        """
        if self.runtime.is_main:
            self.learner.core.load_state_dict(load_checkpoint(path)["model"])
        if self.runtime.collectives is not None:
            self.runtime.collectives.broadcast_model(self.learner.core)

    def finish_stage(self, index: int, stage: Stage, report: StageReport) -> None:
        """Apply ``keep`` and write ``<stage>.pt``, the stage's kept weights."""
        if stage.keep == "best" and report.kept_epoch is not None:
            self.load_weights(self.ckpt_dir / f"{stage.name}-best.pt")
            self.event(
                "keep", f"stage {stage.name}: kept epoch {report.kept_epoch} (best valid loss)"
            )
        elif stage.keep == "last":
            report.kept_epoch = len(report.rows) - 1
        elif stage.keep == "better":
            report.kept_epoch = len(report.rows) - 1
            previous = self.kept_valid_loss(index - 1)
            current = report.rows[-1].valid_loss if report.rows else None
            if previous is not None and current is not None and current > previous:
                prev_file = self.ckpt_dir / f"{self.spec.stages[index - 1].name}.pt"
                self.load_weights(prev_file)
                report.reverted = True
                report.kept_epoch = None
                self.event(
                    "keep",
                    f"stage {stage.name} made valid loss worse ({current:.4f} > {previous:.4f}): "
                    f"reloaded stage {self.spec.stages[index - 1].name}'s weights",
                )
        self.save_state(f"{stage.name}.pt", stage_index=index + 1, cursor=StageCursor())
        if self.runtime.is_main:
            for leftover in self.ckpt_dir.glob(f"{stage.name}-epoch*.pt"):
                leftover.unlink(missing_ok=True)
            self.write_latest_pointer(index)
        self.write_report()

    def write_latest_pointer(self, index: int) -> None:
        write_latest(
            self.ckpt_dir,
            f"{self.spec.stages[index].name}.pt",
            {"stage_index": index + 1, "epoch": 0, "batch": 0},
        )

    def kept_valid_loss(self, index: int) -> float | None:
        """The valid loss of the weights stage ``index`` ended with."""
        while index >= 0:
            stage = self.report.stages[index]
            if not stage.reverted:
                if stage.kept_epoch is None or not stage.rows:
                    return None
                return stage.rows[stage.kept_epoch].valid_loss
            index -= 1
        return None

    # ------------------------------------------------------------------ end

    def finish(self) -> None:
        """Interpretation, plots, test predictions, findings, report."""
        began = time.perf_counter()
        result = validate(
            self.learner,
            self.data.valid_batches(batch_size=self.eval_batch(), device=self.runtime.device),
            self.spec.metrics,
            keep_outputs=True,
        )
        self.report.findings = diagnose(
            self.report.stages, n_classes=self.data.c, error_metric=_error_metric(self.spec)
        )
        if not self.runtime.is_main:
            return
        if result.logits is not None and result.targets is not None and result.indices is not None:
            files = [self.data.valid.items[int(i)].rel for i in result.indices]
            interpretation = interpret(
                result.logits,
                result.targets,
                classes=self.data.classes,
                files=files,
                k=self.spec.interpret.top_losses,
                min_val=self.spec.interpret.most_confused_min,
                multi_label=self.data.multi_label,
            )
            self.report.interpretation = interpretation
            if interpretation.top_losses:
                positions = [int(result.indices[t.index]) for t in interpretation.top_losses]
                images = self.valid_images(positions)
                self.write_file(
                    "plot",
                    "plots/top_losses.png",
                    plots.plot_top_losses(images, interpretation.top_losses),
                )
            if self.spec.interpret.confusion_matrix and interpretation.confusion_matrix:
                import numpy as np

                cm = np.array(interpretation.confusion_matrix)
                self.write_file(
                    "plot",
                    "plots/confusion_matrix.png",
                    plots.plot_confusion_matrix(cm, self.data.classes),
                )
        self.plot_curves()
        self.predict_test()
        self.report.timings["interpret_seconds"] = round(time.perf_counter() - began, 3)

    def valid_images(self, positions: list[int]) -> Any:
        """Centre-cropped validation images in [0, 1] as (N, H, W, 3) numpy."""
        x = self.data._centre(self.data.valid.store, positions, torch.device("cpu"))
        return x.permute(0, 2, 3, 1).numpy()

    def plot_curves(self) -> None:
        train: list[tuple[int, float]] = []
        valid: list[tuple[int, float]] = []
        bounds: list[tuple[str, int]] = []
        ends: list[int] = []
        rows: list[EpochRow] = []
        offset = 0
        for stage in self.report.stages:
            bounds.append((stage.name, offset))
            per_epoch = self.data.batches_per_epoch(self.per_rank_batch(), self.runtime.world_size)
            for row in stage.rows:
                ends.append(offset + per_epoch * (row.epoch + 1))
                rows.append(row)
                if row.valid_loss is not None:
                    valid.append((ends[-1], row.valid_loss))
            train.extend((offset + p.iteration, p.smooth_loss) for p in stage.batches)
            offset += per_epoch * len(stage.rows)
        self.write_file("plot", "plots/losses.png", plots.plot_losses(train, valid, bounds))
        self.write_file(
            "plot", "plots/metrics.png", plots.plot_metrics(rows, self.spec.metrics, ends)
        )

    def predict_test(self) -> None:
        """test_predictions.csv: file, predicted class, probability per class."""
        if self.data.test is None or not self.data.test_files:
            return
        probabilities: list[torch.Tensor] = []
        with self.learner.evaluating():
            for x in self.data.test_batches(
                batch_size=self.eval_batch(), device=self.runtime.device
            ):
                logits = self.learner.forward(x).float()
                probs = torch.sigmoid(logits) if self.data.multi_label else torch.softmax(logits, 1)
                probabilities.append(probs.cpu())
        probs_all = torch.cat(probabilities)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["file", "predicted", *self.data.classes])
        for path, probs in zip(self.data.test_files, probs_all, strict=True):
            if self.data.multi_label:
                predicted = ";".join(
                    c for c, p in zip(self.data.classes, probs, strict=True) if p >= 0.5
                )
            else:
                predicted = self.data.classes[int(probs.argmax())]
            rel = path.relative_to(self.data.source).as_posix()
            writer.writerow([rel, predicted, *(f"{float(p):.6f}" for p in probs)])
        self.write_file("predictions", "test_predictions.csv", buffer.getvalue().encode())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def _error_metric(spec: ExperimentSpec) -> str:
    for name in ("error_rate", "accuracy"):
        if name in spec.metrics:
            return name
    return "error_rate"


def run_experiment(
    spec: ExperimentSpec,
    options: EngineOptions,
    reporter: Reporter | None = None,
    runtime: Runtime | None = None,
) -> Report:
    """Run every stage of ``spec`` into ``options.out_dir`` and return the report.

    Data problems raise DataError before any training; a NaN loss raises
    Diverged after recording a "diverged" finding; a stop request raises
    Stopped after a checkpoint.  In every case report.json says what happened.
    """
    torch.manual_seed(spec.seed)
    run = _Run(spec, options, reporter or NullReporter(), runtime or Runtime())
    try:
        run.load_data()
        run.build_learner()
        start, cursor = run.resume()
        if start == 0 and cursor.epoch == 0 and cursor.batch == 0 and run.runtime.is_main:
            show = spec.interpret.show_batch
            if show is not None:
                images, titles = run.data.show_batch(
                    show.rows**2, seed=batch_seed(spec.seed, 99_999)
                )
                run.write_file(
                    "plot",
                    "plots/show_batch.png",
                    plots.plot_show_batch(images.permute(0, 2, 3, 1).numpy(), titles),
                )
        for index in range(start, len(spec.stages)):
            run.run_stage(index, cursor)
            cursor = StageCursor()
        run.finish()
        run.report.status = "succeeded"
        run.write_report()
        return run.report
    except Stopped:
        raise
    except Diverged as exc:
        run.report.status = "failed"
        run.report.error = str(exc)
        run.report.findings = diagnose(
            run.report.stages, n_classes=max(run.report.counts.get("classes", 2), 2)
        )
        if not any(f.code == "diverged" for f in run.report.findings):
            run.report.findings.append(_diverged_finding(exc, run.report))
        run.write_report()
        raise
    except TrainingError as exc:
        run.report.status = "failed"
        run.report.error = str(exc)
        run.write_report()
        raise


def _diverged_finding(exc: Diverged, report: Report) -> Finding:
    stage = report.stages[-1].name if report.stages else "?"
    return Finding(
        code="diverged",
        stage=stage,
        severity="error",
        message=str(exc),
        evidence={"stage": stage},
        advice="The learning rate is too high: lower max_lr (run lr_find and pick a value "
        "well before the loss minimum), then start again from the previous stage.",
    )
