"""The API process must never load torch: its image does not even install it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

PROBE = """
import sys
import services.api.app
from services.api.app import create_app
assert 'torch' not in sys.modules, 'torch was imported'
assert not any(m == 'workers' or m.startswith('workers.') for m in sys.modules), 'workers imported'
"""


def test_importing_the_api_does_not_load_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
