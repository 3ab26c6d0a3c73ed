"""The API is killed mid-traffic and started again: nothing accepted is lost or doubled.

A real uvicorn server on a fresh Postgres database takes submissions from
concurrent clients, each with its own Idempotency-Key and retrying on
connection errors and 5xx (as clients of a service should). Mid-way the server
is SIGKILLed, with requests in flight, and started again on the same port.
Every key must end accepted exactly once: a request whose transaction
committed just before the kill is answered, on retry, with the run it already
created (200), never a second run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from services.api.tokens import create_token
from shared.db.models import SqlExperiment, SqlOutbox
from shared.db.session import make_engine, session_scope
from tests.integration.pg import temporary_database

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CLIENTS = 8
PER_CLIENT = 25
SPEC = {
    "version": 1,
    "name": "restart",
    "project": "restart",
    "data": {"source": "digits", "size": 16},
    "model": {"arch": "resnet18", "pretrained": "none"},
    "stages": [{"name": "s", "epochs": 1}],
    "resources": {"gpus": 0, "queue": "restart"},
}


@pytest.fixture
def database_url() -> Iterator[str]:
    with temporary_database("apirestart") as url:
        yield url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "services.api.app:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.1)


def test_killing_the_api_mid_traffic_loses_and_doubles_nothing(
    database_url: str, tmp_path: Path
) -> None:
    engine = make_engine(database_url)
    with session_scope(engine) as session:
        _, secret = create_token(session, "restart")
    (tmp_path / "data" / "digits").mkdir(parents=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FITFLEET_HOME": str(tmp_path / "home"),
        "FITFLEET_DATABASE_URL": database_url,
        "FITFLEET_DATA_ROOTS": str(tmp_path / "data"),
        "FITFLEET_PUBLISH_ON_SUBMIT": "false",  # the outbox rows are what is checked here
        "FITFLEET_SUBMIT_RATE_PER_S": "0",  # one token sends everything, retries included
    }
    port = _free_port()
    log = tmp_path / "api.log"
    server = _serve(port, env, log)
    accepted: dict[str, str] = {}
    statuses: list[int] = []
    lock = threading.Lock()
    body = json.dumps(SPEC)

    def client(number: int) -> None:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
            timeout=5,
        ) as http:
            for index in range(PER_CLIENT):
                key = f"c{number}-{index}"
                deadline = time.monotonic() + 90
                while True:
                    try:
                        answer = http.post(
                            "/v1/experiments", content=body, headers={"Idempotency-Key": key}
                        )
                    except httpx.TransportError:
                        answer = None
                    if answer is not None and answer.status_code in (200, 201):
                        with lock:
                            accepted[key] = answer.json()["id"]
                            statuses.append(answer.status_code)
                        break
                    assert answer is None or answer.status_code >= 500, answer.text
                    assert time.monotonic() < deadline, f"{key} never accepted"
                    time.sleep(0.05)
                time.sleep(0.01)

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(client, n) for n in range(CLIENTS)]
            wait_until = time.monotonic() + 60
            while len(accepted) < CLIENTS * PER_CLIENT // 3:
                assert time.monotonic() < wait_until, "traffic never got going"
                time.sleep(0.02)
            server.send_signal(signal.SIGKILL)  # requests in flight die with it
            server.wait(10)
            time.sleep(1.0)
            server = _serve(port, env, log)
            for future in futures:
                future.result()
        keys = {f"c{n}-{i}" for n in range(CLIENTS) for i in range(PER_CLIENT)}
        assert set(accepted) == keys
        assert len(set(accepted.values())) == len(keys)  # one run per key
        with session_scope(engine) as session:
            runs = session.scalar(select(func.count()).select_from(SqlExperiment))
            messages = session.scalar(select(func.count()).select_from(SqlOutbox))
            stored = set(session.scalars(select(SqlExperiment.idempotency_key)))
        assert runs == len(keys) and messages == len(keys)  # nothing doubled
        assert stored == keys  # nothing lost
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        engine.dispose()
