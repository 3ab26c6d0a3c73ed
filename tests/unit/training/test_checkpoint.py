"""Checkpoint files: weights_only round trips, refusing pickled code, atomic writes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from shared.errors import DataError
from workers.training import checkpoint
from workers.training.checkpoint import (
    LATEST,
    load_checkpoint,
    read_latest,
    save_checkpoint,
    write_latest,
)


class Custom:
    """An arbitrary class: pickling stores a reference to it, loading would import it."""

    def __init__(self) -> None:
        self.value = 42


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


class Payload:
    """Unpickling this calls ``_touch``: proof that loading would execute code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _touch, (str(self.marker),)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _payload() -> dict[str, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "cursor": {"epoch": 2, "batch": 7, "step": 31, "smoother": {"mov_avg": 0.25, "n": 31}},
        "rng": torch.get_rng_state(),
        "lrs": [1e-4, 1e-4, 1e-3],
        "loss": 0.123456789,
        "name": "stage-1",
        "best": None,
        "done": True,
        "nested": [{"a": torch.arange(3)}, (1, 2.5, "x")],
    }


def _assert_equal(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict)
        assert a.keys() == b.keys()
        for key in a:
            _assert_equal(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_equal(x, y)
    else:
        assert a == b
        assert type(a) is type(b)


def test_roundtrip_with_weights_only(tmp_path):
    payload = _payload()
    path = tmp_path / "ckpt" / "stage-1.pt"
    size = save_checkpoint(path, payload)
    assert size == path.stat().st_size > 0
    loaded = load_checkpoint(path)
    _assert_equal(payload, loaded)
    # The file really is readable with weights_only=True (no pickled code needed).
    torch.load(path, weights_only=True)


def test_roundtrip_restores_a_model_and_optimizer(tmp_path):
    payload = _payload()
    save_checkpoint(tmp_path / "c.pt", payload)
    loaded = load_checkpoint(tmp_path / "c.pt")
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model.load_state_dict(loaded["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(loaded["optimizer"])
    assert int(optimizer.state_dict()["state"][0]["step"]) == 1


def test_pickled_custom_object_is_refused(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"model": {}, "extra": Custom()}, path)
    with pytest.raises(DataError, match="cannot be loaded safely"):
        load_checkpoint(path)


def test_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "plain.pkl"
    with path.open("wb") as handle:
        pickle.dump({"model": Custom()}, handle)
    with pytest.raises(DataError):
        load_checkpoint(path)


def test_code_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker)}, path)
    with pytest.raises(DataError):
        load_checkpoint(path)
    assert not marker.exists()
    # Control: an unsafe load of the same file does run the code.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_missing_and_non_dict_checkpoints(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(DataError, match="not a fitfleet checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    with pytest.raises(DataError):
        load_checkpoint(tmp_path / "garbage.pt")


def test_atomic_write_leaves_no_temp_file(tmp_path):
    path = tmp_path / "stage-1.pt"
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    assert _files(tmp_path) == ["stage-1.pt"]
    assert load_checkpoint(path) == {"step": 2}


def test_failure_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "stage-1.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    before = path.read_bytes()
    real_save = torch.save

    def half_then_fail(obj: object, handle: object, *args: object, **kwargs: object) -> None:
        real_save({"step": 2, "w": torch.zeros(1000)}, handle)  # bytes really hit the temp file
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    loaded = load_checkpoint(path)
    assert loaded["step"] == 1
    assert torch.equal(loaded["w"], torch.ones(3))
    assert _files(tmp_path) == ["stage-1.pt"]


def test_failure_on_first_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(checkpoint.torch, "save", fail)
    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(tmp_path / "sub" / "a.pt", {"x": 1})
    assert _files(tmp_path / "sub") == []


def test_latest_roundtrip(tmp_path):
    assert read_latest(tmp_path) is None
    write_latest(tmp_path, "stage-1-e2.pt", {"stage": "stage-1", "epoch": 2, "loss": 0.5})
    assert read_latest(tmp_path) == {
        "file": "stage-1-e2.pt",
        "stage": "stage-1",
        "epoch": 2,
        "loss": 0.5,
    }
    write_latest(tmp_path, "stage-2-e0.pt", {"stage": "stage-2"})
    assert read_latest(tmp_path) == {"file": "stage-2-e0.pt", "stage": "stage-2"}
    assert _files(tmp_path) == [LATEST]
    assert json.loads((tmp_path / LATEST).read_text())["file"] == "stage-2-e0.pt"
