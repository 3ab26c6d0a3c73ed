"""Out of GPU memory: the epoch is retried with half the micro-batch, the global batch kept.

The OOM is forced on CPU by the engine's test hook (``oom_at_batch`` /
FITFLEET_TEST_OOM_AT_BATCH): every training forward pass of that many images
or more raises torch.cuda.OutOfMemoryError.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from shared.errors import Stopped, TrainingError
from shared.results import Report
from shared.spec import ExperimentSpec
from workers.training import oom
from workers.training.checkpoint import load_checkpoint
from workers.training.engine import run_experiment
from workers.training.learner import Learner, Precision
from workers.training.loop import StageCursor, train_epoch
from workers.training.reporter import NullReporter

from .enginekit import options, row_numbers, tiny_spec

CPU = torch.device("cpu")
STAGES = [
    {"name": "stage-1", "train": "head", "epochs": 1, "max_lr": 1e-2},
    {"name": "stage-2", "train": "all", "epochs": 1, "max_lr": [1e-4, 1e-3]},
]
NO_PLOTS = {"show_batch": None, "top_losses": 0, "confusion_matrix": False}
NEVER = 10_000  # a hook that never fires but lets the engine retry on CPU


def spec32(**overrides: Any) -> ExperimentSpec:
    """Two one-epoch stages at global batch 32 (9 batches of the 291 digits)."""
    return tiny_spec(**{"stages": STAGES, "interpret": NO_PLOTS, **overrides})


class Events(NullReporter):
    """Keeps the engine's events; can raise a CUDA OOM once, mid-epoch, and ask to stop."""

    def __init__(self, oom_after: int | None = None, stop_after: int | None = None) -> None:
        self.events: list[tuple[str, str, dict[str, Any] | None]] = []
        self.oom_after = oom_after
        self.stop_after = stop_after
        self.batches = 0

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, message, data))

    def on_batch(self, stage: str, epoch: int, batch: int, batches: int, loss: float) -> None:
        self.batches += 1
        if self.batches == self.oom_after:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def should_stop(self) -> bool:
        return self.stop_after is not None and self.batches >= self.stop_after

    def kinds(self, kind: str) -> list[tuple[str, str, dict[str, Any] | None]]:
        return [e for e in self.events if e[0] == kind]


