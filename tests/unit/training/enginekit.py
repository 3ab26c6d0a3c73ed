"""Small specs and helpers for engine tests: fast on 2 CPU cores (16 px, resnet18)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.spec import ExperimentSpec
from shared.spec_io import validate_spec
from workers.training.engine import EngineOptions


def tiny_spec(**overrides: Any) -> ExperimentSpec:
    """Two stages (head, then all) on digits 3 vs 7 at 16 px; override any top-level key."""
    document: dict[str, Any] = {
        "version": 1,
        "name": "tiny",
        "seed": 3,
        "data": {
            "source": "digits",
            "split": {"by": "folder"},
            "size": 16,
            "batch_size": 32,
            "augment": {"flip": False},
            "normalize": "dataset",
        },
        "model": {"arch": "resnet18", "pretrained": "none", "head": {"lin_ftrs": [64]}},
        "metrics": ["error_rate", "accuracy"],
        "stages": [
            {"name": "stage-1", "train": "head", "epochs": 2, "max_lr": 1e-2},
            {"name": "stage-2", "train": "all", "epochs": 2, "max_lr": [1e-4, 1e-3]},
        ],
        "interpret": {"show_batch": None, "top_losses": 4, "confusion_matrix": True},
        "resources": {"gpus": 0},
    }
    document.update(overrides)
    return validate_spec(document)


def options(out: Path, root: Path, **kw: Any) -> EngineOptions:
    """EngineOptions reading data under ``root`` and writing to ``out``."""
    return EngineOptions(out_dir=out, data_roots=[root], weights_dir=out / "no-weights", **kw)


def row_numbers(report: Any) -> list[tuple[str, int, float | None, float | None, dict[str, Any]]]:
    """What must match between two runs: every epoch's losses and metrics."""
    return [
        (row.stage, row.epoch, row.train_loss, row.valid_loss, dict(row.metrics))
        for stage in report.stages
        for row in stage.rows
    ]
