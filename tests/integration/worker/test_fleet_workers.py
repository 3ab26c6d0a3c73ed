"""Two real Celery workers join the fleet; a killed one turns lost within 3 heartbeats.

Both workers are subprocesses (``celery -A workers.celery_entry worker``) on
Redis db 15 and a fresh Postgres database, heartbeating every 0.5 s; one
declares 2 GPUs (``FITFLEET_WORKER_GPUS``: on a CPU machine, 2 gloo ranks).
The admin endpoints are read through the real FastAPI app on the same
database and broker. Redis or Postgres unreachable fails the test.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from services.api.app import create_app
from services.api.tokens import create_token
from shared import fleet
from shared.celery import make_celery
from shared.db.models import SqlEvent, SqlWorker, WorkerState
from shared.db.session import make_engine, session_scope
from shared.runs import TRAIN_TASK
from shared.settings import Settings
from tests.integration.celery_worker import celery_worker, redis_or_fail, unique_queue
from tests.integration.pg import temporary_database
from tests.rows import add_queued_run

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("FITFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
HEARTBEAT_S = 0.5
LOST_AFTER_S = 3 * HEARTBEAT_S
SLACK_S = 1.0  # a commit, a poll of the API, a busy 2-core CI box


def wait_for(check: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """Poll ``check`` every 0.1 s until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with temporary_database("fleet") as url:
        yield url


def test_two_workers_listed_a_killed_one_lost_and_queue_reasons(
    database_url: str, tmp_path: Path
) -> None:
    redis_url = redis_or_fail(REDIS_URL)
    queue = unique_queue("fleetq")
    nobody = unique_queue("nobodyq")  # a queue no worker consumes
    settings = Settings(
        home=tmp_path / "api-home",
        database_url=database_url,
        broker_url=redis_url,
        artifacts_url=(tmp_path / "artifacts").as_uri(),
        publish_on_submit=False,
        worker_heartbeat_s=HEARTBEAT_S,
    )
    engine = make_engine(database_url)
    with session_scope(engine) as session:
        _, admin = create_token(session, None, admin=True)
    auth = {"Authorization": f"Bearer {admin}"}
    names = {"a": f"{queue}-a", "b": f"{queue}-b"}

    def env(name: str, **extra: str) -> dict[str, str]:
        return {
            "FITFLEET_HOME": str(tmp_path / name),
            "FITFLEET_BROKER_URL": redis_url,
            "FITFLEET_DATABASE_URL": database_url,
            "FITFLEET_WORKER_NAME": name,
            "FITFLEET_WORKER_HEARTBEAT_S": str(HEARTBEAT_S),
            **extra,
        }

    celery_app = make_celery(settings)
    try:
        with ExitStack() as stack, TestClient(create_app(settings)) as client:
            proc_a = stack.enter_context(
                celery_worker(
                    env(names["a"], FITFLEET_WORKER_GPUS="2"),
                    queue=queue,
                    log=tmp_path / "a.log",
                )
            )
            stack.enter_context(celery_worker(env(names["b"]), queue=queue, log=tmp_path / "b.log"))

            def workers() -> dict[str, dict[str, Any]]:
                response = client.get("/v1/admin/workers", headers=auth)
                assert response.status_code == 200, response.text
                return {w["id"]: w for w in response.json()["workers"]}

            def both_idle() -> dict[str, dict[str, Any]] | None:
                listed = workers()
                ok = all(listed.get(n, {}).get("state") == "idle" for n in names.values())
                return listed if ok else None

            listed = wait_for(both_idle, timeout=90, what="both workers to register")
            a, b = listed[names["a"]], listed[names["b"]]
            assert (a["gpus"], a["queues"], a["current_experiment_id"]) == (2, [queue], None)
            assert (b["gpus"], b["gpu_model"], b["memory_bytes"]) == (0, None, None)
            assert a["versions"]["celery"] and a["versions"]["python"]
            # Heartbeats really flow: the newest beat is younger than two intervals.
            wait_for(
                lambda: workers()[names["b"]]["seconds_since_heartbeat"] < 2 * HEARTBEAT_S,
                timeout=5,
                what="a fresh heartbeat",
            )

            # Queue reasons: a run needing 3 nodes with 4 GPUs on the fleet's queue, and
            # one on a queue nobody consumes whose message really sits in Redis.
            with session_scope(engine) as session:
                stuck = add_queued_run(
                    session,
                    queue=queue,
                    spec={"resources": {"queue": queue, "gpus": 4, "nodes": 3}},
                )
                orphan = add_queued_run(
                    session, queue=nobody, spec={"resources": {"queue": nobody, "gpus": 0}}
                )
            celery_app.send_task(TRAIN_TASK, args=[orphan], queue=nobody)
            response = client.get("/v1/admin/queues", headers=auth)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["broker_error"] is None
            queues = {q["name"]: q for q in body["queues"]}
            ours, theirs = queues[queue], queues[nobody]
            assert (ours["database_depth"], ours["broker_depth"]) == (1, 0)
            assert (ours["live_workers"], ours["idle_workers"]) == (2, 2)
            assert ours["oldest_waiting_id"] == stuck
            (waiting,) = ours["waiting"]
            assert waiting["reason"] == (
                f"needs 3 nodes with 4 GPUs; no live worker on queue '{queue}' has 4+ GPUs"
                " (the most is 2)"
            )
            assert (theirs["database_depth"], theirs["broker_depth"]) == (1, 1)
            assert theirs["waiting"][0]["reason"] == f"no live worker on queue '{nobody}'"

            # Kill worker a outright (main and pool processes): no shutdown signal runs.
            os.killpg(proc_a.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            listed = wait_for(
                lambda: (w := workers())[names["a"]]["state"] == "lost" and w,
                timeout=LOST_AFTER_S + 10,
                what="the killed worker to turn lost",
            )
            elapsed = time.monotonic() - killed_at
            assert elapsed <= LOST_AFTER_S + SLACK_S, f"lost only after {elapsed:.2f} s"
            assert listed[names["b"]]["state"] == "idle"
            time.sleep(2 * HEARTBEAT_S)  # b keeps beating: still idle, not flapping
            assert workers()[names["b"]]["state"] == "idle"
            # The dispatcher's reconcile pass writes it down, once.
            with session_scope(engine) as session:
                lost = fleet.mark_lost(session, now=datetime.now(UTC), lost_after_s=LOST_AFTER_S)
            assert lost == [names["a"]]
            # The reason now counts only the live worker.
            response = client.get("/v1/admin/queues", headers=auth)
            ours = {q["name"]: q for q in response.json()["queues"]}[queue]
            assert (ours["live_workers"], ours["lost_workers"]) == (1, 1)
            assert "(the most is 0)" in ours["waiting"][0]["reason"]
        # Worker b stopped cleanly (SIGTERM): its row says so.
        with session_scope(engine) as session:
            row = session.get(SqlWorker, names["b"])
            assert row is not None and row.state is WorkerState.LOST
            stopped = session.scalars(
                select(SqlEvent.actor).where(SqlEvent.kind == "worker.stopped")
            ).all()
            assert list(stopped) == [names["b"]]
    finally:
        with celery_app.connection_for_write() as conn:
            conn.default_channel.queue_purge(nobody)
        celery_app.close()
        engine.dispose()
