"""The embedded default end to end: SQLite, kombu's filesystem broker, a file artifact folder.

The same flow as the integration test on Postgres/Redis/S3, with nothing to
install: ``start_stack`` runs the real API (uvicorn), dispatcher and Celery
worker as processes; the run trains digits and leaves rows and files behind.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from cli.client import Client
from cli.stack import start_stack
from services.api.tokens import create_token
from shared.db.models import SqlArtifact
from shared.db.session import make_engine, session_scope
from shared.settings import Settings

SPEC = """
version: 1
name: embedded
seed: 1
data: {source: digits, size: 16, batch_size: 32, augment: {flip: false}}
model: {arch: resnet18, pretrained: none, head: {lin_ftrs: [64]}}
stages:
  - {name: stage-1, train: all, epochs: 2, max_lr: 3.0e-3}
interpret: {show_batch: {rows: 2}, top_losses: 4}
resources: {gpus: 0}
"""


@pytest.mark.slow
def test_embedded_stack_trains_a_submitted_run(tmp_path: Path, digits_root: Path) -> None:
    settings = Settings(home=tmp_path / "home", data_roots=[digits_root])
    assert settings.database_url.startswith("sqlite:///")
    assert settings.broker_url == "filesystem://"
    assert settings.artifacts_url.startswith("file://")
    stack = start_stack(settings)
    pids = [p.pid for p in stack.processes.values()]
    try:
        engine = make_engine(settings.database_url)
        with session_scope(engine) as session:
            _, secret = create_token(session, "default")
        with Client(stack.url, secret) as api:
            run_id = api.submit(SPEC, yaml=True)["id"]
            deadline = time.monotonic() + 300
            states = []
            while time.monotonic() < deadline:
                stack.check()
                state = api.get(run_id)["state"]
                if not states or states[-1] != state:
                    states.append(state)
                if state in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.3)
            assert states[-1] == "succeeded", (states, api.get(run_id))
            assert "running" in states
            rows = api.metrics(run_id)
            assert [(r["stage"], r["epoch"]) for r in rows] == [("stage-1", 0), ("stage-1", 1)]
        root = Path(settings.artifacts_url.removeprefix("file://"))
        with session_scope(engine) as session:
            artifacts = session.query(SqlArtifact).filter_by(experiment_id=run_id).all()
            assert {"report.json", "plots/losses.png", "checkpoints/stage-1.pt"} <= {
                a.name for a in artifacts
            }
            for artifact in artifacts:
                data = (root / "runs" / run_id / artifact.name).read_bytes()
                assert hashlib.sha256(data).hexdigest() == artifact.sha256
        engine.dispose()
    finally:
        stack.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
