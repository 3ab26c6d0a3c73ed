"""Smoke test of bench/dashboard.py: a small database, every question asked over HTTP.

Latency is not asserted (benchmarks print ratios; the machine is noisy): the
test checks that the script generates and loads the rows, answers every
question with 200s, and reports each one with its plan, so the benchmark in
bench/README.md stays runnable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTIONS = (
    "runs page, default sort",
    "runs page, best:error_rate",
    "leaderboard",
    "compare 10 runs",
    "failures",
    "datasets",
)


def test_bench_dashboard_smoke(tmp_path: Path) -> None:
    out = tmp_path / "dashboard.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        str(REPO / "bench" / "dashboard.py"),
        "--runs", "200",
        "--epochs", "5",
        "--requests", "10",
        "--no-mlflow",
        "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for question in QUESTIONS:
        assert question in done.stdout, done.stdout
    result = json.loads(out.read_text())
    fitfleet = result["fitfleet"]
    assert fitfleet["runs"] == 200
    assert fitfleet["run_metric_rows"] > 0
    latencies = fitfleet["latencies"]
    assert len(latencies) >= len(QUESTIONS) + 1  # and the baseline
    for name, numbers in latencies.items():
        assert numbers["n"] == 10, name
        assert 0 < numbers["p50_ms"] <= numbers["p95_ms"] <= numbers["max_ms"], name
    assert fitfleet["plans"], "EXPLAIN plans were not captured"
