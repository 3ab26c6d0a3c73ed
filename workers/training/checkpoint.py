"""Checkpoint files: written atomically, read with ``weights_only=True``.

A checkpoint holds the model, the optimizer, the position in the staged
schedule, the RNG state and the report so far: enough to resume a run exactly.
It only contains tensors and plain Python values, so loading it can never run
code (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from shared.errors import DataError

LATEST = "latest.json"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> int:
    """Write ``payload`` to ``path`` atomically; return the file's size in bytes.

    The file is written next to its destination and renamed into place, so a
    kill at any moment leaves either the old checkpoint or the new one, never a
    half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint without executing anything in it."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise DataError(f"checkpoint {path} does not exist") from exc
    except Exception as exc:  # pickle errors of many kinds: the file is not ours
        raise DataError(f"checkpoint {path} cannot be loaded safely: {exc}") from exc
    if not isinstance(payload, dict):
        raise DataError(f"checkpoint {path} is not a fitfleet checkpoint")
    return payload


def write_latest(folder: Path, name: str, info: dict[str, Any]) -> None:
    """Point ``latest.json`` at the newest checkpoint (atomically)."""
    tmp = folder / f".{LATEST}.tmp"
    tmp.write_text(json.dumps({"file": name, **info}))
    os.replace(tmp, folder / LATEST)


def read_latest(folder: Path) -> dict[str, Any] | None:
    """The pointer written by :func:`write_latest`, or None when there is none."""
    path = folder / LATEST
    if not path.is_file():
        return None
    result: dict[str, Any] = json.loads(path.read_text())
    return result
