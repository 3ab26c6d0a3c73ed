"""Fixtures shared by every test: a real digits dataset and an isolated FITFLEET_HOME."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.settings import get_settings


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding ``digits`` (3 vs 7, 16 px) and ``digits28`` (3 vs 7, 28 px)."""
    from workers.training.digits import build_digits

    root = tmp_path_factory.mktemp("data")
    build_digits(root / "digits", classes=(3, 7), size=16)
    build_digits(root / "digits28", classes=(3, 7), size=28)
    build_digits(root / "digits3", classes=(1, 2, 5), size=16)
    return root


@pytest.fixture
def fitfleet_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_root: Path
) -> Iterator[Path]:
    """FITFLEET_HOME in tmp_path, data roots = the digits root; settings re-read."""
    home = tmp_path / "home"
    monkeypatch.setenv("FITFLEET_HOME", str(home))
    monkeypatch.setenv("FITFLEET_DATA_ROOTS", str(digits_root))
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()
