"""The whole service on real parts: HTTP submit -> outbox -> Redis -> Celery worker -> training.

Postgres (a fresh database), Redis (db 13) and moto's S3 server, all on
loopback; a real ``celery worker`` subprocess that starts the real trainer
(``python -m workers.run_job``) on digits 3 vs 7.  Checked: the states go
queued -> dispatched -> running -> succeeded, epoch rows appear while the run
is still running, every artifact is in the bucket with the recorded sha256,
and ``/v1/compare`` shows two runs that differ in one spec field.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from services.api.app import create_app
from services.api.tokens import create_token
from shared.celery import make_celery
from shared.db.models import SqlArtifact, SqlEpochMetric, SqlExperiment
from shared.db.session import make_engine, session_scope
from shared.dispatch import celery_publisher, relay_outbox
from shared.settings import Settings
from tests.integration.celery_worker import celery_worker, redis_or_fail, unique_queue
from tests.integration.moto_server import S3Endpoint
from tests.integration.pg import temporary_database

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REDIS_URL = os.environ.get("FITFLEET_TEST_FLOW_REDIS_URL", "redis://127.0.0.1:6379/13")
QUEUE = unique_queue("flowq")
REPO = Path(__file__).resolve().parents[3]


def spec(name: str, max_lr: float) -> dict[str, Any]:
    return {
        "version": 1,
        "name": name,
        "project": "vision",
        "seed": 1,
        "data": {
            "source": "digits",
            "size": 16,
            "batch_size": 32,
            "augment": {"flip": False},
            "normalize": "dataset",
        },
        "model": {"arch": "resnet18", "pretrained": "none", "head": {"lin_ftrs": [64]}},
        "metrics": ["error_rate", "accuracy"],
        "stages": [
            {"name": "stage-1", "train": "head", "epochs": 2, "max_lr": 1e-2},
            {"name": "stage-2", "train": "all", "epochs": 2, "max_lr": max_lr},
        ],
        "interpret": {"show_batch": {"rows": 2}, "top_losses": 4},
        "resources": {"queue": QUEUE, "gpus": 0, "timeout": "10m"},
    }


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with temporary_database("flow") as url:
        yield url


@pytest.fixture
def service(
    database_url: str, s3_endpoint: S3Endpoint, digits_root: Path, tmp_path: Path
) -> Iterator[tuple[Settings, Engine, str]]:
    redis_or_fail(REDIS_URL)
    bucket = s3_endpoint.create_bucket()
    env = {
        "FITFLEET_HOME": str(tmp_path / "home"),
        "FITFLEET_DATABASE_URL": database_url,
        "FITFLEET_BROKER_URL": REDIS_URL,
        "FITFLEET_ARTIFACTS_URL": f"s3://{bucket}/fitfleet",
        "FITFLEET_S3_ENDPOINT_URL": s3_endpoint.url,
        "FITFLEET_DATA_ROOTS": str(digits_root),
        "FITFLEET_WORKER_POLL_S": "0.5",
        "AWS_ACCESS_KEY_ID": s3_endpoint.access_key_id,
        "AWS_SECRET_ACCESS_KEY": s3_endpoint.secret_access_key,
        "AWS_DEFAULT_REGION": s3_endpoint.region,
    }
    settings = Settings(
        home=tmp_path / "api-home",
        database_url=database_url,
        broker_url=REDIS_URL,
        artifacts_url=env["FITFLEET_ARTIFACTS_URL"],
        s3_endpoint_url=s3_endpoint.url,
        data_roots=[digits_root],
    )
    engine = make_engine(database_url)
    saved = {k: os.environ.get(k) for k in env if k.startswith("AWS_")}
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    try:
        with celery_worker(env, queue=QUEUE, log=tmp_path / "worker.log"):
            yield settings, engine, bucket
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        engine.dispose()
        if os.environ.get("FITFLEET_SHOW_WORKER_LOG"):
            sys.stderr.write((tmp_path / "worker.log").read_text())


def test_submit_train_succeed_compare(
    service: tuple[Settings, Engine, str], s3_endpoint: S3Endpoint
) -> None:
    settings, engine, bucket = service
    with session_scope(engine) as session:
        _, secret = create_token(session, "vision")
    headers = {"Authorization": f"Bearer {secret}"}
    app = make_celery(settings)
    publish = celery_publisher(app)
    with TestClient(create_app(settings)) as http:
        ids = []
        for name, lr in (("flow-a", 1e-3), ("flow-b", 3e-3)):
            answer = http.post("/v1/experiments", json=spec(name, lr), headers=headers)
            assert answer.status_code == 201, answer.text
            ids.append(answer.json()["id"])
        first = ids[0]

        seen_states: dict[str, list[str]] = {i: [] for i in ids}
        rows_while_running = 0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with session_scope(engine) as session:
                relay_outbox(session, publish, now=datetime.now(UTC))
            for run_id in ids:
                body = http.get(f"/v1/experiments/{run_id}", headers=headers).json()
                if not seen_states[run_id] or seen_states[run_id][-1] != body["state"]:
                    seen_states[run_id].append(body["state"])
                if run_id == first and body["state"] == "running":
                    with session_scope(engine) as session:
                        count = session.scalar(
                            select(func.count()).where(SqlEpochMetric.experiment_id == first)
                        )
                    rows_while_running = max(rows_while_running, count or 0)
            if all(s[-1] in ("succeeded", "failed", "cancelled") for s in seen_states.values()):
                break
            time.sleep(0.2)

        for run_id in ids:
            assert seen_states[run_id][-1] == "succeeded", (
                seen_states,
                http.get(f"/v1/experiments/{run_id}", headers=headers).json(),
            )
        # queued and dispatched may pass between two polls; their order may not change.
        order = ["queued", "dispatched", "running", "succeeded"]
        for states in seen_states.values():
            assert states == sorted(states, key=order.index)
            assert "running" in states
        assert rows_while_running >= 1, "no epoch row appeared while the run was running"

        metrics = http.get(f"/v1/experiments/{first}/metrics", headers=headers).json()
        assert [(m["stage"], m["epoch"]) for m in metrics] == [
            ("stage-1", 0), ("stage-1", 1), ("stage-2", 0), ("stage-2", 1)
        ]  # fmt: skip

        s3 = s3_endpoint.client()
        with session_scope(engine) as session:
            artifacts = session.scalars(
                select(SqlArtifact).where(SqlArtifact.experiment_id == first)
            ).all()
            names = {a.name for a in artifacts}
            assert {
                "report.json",
                "plots/losses.png",
                "plots/show_batch.png",
                "checkpoints/stage-2.pt",
            } <= names
            for artifact in artifacts:
                key = artifact.uri.removeprefix(f"s3://{bucket}/")
                stored = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
                assert hashlib.sha256(stored).hexdigest() == artifact.sha256, artifact.name
                assert len(stored) == artifact.bytes
            row = session.get(SqlExperiment, first)
            assert row is not None and row.attempt == 1

        comparison = http.get(f"/v1/compare?ids={ids[0]},{ids[1]}", headers=headers).json()
        assert comparison["spec_differences"] == {"stages.1.max_lr": [1e-3, 3e-3]}
        assert all(len(run["epochs"]) == 4 for run in comparison["runs"])
