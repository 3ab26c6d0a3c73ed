"""``live_stack``: the whole service, up once per session, for the end-to-end tests here.

The S3 fixture it needs (``s3_endpoint``) and ``digits_root`` come from the
conftests above this folder (``tests/integration/conftest.py``,
``tests/conftest.py``), which pytest applies here already. They are not
re-imported the way ``tests/faults/conftest.py`` does (that folder is outside
``tests/integration``): a second definition here would start a second moto
server in a session that runs both these tests and the other integration tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.e2e.stack import LiveStack, start_live_stack
from tests.integration.moto_server import S3Endpoint

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder is an integration test and a slow one (it trains runs).

    A hook rather than ``pytestmark`` in each module, so a new test file here
    cannot forget the marks and slip into a ``-m "not slow"`` run.
    """
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def live_stack(
    tmp_path_factory: pytest.TempPathFactory, s3_endpoint: S3Endpoint, digits_root: Path
) -> Iterator[LiveStack]:
    """API server, workers, dispatcher and finished runs, shared by every e2e test.

    Session-scoped because bringing it up trains runs (tens of seconds); tests
    must therefore not change what it holds (cancel, delete) and should submit
    runs of their own when they need to.
    """
    with start_live_stack(tmp_path_factory.mktemp("live-stack"), s3_endpoint, digits_root) as stack:
        yield stack
