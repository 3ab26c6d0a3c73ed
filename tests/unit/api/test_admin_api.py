"""``/v1/admin/workers`` and ``/v1/admin/queues`` on SQLite and the embedded filesystem broker."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from services.api.app import create_app
from services.api.tokens import create_token
from shared import fleet
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from shared.runs import TRAIN_TASK
from shared.settings import Settings
from tests.rows import add_queued_run


class Admin:
    """A running app, its engine, an admin token and a project token."""

    def __init__(self, client: TestClient, engine: Engine, settings: Settings) -> None:
        self.client = client
        self.engine = engine
        self.settings = settings
        with session_scope(engine) as session:
            _, self.admin = create_token(session, None, admin=True)
            _, self.alpha = create_token(session, "alpha")

    def get(self, path: str, secret: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return self.client.get(path, headers=headers)

    def register(self, worker_id: str, *, gpus: int, beat: datetime, queues: list[str]) -> None:
        with session_scope(self.engine) as session:
            fleet.register_worker(
                session,
                worker_id=worker_id,
                hostname="box",
                queues=queues,
                gpus=gpus,
                gpu_model="NVIDIA H200" if gpus else None,
                memory_bytes=141 * 2**30 if gpus else None,
                versions={"python": "3.11.7", "torch": None},
                now=beat,
            )


def build(tmp_path: Path, **overrides: Any) -> Iterator[Admin]:
    url = f"sqlite:///{tmp_path / 'admin.db'}"
    upgrade(url)
    settings = Settings(
        database_url=url,
        home=tmp_path,
        artifacts_url=(tmp_path / "artifacts").as_uri(),
        publish_on_submit=False,
        worker_heartbeat_s=5.0,
        **overrides,
    )
    engine = make_engine(url)
    try:
        with TestClient(create_app(settings)) as client:
            yield Admin(client, engine, settings)
    finally:
        engine.dispose()


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    yield from build(tmp_path)


@pytest.mark.parametrize("path", ["/v1/admin/workers", "/v1/admin/queues"])
def test_admin_views_need_an_admin_token(admin: Admin, path: str) -> None:
    missing = admin.get(path)
    assert missing.status_code == 401
    assert missing.json()["error"] == "unauthorized"
    project = admin.get(path, admin.alpha)
    assert project.status_code == 403
    assert project.json() == {
        "error": "forbidden",
        "message": "admin token required: the fleet and queue views span every project",
    }
    assert admin.get(path, admin.admin).status_code == 200


def test_workers_lists_both_with_their_effective_state(admin: Admin) -> None:
    now = datetime.now(UTC)
    admin.register("gpu-box:1", gpus=8, beat=now, queues=["gpu"])
    admin.register("cpu-box:2", gpus=0, beat=now - timedelta(seconds=16), queues=["cpu"])
    body = admin.get("/v1/admin/workers", admin.admin).json()
    assert body["lost_after_s"] == 15.0
    by_id = {w["id"]: w for w in body["workers"]}
    assert [w["id"] for w in body["workers"]] == ["gpu-box:1", "cpu-box:2"]  # live first
    gpu, cpu = by_id["gpu-box:1"], by_id["cpu-box:2"]
    assert (gpu["state"], gpu["gpus"], gpu["gpu_model"]) == ("idle", 8, "NVIDIA H200")
    assert gpu["memory_bytes"] == 141 * 2**30 and gpu["versions"]["python"] == "3.11.7"
    # Silent for more than 3 heartbeats: lost, although its row still says idle.
    assert (cpu["state"], cpu["gpus"], cpu["gpu_model"], cpu["memory_bytes"]) == (
        "lost",
        0,
        None,
        None,
    )
    assert cpu["seconds_since_heartbeat"] >= 16


def test_queues_show_why_a_run_cannot_be_placed(admin: Admin) -> None:
    admin.register("gpu-box:1", gpus=8, beat=datetime.now(UTC), queues=["gpu"])
    with session_scope(admin.engine) as session:
        stuck = add_queued_run(session, spec={"resources": {"gpus": 8, "nodes": 2}}, queue="gpu")
    # One message really in the (filesystem) broker, so the two depths can differ.
    from shared.celery import make_celery

    app = make_celery(admin.settings)
    try:
        app.send_task(TRAIN_TASK, args=[stuck], queue="gpu")
    finally:
        app.close()
    body = admin.get("/v1/admin/queues", admin.admin).json()
    assert body["broker_error"] is None
    (gpu,) = body["queues"]
    assert gpu["name"] == "gpu"
    assert (gpu["database_depth"], gpu["broker_depth"], gpu["queued"]) == (1, 1, 1)
    assert (gpu["live_workers"], gpu["idle_workers"], gpu["oldest_waiting_id"]) == (1, 1, stuck)
    (run,) = gpu["waiting"]
    assert run["id"] == stuck and not run["placeable_ever"]
    assert (
        run["reason"]
        == "needs 2 nodes with 8 GPUs; 1 live worker with 8+ GPUs on queue 'gpu' (1 idle)"
    )


def test_a_broker_that_is_down_leaves_depths_null_not_a_500(tmp_path: Path) -> None:
    for admin in build(tmp_path, broker_url="redis://127.0.0.1:1/0"):
        with session_scope(admin.engine) as session:
            add_queued_run(session, queue="gpu")
        response = admin.get("/v1/admin/queues", admin.admin)
        assert response.status_code == 200
        body = response.json()
        assert body["broker_error"].startswith("broker unavailable")
        (gpu,) = body["queues"]
        assert gpu["broker_depth"] is None and gpu["database_depth"] == 1
        assert gpu["waiting"][0]["reason"] == "no live worker on queue 'gpu'"
