"""Postgres crashes during a run: the run goes on and succeeds; the API says 503, Retry-After.

A Postgres cluster of the test's own (see :mod:`tests.faults.servers`) holds
everything; it is stopped like a crash (``pg_ctl -m immediate``) after the
run's first epoch and started again a few seconds later. Meanwhile the
worker keeps training with its writes held in memory (the reporter), its
supervisor keeps the lease (the outage is shorter than the lease), and the
API answers every request with 503, a Retry-After header and a JSON body
naming the database, never a stack trace. After the restart the held writes
go out: every epoch row is there once, and the run succeeds on its first
attempt.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.tokens import create_token
from shared.db.models import ExperimentState
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from tests.faults.harness import Dispatcher, run_row, wait_for
from tests.faults.servers import PrivatePostgres
from tests.faults.test_worker_faults import EXPECTED_EPOCHS, Fleet

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 6.0


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_postgres_crash_during_a_run_costs_nothing(
    postgres: PrivatePostgres, tmp_path: Path, digits_root: Path
) -> None:
    upgrade(postgres.url)
    fleet = Fleet(postgres.url, tmp_path, digits_root)
    with session_scope(fleet.engine) as session:
        _, admin = create_token(session, None, admin=True)
    headers = {"Authorization": f"Bearer {admin}"}
    try:
        with ExitStack() as stack:
            stack.enter_context(Dispatcher(fleet.engine, fleet.settings))
            stack.enter_context(fleet.worker("pg", FITFLEET_WORKER_LEASE_TTL_S="40"))
            client = stack.enter_context(TestClient(create_app(fleet.settings)))
            run_id = fleet.submit("through-a-crash", head=2, all=2)
            wait_for(lambda: fleet.epochs(run_id), timeout=300, what="the first epoch row")

            postgres.crash()
            down_at = time.monotonic()
            answer = client.get(f"/v1/experiments/{run_id}", headers=headers)
            assert answer.status_code == 503
            assert int(answer.headers["Retry-After"]) > 0
            body = answer.json()
            assert body["error"] == "backend_unavailable"
            assert "database" in body["message"]
            assert "Traceback" not in answer.text
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
            postgres.start()

            wait_for(lambda: fleet.finished(run_id), timeout=400, what="the run to end")
            row = run_row(fleet.engine, run_id)
            assert row.state == ExperimentState.SUCCEEDED, (row.error, fleet.logs())
            assert row.attempt == 1  # never lost its worker
            assert fleet.epochs(run_id) == EXPECTED_EPOCHS
            again = client.get(f"/v1/experiments/{run_id}", headers=headers)
            assert again.status_code == 200
        # It was the held writes that carried the run, not luck in the timing.
        worker_log = (tmp_path / "pg.log").read_text(errors="replace")
        assert "training goes on" in worker_log
        assert "the database is back after" in worker_log
    finally:
        fleet.engine.dispose()
        make_engine(postgres.url).dispose()
