"""Fixtures of the fault tests: the moto S3 endpoint (shared with the integration
tests), a fresh Postgres database per module, and a :class:`Fleet` per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.test_worker_faults import Fleet
from tests.integration.conftest import s3_endpoint, s3_env  # noqa: F401  (fixtures, used by name)
from tests.integration.pg import temporary_database


@pytest.fixture(scope="module")
def fault_database() -> Iterator[str]:
    with temporary_database("faults") as url:
        yield url


@pytest.fixture
def fleet(fault_database: str, tmp_path: Path, digits_root: Path) -> Iterator[Fleet]:
    fleet = Fleet(fault_database, tmp_path, digits_root)
    try:
        yield fleet
    finally:
        fleet.engine.dispose()
