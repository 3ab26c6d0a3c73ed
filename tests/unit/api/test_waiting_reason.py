"""A queued run the live fleet cannot place says why, in ``GET /v1/experiments/{id}``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.tokens import create_token
from shared import fleet
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from shared.settings import Settings
from tests.unit.api.test_api_sqlite import make_spec


def test_a_run_too_big_for_the_fleet_shows_its_reason(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    engine = make_engine(url)
    with session_scope(engine) as session:
        _, secret = create_token(session, "alpha")
        fleet.register_worker(
            session,
            worker_id="laptop",
            hostname="laptop",
            queues=["cpu"],
            gpus=0,
            gpu_model=None,
            memory_bytes=None,
            versions={},
            now=datetime.now(UTC),
        )
    settings = Settings(
        database_url=url, home=tmp_path, data_roots=[tmp_path / "data"], publish_on_submit=False
    )
    headers = {"Authorization": f"Bearer {secret}"}
    with TestClient(create_app(settings)) as client:
        big = make_spec(resources={"queue": "cpu", "gpus": 2})
        small = make_spec(resources={"queue": "cpu", "gpus": 0})
        big_id = client.post("/v1/experiments", json=big, headers=headers).json()["id"]
        small_id = client.post("/v1/experiments", json=small, headers=headers).json()["id"]
        waiting = client.get(f"/v1/experiments/{big_id}", headers=headers).json()
        placeable = client.get(f"/v1/experiments/{small_id}", headers=headers).json()
    assert waiting["state"] == "queued"
    assert waiting["waiting_reason"] == (
        "needs 1 node with 2 GPUs; no live worker on queue 'cpu' has 2+ GPUs (the most is 0)"
    )
    assert placeable["waiting_reason"] is None
    engine.dispose()
