"""The S3 endpoint goes away during a run: for 30 s, and for good.

The worker talks to moto's S3 server through a proxy the test can cut
(:mod:`tests.faults.proxy`), so the endpoint dies without moto losing what it
holds. Down for 30 s after the first epoch: uploads are held and retried,
training goes on, and once the endpoint is back everything is uploaded and the
run succeeds. Down past the run's limit (``FITFLEET_STORE_OUTAGE_LIMIT_S``,
8 s here): the run fails saying so, and the checkpoint of the stage it
finished before the outage is in the store and trains a new run through
``pretrained: run:<id>:<stage>``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from urllib.parse import urlsplit

import pytest

from shared.db.models import ExperimentState
from shared.storage.registry import open_store
from tests.faults.harness import Dispatcher, run_row, wait_for
from tests.faults.proxy import CuttableProxy
from tests.faults.test_worker_faults import EXPECTED_EPOCHS, Fleet
from tests.integration.moto_server import S3Endpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 30.0
LIMIT_S = 8


@pytest.fixture
def proxy(s3_endpoint: S3Endpoint) -> Iterator[CuttableProxy]:
    parts = urlsplit(s3_endpoint.url)
    assert parts.hostname is not None and parts.port is not None
    cuttable = CuttableProxy(parts.hostname, parts.port)
    try:
        yield cuttable
    finally:
        cuttable.close()


def _s3_fleet(fleet: Fleet, endpoint: S3Endpoint, proxy: CuttableProxy) -> dict[str, str]:
    bucket = endpoint.create_bucket()
    fleet.artifacts = f"s3://{bucket}/fitfleet"
    return {
        "FITFLEET_S3_ENDPOINT_URL": proxy.url,
        "AWS_ACCESS_KEY_ID": endpoint.access_key_id,
        "AWS_SECRET_ACCESS_KEY": endpoint.secret_access_key,
        "AWS_DEFAULT_REGION": endpoint.region,
    }


def _store(fleet: Fleet, endpoint: S3Endpoint) -> object:
    return open_store(fleet.artifacts, s3_endpoint_url=endpoint.url, s3_region=endpoint.region)


def test_thirty_seconds_without_s3_cost_the_run_nothing(
    fleet: Fleet, s3_env: S3Endpoint, proxy: CuttableProxy
) -> None:
    extra = _s3_fleet(fleet, s3_env, proxy)
    with ExitStack() as stack:
        stack.enter_context(Dispatcher(fleet.engine, fleet.settings))
        stack.enter_context(fleet.worker("s3", **extra))
        run_id = fleet.submit("through-an-s3-outage", head=2, all=2)
        wait_for(lambda: fleet.epochs(run_id), timeout=300, what="the first epoch row")
        proxy.cut()
        cut_at = time.monotonic()
        # Training goes on while the store is down: more epochs are recorded.
        wait_for(lambda: len(fleet.epochs(run_id)) >= 2, timeout=OUTAGE_S, what="more epochs")
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))
        proxy.restore()
        wait_for(lambda: fleet.finished(run_id), timeout=300, what="the run to end")
    row = run_row(fleet.engine, run_id)
    assert row.state == ExperimentState.SUCCEEDED, (row.error, fleet.logs())
    assert fleet.epochs(run_id) == EXPECTED_EPOCHS
    store = _store(fleet, s3_env)
    for name in ("report.json", "checkpoints/head.pt", "checkpoints/all.pt"):
        assert store.exists(f"runs/{run_id}/{name}"), name  # type: ignore[attr-defined]
    worker_log = (fleet.tmp / "s3.log").read_text(errors="replace")
    assert "artifact store unreachable" in worker_log
    assert "the artifact store is back after" in worker_log


def test_s3_down_past_the_limit_fails_the_run_and_keeps_its_checkpoints(
    fleet: Fleet, s3_env: S3Endpoint, proxy: CuttableProxy
) -> None:
    extra = _s3_fleet(fleet, s3_env, proxy)
    with ExitStack() as stack:
        stack.enter_context(Dispatcher(fleet.engine, fleet.settings))
        stack.enter_context(fleet.worker("s3", FITFLEET_STORE_OUTAGE_LIMIT_S=str(LIMIT_S), **extra))
        run_id = fleet.submit("s3-gone", head=1, all=20)
        # The head stage ended (its checkpoint uploaded) once an "all" epoch is recorded.
        wait_for(lambda: ("all", 0) in fleet.epochs(run_id), timeout=300, what="the second stage")
        proxy.cut()
        wait_for(lambda: fleet.finished(run_id), timeout=120, what="the run to fail")
        row = run_row(fleet.engine, run_id)
        assert row.state == ExperimentState.FAILED
        assert row.error is not None
        assert f"unreachable for over {LIMIT_S} s" in row.error, row.error
        proxy.restore()
        # What was uploaded before the outage still serves: a new run starts from it.
        follower = fleet.submit(
            "from-the-failed-run", head=1, all=1, pretrained=f"run:{run_id}:head"
        )
        wait_for(lambda: fleet.finished(follower), timeout=300, what="the follower run")
    assert run_row(fleet.engine, follower).state == ExperimentState.SUCCEEDED, fleet.logs()
    assert _store(fleet, s3_env).exists(f"runs/{run_id}/checkpoints/head.pt")  # type: ignore[attr-defined]
