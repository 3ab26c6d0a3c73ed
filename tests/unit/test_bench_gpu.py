"""Smoke test of bench/gpu.py: it runs on a CPU with tiny arguments and prints its table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_gpu_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        str(REPO / "bench" / "gpu.py"),
        "--device", "cpu",
        "--size", "32",
        "--batch", "4",
        "--steps", "1",
        "--warmup", "1",
        "--archs", "resnet18",
        "--images", "8",
        "--matmul-n", "256",
        "--loader-workers", "0",
        "--budget-s", "60",
        "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "NO GPU" in done.stdout
    assert re.search(r"arch\s+data\s+loop\s+img/s\s+ratio", done.stdout)
    rates = re.findall(r"^resnet18\s+synthetic\s+engine\s+([\d.]+)", done.stdout, re.M)
    assert rates and float(rates[0]) > 0
    payload = json.loads(out.read_text())
    assert payload["cpu_only"] is True
    assert {(r["data"], r["loop"]) for r in payload["rows"]} == {
        ("synthetic", "engine"),
        ("synthetic", "baseline"),
        ("real, decode epoch", "engine"),
        ("real", "engine"),
        ("real", "baseline"),
    }
    assert all(r["images_per_second"] > 0 for r in payload["rows"])
