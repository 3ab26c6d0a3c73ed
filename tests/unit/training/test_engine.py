"""The engine end to end on real digits: stages, keep, resume, divergence, predictions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from shared.errors import DataError, Diverged, Stopped, WeightsMissing
from shared.results import Report
from shared.spec_io import dump_spec
from workers.training.checkpoint import load_checkpoint, read_latest
from workers.training.engine import run_experiment
from workers.training.reporter import NullReporter

from .enginekit import options, row_numbers, tiny_spec

REPO = Path(__file__).resolve().parents[3]


class StopAfter(NullReporter):
    """Asks the engine to stop after ``n`` training batches (what Ctrl-C does)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = 0

    def on_batch(self, stage: str, epoch: int, batch: int, batches: int, loss: float) -> None:
        self.seen += 1

    def should_stop(self) -> bool:
        return self.seen >= self.n


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> Report:
    out = tmp_path_factory.mktemp("uninterrupted")
    return run_experiment(tiny_spec(), options(out, digits_root))


def test_two_stages_write_report_checkpoints_and_plots(
    uninterrupted: Report, digits_root: Path
) -> None:
    report = uninterrupted
    assert report.status == "succeeded"
    assert [s.name for s in report.stages] == ["stage-1", "stage-2"]
    assert [len(s.rows) for s in report.stages] == [2, 2]
    assert report.classes == ["3", "7"]
    assert report.counts["train"] == 291 and report.counts["valid"] == 71
    head_stage, all_stage = report.stages
    assert head_stage.trainable_params < all_stage.trainable_params
    assert all_stage.lrs == pytest.approx([1e-4, 1e-3**0.5 * 1e-4**0.5, 1e-3])
    assert report.interpretation is not None
    assert sum(map(sum, report.interpretation.confusion_matrix)) == 71
    assert len(report.interpretation.top_losses) == 4
    assert set(report.artifacts) >= {
        "report.json",
        "plots/losses.png",
        "plots/metrics.png",
        "plots/top_losses.png",
        "plots/confusion_matrix.png",
    }
    for row in all_stage.rows:
        assert row.images_per_second > 0
        assert row.metrics["error_rate"] == pytest.approx(1 - row.metrics["accuracy"])
    # Per-batch recorder: one point per training batch, lr following one-cycle.
    assert len(all_stage.batches) == 2 * (291 // 32)
    assert max(p.lr for p in all_stage.batches) == pytest.approx(1e-3, rel=0.05)


def test_resume_after_stop_matches_uninterrupted(
    tmp_path: Path, digits_root: Path, uninterrupted: Report
) -> None:
    # Stop in the middle of stage-2's first epoch (9 batches per epoch, 2 epochs of stage-1).
    with pytest.raises(Stopped):
        run_experiment(tiny_spec(), options(tmp_path, digits_root), StopAfter(18 + 4))
    stopped = Report.model_validate_json((tmp_path / "report.json").read_text())
    assert stopped.status == "stopped"
    latest = read_latest(tmp_path / "checkpoints")
    assert latest is not None and (latest["stage_index"], latest["batch"]) == (1, 4)

    resumed = run_experiment(tiny_spec(), options(tmp_path, digits_root, resume=True))
    assert resumed.status == "succeeded"
    assert row_numbers(resumed) == row_numbers(uninterrupted)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(
    tmp_path: Path, digits_root: Path, uninterrupted: Report
) -> None:
    spec = tiny_spec()
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(dump_spec(spec)))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FITFLEET_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "cli", "train", str(spec_file), "--out", str(out)]
    child = subprocess.Popen(
        [*command, "--data-root", str(digits_root)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            latest = read_latest(out / "checkpoints") if (out / "checkpoints").exists() else None
            if latest and latest["stage_index"] == 1 and latest["epoch"] >= 1:
                break
            assert child.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    assert json.loads((out / "report.json").read_text())["status"] == "running"

    resumed = run_experiment(spec, options(out, digits_root, resume=True))
    assert row_numbers(resumed) == row_numbers(uninterrupted)
    assert not list((out / "checkpoints").glob(".*")), "a temporary checkpoint was left behind"


def test_keep_best_reloads_the_best_epoch(tmp_path: Path, digits_root: Path) -> None:
    spec = tiny_spec(
        stages=[{"name": "only", "train": "all", "epochs": 3, "max_lr": 3e-3, "keep": "best"}]
    )
    report = run_experiment(spec, options(tmp_path, digits_root))
    stage = report.stages[0]
    losses = [row.valid_loss for row in stage.rows]
    assert stage.kept_epoch == losses.index(min(losses))
    kept = load_checkpoint(tmp_path / "checkpoints" / "only.pt")["model"]
    best = load_checkpoint(tmp_path / "checkpoints" / "only-best.pt")["model"]
    assert all(torch.equal(kept[k], best[k]) for k in kept)


def test_keep_better_reverts_a_stage_that_made_valid_loss_worse(
    tmp_path: Path, digits_root: Path
) -> None:
    spec = tiny_spec(
        stages=[
            {"name": "stage-1", "train": "head", "epochs": 2, "max_lr": 1e-2},
            {"name": "stage-2", "train": "all", "epochs": 1, "max_lr": 0.3, "keep": "better"},
        ]
    )
    report = run_experiment(spec, options(tmp_path, digits_root))
    first, second = report.stages
    assert second.rows[-1].valid_loss > first.rows[-1].valid_loss  # the huge lr hurt
    assert second.reverted
    reloaded = load_checkpoint(tmp_path / "checkpoints" / "stage-2.pt")["model"]
    stage1 = load_checkpoint(tmp_path / "checkpoints" / "stage-1.pt")["model"]
    assert all(torch.equal(reloaded[k], stage1[k]) for k in stage1)


def test_divergence_stops_with_a_finding(tmp_path: Path, digits_root: Path) -> None:
    spec = tiny_spec(
        stages=[
            {"name": "boom", "train": "all", "epochs": 5, "max_lr": 1e6, "schedule": "constant"}
        ]
    )
    with pytest.raises(Diverged):
        run_experiment(spec, options(tmp_path, digits_root))
    report = Report.model_validate_json((tmp_path / "report.json").read_text())
    assert report.status == "failed"
    assert report.stages[0].diverged
    assert len(report.stages[0].rows) < 5, "it kept burning epochs after diverging"
    assert any(
        f.code == "diverged" and "learning rate" in f.advice.lower() for f in report.findings
    )


def test_lr_find_then_suggested_lr(tmp_path: Path, digits_root: Path) -> None:
    spec = tiny_spec(
        stages=[
            {
                "name": "find",
                "train": "all",
                "epochs": 1,
                "max_lr": "suggested",
                "lr_find": {"num_it": 30},
            }
        ]
    )
    report = run_experiment(spec, options(tmp_path, digits_root))
    finder = report.stages[0].lr_find
    assert finder is not None and 6 <= len(finder.lrs) <= 30
    assert finder.suggestion is not None
    assert report.stages[0].lrs[-1] == pytest.approx(finder.suggestion)
    assert report.stages[0].lrs[0] == pytest.approx(finder.suggestion / 10)
    assert (tmp_path / "plots" / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_test_folder_predictions(tmp_path: Path, digits_root: Path) -> None:
    source = tmp_path / "data"
    for split in ("train", "valid"):
        for cls in ("3", "7"):
            (source / split / cls).mkdir(parents=True)
            for png in sorted((digits_root / "digits" / split / cls).glob("*.png"))[:40]:
                (source / split / cls / png.name).write_bytes(png.read_bytes())
    (source / "test").mkdir()
    for png in sorted((digits_root / "digits" / "valid" / "7").glob("*.png"))[:5]:
        (source / "test" / png.name).write_bytes(png.read_bytes())
    spec = tiny_spec(
        data={**dump_spec(tiny_spec())["data"], "source": str(source), "test": "test"},
        stages=[{"name": "s", "train": "all", "epochs": 1}],
    )
    run_experiment(spec, options(tmp_path / "out", tmp_path))
    lines = (tmp_path / "out" / "test_predictions.csv").read_text().splitlines()
    assert lines[0] == "file,predicted,3,7"
    assert len(lines) == 6
    for line in lines[1:]:
        name, predicted, p3, p7 = line.split(",")
        assert name.startswith("test/") and predicted in {"3", "7"}
        assert float(p3) + float(p7) == pytest.approx(1.0, abs=1e-5)


def test_pretrained_run_with_other_classes_remakes_the_head(
    tmp_path: Path, digits_root: Path
) -> None:
    first = tmp_path / "runs" / "first"
    run_experiment(
        tiny_spec(stages=[{"name": "s", "train": "all", "epochs": 1}]), options(first, digits_root)
    )

    def resolve(run_id: str, stage: str | None) -> Path:
        assert run_id == "first"
        return first / "checkpoints" / f"{stage or 's'}.pt"

    spec = tiny_spec(
        data={**dump_spec(tiny_spec())["data"], "source": "digits3"},
        model={"arch": "resnet18", "pretrained": "run:first:s", "head": {"lin_ftrs": [64]}},
        stages=[{"name": "t", "train": "head", "epochs": 1}],
    )
    report = run_experiment(spec, options(tmp_path / "second", digits_root, resolve_run=resolve))
    assert report.classes == ["1", "2", "5"]
    second = load_checkpoint(tmp_path / "second" / "checkpoints" / "t.pt")["model"]
    assert second["1.8.weight"].shape[0] == 3
    # The body came from the first run (conv weights are frozen in a head stage).
    original = load_checkpoint(first / "checkpoints" / "s.pt")["model"]
    assert torch.equal(second["0.0.weight"], original["0.0.weight"])


def test_pretrained_run_of_another_architecture_is_refused(
    tmp_path: Path, digits_root: Path
) -> None:
    first = tmp_path / "first"
    run_experiment(
        tiny_spec(stages=[{"name": "s", "train": "all", "epochs": 1}]), options(first, digits_root)
    )
    spec = tiny_spec(model={"arch": "resnet34", "pretrained": "run:first"})
    with pytest.raises(DataError, match="trained resnet18, not resnet34"):
        run_experiment(
            spec,
            options(
                tmp_path / "x", digits_root, resolve_run=lambda r, s: first / "checkpoints" / "s.pt"
            ),
        )


def test_missing_imagenet_weights_fail_before_training(tmp_path: Path, digits_root: Path) -> None:
    spec = tiny_spec(model={"arch": "resnet34", "pretrained": "imagenet"})
    with pytest.raises(WeightsMissing, match=r"resnet34-b627a593\.pth"):
        run_experiment(spec, options(tmp_path, digits_root))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
