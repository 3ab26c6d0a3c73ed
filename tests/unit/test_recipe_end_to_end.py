"""The notes' two-stage recipe, end to end through ``fitfleet train``, on real digits.

Head first, then unfreeze with lr_find and a [low, high] learning rate, on
handwritten 3s and 7s at 28 px with a randomly initialised resnet18 on the CPU.
The spec is the shipped example (only its data source is pointed at the test's
copy of the digits), so the demo and this test cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from cli.main import main
from shared.results import Report

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits-3v7.yaml"
PLOTS = ("show_batch", "lr_find", "losses", "metrics", "top_losses", "confusion_matrix")


@pytest.mark.slow
def test_two_stage_recipe_reaches_two_percent_error(
    tmp_path: Path, fitfleet_home: Path, digits_root: Path
) -> None:
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["data"]["source"] = str(digits_root / "digits28")
    spec_file = tmp_path / "recipe.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"

    result = CliRunner().invoke(main, ["train", str(spec_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "valid_loss" in result.output and "findings" in result.output

    report = Report.model_validate_json((out / "report.json").read_text())
    assert report.status == "succeeded"
    assert [s.name for s in report.stages] == ["stage-1", "stage-2"]
    assert [s.train for s in report.stages] == ["head", "all"]
    finder = report.stages[1].lr_find
    assert finder is not None and finder.suggestion is not None and len(finder.lrs) > 10
    assert report.stages[1].lrs[0] < report.stages[1].lrs[-1]  # discriminative

    # The error of the model the run ended with, from its own confusion matrix.
    assert report.interpretation is not None
    cm = np.array(report.interpretation.confusion_matrix)
    assert cm.sum() == report.counts["valid"] == 71
    error = 1 - np.trace(cm) / cm.sum()
    assert error <= 0.02, f"error rate {error:.4f} with {report.stages[-1].rows}"

    for name in PLOTS:
        with Image.open(out / "plots" / f"{name}.png") as image:
            assert image.format == "PNG"
            assert min(image.size) >= 200
    assert (out / "checkpoints" / "stage-1.pt").is_file()
    assert (out / "checkpoints" / "stage-2.pt").is_file()
    assert not list((out / "checkpoints").glob("*-epoch*.pt")), "epoch checkpoints left over"
