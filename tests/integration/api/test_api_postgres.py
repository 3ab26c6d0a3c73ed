"""The HTTP API on a real Postgres: submission, listing and idempotency under concurrency.

Each session creates ``fitfleet_api_test_<random>`` on the server named by
``FITFLEET_TEST_POSTGRES_URL`` (default: the local CI server), migrates it and
drops it at the end. An unreachable server fails these tests; it never skips them.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from services.api.app import create_app
from services.api.tokens import create_token
from shared.db.models import SqlEvent, SqlExperiment, SqlOutbox
from shared.db.session import make_engine, session_scope
from shared.settings import Settings
from tests.integration.pg import temporary_database

pytestmark = pytest.mark.integration

CONCURRENT = 20


@pytest.fixture(scope="module")
def api_pg_url() -> Iterator[str]:
    """A fresh, migrated database for this module, dropped afterwards."""
    with temporary_database("api_test") as url:
        yield url


@pytest.fixture
def client_and_token(api_pg_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, str, str]]:
    project = f"p{secrets.token_hex(4)}"
    engine = make_engine(api_pg_url)
    try:
        with session_scope(engine) as session:
            _token_id, secret = create_token(session, project)
    finally:
        engine.dispose()
    settings = Settings(
        database_url=api_pg_url,
        home=tmp_path,
        data_roots=[tmp_path / "data"],
        artifacts_url=(tmp_path / "artifacts").as_uri(),
        publish_on_submit=False,  # these tests look at the rows the relay would send
    )
    with TestClient(create_app(settings)) as client:
        yield client, secret, project


def _spec(project: str, name: str = "digits", tags: list[str] | None = None) -> dict[str, Any]:
    return {
        "version": 1,
        "name": name,
        "project": project,
        "tags": tags or [],
        "data": {"source": "digits", "split": {"by": "folder"}},
        "model": {"arch": "resnet18", "pretrained": "none"},
        "stages": [{"name": "stage-1", "train": "head", "epochs": 1, "max_lr": 1e-2}],
        "resources": {"queue": "cpu", "gpus": 0},
    }


def test_ready_submit_and_list(client_and_token: tuple[TestClient, str, str]) -> None:
    client, secret, project = client_and_token
    auth = {"Authorization": f"Bearer {secret}"}
    assert client.get("/readyz").status_code == 200
    for i in range(3):
        tags = ["even"] if i % 2 == 0 else ["odd"]
        response = client.post(
            "/v1/experiments", json=_spec(project, f"run-{i}", tags), headers=auth
        )
        assert response.status_code == 201, response.text
    listing = client.get("/v1/experiments", params={"limit": 2}, headers=auth).json()
    assert listing["count"] == 3 and len(listing["items"]) == 2
    assert [i["name"] for i in listing["items"]] == ["run-2", "run-1"]
    tagged = client.get("/v1/experiments", params={"tag": "even"}, headers=auth).json()
    assert sorted(i["name"] for i in tagged["items"]) == ["run-0", "run-2"]
    run_id = listing["items"][0]["id"]
    cancelled = client.post(f"/v1/experiments/{run_id}/cancel", headers=auth)
    assert cancelled.json()["state"] == "cancelled"


def test_concurrent_submissions_with_one_key_make_one_run(
    client_and_token: tuple[TestClient, str, str], api_pg_url: str
) -> None:
    client, secret, project = client_and_token
    headers = {"Authorization": f"Bearer {secret}", "Idempotency-Key": "same-key"}
    start = threading.Barrier(CONCURRENT)

    def submit(_: int) -> tuple[int, str]:
        start.wait(timeout=30)
        response = client.post("/v1/experiments", json=_spec(project), headers=headers)
        return response.status_code, response.json().get("id", response.text)

    with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
        results = list(pool.map(submit, range(CONCURRENT)))

    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * (CONCURRENT - 1) + [201], results
    assert len({run_id for _, run_id in results}) == 1
    engine = make_engine(api_pg_url)
    try:
        with session_scope(engine) as session:

            def count(model: Any) -> int:
                query = select(func.count()).select_from(model)
                return int(session.scalar(query.where(model.experiment_id == results[0][1])) or 0)

            runs = session.scalar(
                select(func.count())
                .select_from(SqlExperiment)
                .where(SqlExperiment.project_id == project)
            )
            assert runs == 1
            assert count(SqlOutbox) == 1
            assert count(SqlEvent) == 1
    finally:
        engine.dispose()
