"""Where local runs live, and how ``pretrained: run:<id>[:stage]`` finds one."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from shared.errors import DataError


def runs_dir(home: Path) -> Path:
    """``$FITFLEET_HOME/runs``: one folder per local run, named by its id."""
    return home / "runs"


def new_run_id(name: str) -> str:
    """A readable, sortable id: the spec's name as a slug plus a timestamp."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:40] or "run"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_resolver(home: Path) -> RunResolver:
    """A resolver over ``$FITFLEET_HOME/runs``."""
    return RunResolver(runs_dir(home))


class RunResolver:
    """Maps (run id, stage) to a stage checkpoint of a finished local run."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, run_id: str, stage: str | None) -> Path:
        folder = (self.root / run_id).resolve()
        if self.root.resolve() not in folder.parents or not folder.is_dir():
            raise DataError(f"model.pretrained: no run {run_id!r} under {self.root}")
        if stage is None:
            report = folder / "report.json"
            if not report.is_file():
                raise DataError(f"model.pretrained: run {run_id!r} has no report.json")
            stages = json.loads(report.read_text()).get("stages", [])
            if not stages:
                raise DataError(f"model.pretrained: run {run_id!r} finished no stage")
            stage = str(stages[-1]["name"])
        path = folder / "checkpoints" / f"{stage}.pt"
        if not path.is_file():
            raise DataError(
                f"model.pretrained: run {run_id!r} has no checkpoint for stage {stage!r}"
            )
        return path
