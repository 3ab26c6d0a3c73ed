"""The submission fast path: the batching publisher and the token cache (SQLite, no servers)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from services.api.app import create_app
from services.api.auth import Caller, TokenCache
from services.api.publisher import NewRun, SubmitPublisher
from services.api.tokens import create_token
from shared import fleet
from shared.db.models import ExperimentState, SqlApiToken, SqlExperiment, SqlOutbox
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from shared.dispatch import OutboxMessage
from shared.runs import TRAIN_TASK
from shared.settings import Settings
from tests.rows import add_queued_run
from tests.unit.api.test_api_sqlite import make_spec


def _database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    return url


def _new(run_id: str, *, queue: str = "gpu", gpus: int = 0, nodes: int = 1) -> NewRun:
    return NewRun(id=run_id, queue=queue, priority=5, gpus=gpus, nodes=nodes)


def test_publisher_sends_every_notified_run_and_marks_them_sent(tmp_path: Path) -> None:
    engine = make_engine(_database(tmp_path))
    ids = []
    with session_scope(engine) as session:
        for index in range(30):
            ids.append(add_queued_run(session, priority=index % 10))
    sent: list[OutboxMessage] = []
    gate = threading.Event()

    def publish(message: OutboxMessage) -> None:
        gate.wait(5)  # hold the first pass so the rest pile up into one batch
        sent.append(message)

    publisher = SubmitPublisher(engine, publish)
    for run_id in ids:
        publisher.notify(_new(run_id))
    gate.set()
    publisher.close()
    assert [m.experiment_id for m in sent] == ids
    assert {(m.task, m.queue) for m in sent} == {(TRAIN_TASK, "gpu")}
    with session_scope(engine) as session:
        states = set(session.scalars(select(SqlExperiment.state)))
        unsent = session.scalars(select(SqlOutbox).where(SqlOutbox.sent_at.is_(None))).all()
    assert states == {ExperimentState.DISPATCHED}
    assert unsent == []
    engine.dispose()


def test_gangs_and_runs_too_big_for_the_fleet_are_left_to_the_dispatcher(tmp_path: Path) -> None:
    engine = make_engine(_database(tmp_path))
    with session_scope(engine) as session:
        fleet.register_worker(
            session,
            worker_id="cpu-1",
            hostname="h",
            queues=["gpu"],
            gpus=0,
            gpu_model=None,
            memory_bytes=None,
            versions={},
            now=datetime.now(UTC),
        )
        plain, gang, big = (add_queued_run(session) for _ in range(3))
    sent: list[OutboxMessage] = []
    publisher = SubmitPublisher(engine, sent.append)
    publisher.notify(_new(plain))
    publisher.notify(_new(gang, nodes=2))
    publisher.notify(_new(big, gpus=1))
    publisher.close()
    assert [m.experiment_id for m in sent] == [plain]
    with session_scope(engine) as session:
        unsent = set(
            session.scalars(select(SqlOutbox.experiment_id).where(SqlOutbox.sent_at.is_(None)))
        )
    assert unsent == {gang, big}
    engine.dispose()


def test_a_failed_publish_leaves_the_row_for_the_relay(tmp_path: Path) -> None:
    engine = make_engine(_database(tmp_path))
    with session_scope(engine) as session:
        run_id = add_queued_run(session)

    def publish(message: OutboxMessage) -> None:
        raise ConnectionError("broker down")

    publisher = SubmitPublisher(engine, publish)
    publisher.notify(_new(run_id))
    publisher.close()
    with session_scope(engine) as session:
        row = session.scalars(select(SqlOutbox)).one()
        assert row.sent_at is None  # the dispatcher's relay still sends it
        assert session.get(SqlExperiment, run_id).state == ExperimentState.QUEUED  # type: ignore[union-attr]
    engine.dispose()


def test_submitting_over_http_publishes_the_run(tmp_path: Path) -> None:
    url = _database(tmp_path)
    settings = Settings(
        database_url=url,
        home=tmp_path,
        data_roots=[tmp_path / "data"],
    )
    engine = make_engine(url)
    with session_scope(engine) as session:
        _, secret = create_token(session, "alpha")
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/v1/experiments", json=make_spec(), headers={"Authorization": f"Bearer {secret}"}
        )
        assert answer.status_code == 201
        run_id = answer.json()["id"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with session_scope(engine) as session:
                state = session.get(SqlExperiment, run_id).state  # type: ignore[union-attr]
            if state == ExperimentState.DISPATCHED:
                break
            time.sleep(0.02)
    assert state == ExperimentState.DISPATCHED
    engine.dispose()


def test_token_cache_expires_and_skips_when_disabled() -> None:
    caller = Caller(token_id="tok_1", project="alpha", is_admin=False)
    cache = TokenCache(0.05)
    assert cache.get("ff_secret") is None
    cache.put("ff_secret", caller)
    assert cache.get("ff_secret") == caller
    assert cache.get("ff_other") is None
    time.sleep(0.06)
    assert cache.get("ff_secret") is None
    off = TokenCache(0)
    off.put("ff_secret", caller)
    assert off.get("ff_secret") is None
    small = TokenCache(60, max_entries=2)
    for index in range(3):
        small.put(f"ff_{index}", caller)
    assert small.get("ff_2") == caller
    assert small.get("ff_0") is None  # the full cache started over


def test_a_revoked_token_stops_working_within_the_cache_time(tmp_path: Path) -> None:
    url = _database(tmp_path)
    settings = Settings(
        database_url=url,
        home=tmp_path,
        data_roots=[tmp_path / "data"],
        publish_on_submit=False,
        auth_cache_s=0.3,
    )
    engine = make_engine(url)
    with session_scope(engine) as session:
        token_id, secret = create_token(session, "alpha")
    headers = {"Authorization": f"Bearer {secret}"}
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/experiments", headers=headers).status_code == 200
        with session_scope(engine) as session:
            token = session.get(SqlApiToken, token_id)
            assert token is not None
            token.revoked_at = datetime.now(UTC)
        revoked_at = time.monotonic()
        # Still trusted from the cache for at most auth_cache_s ...
        while client.get("/v1/experiments", headers=headers).status_code == 200:
            assert time.monotonic() - revoked_at < 0.3 + 0.5
            time.sleep(0.02)
        # ... and refused from then on.
        assert client.get("/v1/experiments", headers=headers).status_code == 401
    engine.dispose()