@pytest.fixture(scope="module")
def oom_at_32(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> tuple[Report, Events]:
    out = tmp_path_factory.mktemp("oom32")
    events = Events()
    report = run_experiment(spec32(), options(out, digits_root, oom_at_batch=32), events)
    return report, events


def test_oom_halves_the_micro_batch_and_keeps_the_global_batch(
    oom_at_32: tuple[Report, Events],
) -> None:
    report, events = oom_at_32
    assert report.status == "succeeded"
    first, second = report.stages
    assert [(r.batch_size, r.micro_batch_size, r.accumulate) for r in first.rows] == [(32, 16, 2)]
    # The smaller micro-batch carries on into the next stage without a new OOM.
    assert [(r.batch_size, r.micro_batch_size, r.accumulate) for r in second.rows] == [(32, 16, 2)]
    assert second.oom_retries == []
    (retry,) = first.oom_retries
    assert (retry.stage, retry.epoch, retry.batch) == ("stage-1", 0, 0)
    assert (retry.batch_size, retry.per_rank_batch) == (32, 32)
    assert (retry.micro_batch_before, retry.micro_batch_after, retry.accumulate) == (32, 16, 2)
    assert "FITFLEET_TEST_OOM_AT_BATCH" in retry.error
    # One optimizer step per global batch: the schedule did not notice.
    assert [p.iteration for p in first.batches] == list(range(291 // 32))
    (event,) = events.kinds("oom")
    assert "micro-batch 32" in event[1] and "micro-batch 16 x 2" in event[1]
    assert event[2] is not None and event[2]["accumulate"] == 2


def test_oom_mid_epoch_restarts_the_epoch_and_resume_keeps_the_micro_batch(
    tmp_path: Path, digits_root: Path, oom_at_32: tuple[Report, Events]
) -> None:
    # Three optimizer steps at micro-batch 32, then "out of memory": the epoch
    # starts again from its saved weights, optimizer, RNG and cursor at micro-batch
    # 16.  Stopped 5 batches into the retried epoch and resumed without any hook,
    # stage-1 must end exactly as in the run that used micro-batch 16 from the start.
    spec = spec32(stages=STAGES[:1])
    events = Events(oom_after=3, stop_after=3 + 5)
    with pytest.raises(Stopped):
        run_experiment(spec, options(tmp_path, digits_root, oom_at_batch=NEVER), events)
    stopped = Report.model_validate_json((tmp_path / "report.json").read_text())
    (retry,) = stopped.stages[0].oom_retries
    assert (retry.epoch, retry.batch, retry.accumulate) == (0, 3, 2)
    assert "Tried to allocate" in retry.error
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "stage-1-epoch0.pt")
    assert (checkpoint["cursor"]["batch"], checkpoint["accumulate"]) == (5, 2)

    resumed = run_experiment(spec, options(tmp_path, digits_root, resume=True))
    expected = oom_at_32[0].stages[0]
    assert row_numbers(resumed) == row_numbers(oom_at_32[0])[:1]
    assert resumed.stages[0].batches == expected.batches
    assert [(r.micro_batch_size, r.accumulate) for r in resumed.stages[0].rows] == [(16, 2)]


def test_oom_halves_repeatedly_also_in_lr_find(tmp_path: Path, digits_root: Path) -> None:
    stage = {**STAGES[0], "max_lr": "suggested", "lr_find": {"num_it": 6}}
    spec = spec32(stages=[stage])
    report = run_experiment(spec, options(tmp_path, digits_root, oom_at_batch=16))
    assert report.status == "succeeded"
    only = report.stages[0]
    retries = [(r.epoch, r.micro_batch_before, r.micro_batch_after) for r in only.oom_retries]
    assert retries == [(None, 32, 16), (None, 16, 8)]  # in lr_find, before the epoch
    assert only.lr_find is not None and len(only.lr_find.lrs) == 6
    assert [(r.batch_size, r.micro_batch_size, r.accumulate) for r in only.rows] == [(32, 8, 4)]


def test_oom_at_the_floor_fails_clearly(tmp_path: Path, digits_root: Path) -> None:
    spec = spec32(stages=STAGES[:1])
    floor = oom.MIN_MICRO_BATCH
    with pytest.raises(TrainingError, match=f"out of memory even at micro-batch {floor}"):
        run_experiment(spec, options(tmp_path, digits_root, oom_at_batch=floor))
    report = Report.model_validate_json((tmp_path / "report.json").read_text())
    assert report.status == "failed"
    assert report.error is not None and "out of memory" in report.error
    assert [r.micro_batch_after for r in report.stages[0].oom_retries] == [16, 8, 4, 2]


# --- the pieces -----------------------------------------------------------------------------


def test_is_out_of_memory() -> None:
    assert oom.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert oom.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not oom.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not oom.is_out_of_memory(ValueError("out of memory"))


def test_next_accumulate_halves_down_to_the_floor() -> None:
    assert oom.MIN_MICRO_BATCH == 2  # BatchNorm cannot train on one image
    assert oom.next_accumulate(16, 1) == 2
    assert (oom.micro_batch(12, 4), oom.next_accumulate(12, 4)) == (3, 6)  # 2 images each
    assert oom.next_accumulate(12, 6) is None
    assert oom.next_accumulate(3, 1) is None  # 3 cannot split into parts of 2
    assert oom.next_accumulate(2, 1) is None


def test_hook_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(oom.TEST_HOOK_ENV, raising=False)
    assert oom.hook_from_env() is None
    monkeypatch.setenv(oom.TEST_HOOK_ENV, "8")
    assert oom.hook_from_env() == 8
    with pytest.raises(torch.cuda.OutOfMemoryError):
        oom.simulate(8, 8)
    oom.simulate(7, 8)
    with torch.inference_mode():
        oom.simulate(8, 8)  # validation and prediction are not affected


def no_batchnorm_learner() -> Learner:
    """A small conv net without BatchNorm or dropout: micro-batches change nothing."""
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    learner = Learner(nn.Sequential(body, head), "tiny", CPU, False, Precision.choose("fp32", CPU))
    learner.set_train("all", wd=1e-2)
    return learner


@pytest.mark.parametrize("accumulate", [2, 3])
def test_accumulated_gradients_equal_the_full_batch(accumulate: int) -> None:
    generator = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(16, 3, 8, 8, generator=generator),
            torch.randint(0, 3, (16,), generator=generator),
        )
        for _ in range(4)
    ]
    stage = spec32().stages[1]
    results = []
    for parts in (1, accumulate):  # 3 splits 16 unevenly: 6 + 5 + 5
        learner = no_batchnorm_learner()
        cursor = StageCursor()
        seen = train_epoch(
            learner,
            iter(copy.deepcopy(batches)),
            stage=stage,
            cursor=cursor,
            total_steps=4,
            lrs=[1e-2, 1e-2, 1e-2],
            on_batch=lambda batch, loss: None,
            should_stop=lambda: False,
            accumulate=parts,
        )
        assert seen == 64 and (cursor.batch, cursor.step, len(cursor.points)) == (4, 4, 4)
        results.append((learner, cursor))
    (full, full_cursor), (split, split_cursor) = results
    start = no_batchnorm_learner()
    for a, b, before in zip(
        full.core.parameters(), split.core.parameters(), start.core.parameters(), strict=True
    ):
        assert not torch.equal(a, before)  # it trained
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert [p.smooth_loss for p in split_cursor.points] == pytest.approx(
        [p.smooth_loss for p in full_cursor.points], rel=1e-6
    )
