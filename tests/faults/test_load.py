"""A light run of ``bench/load.py``: concurrent clients with retries, each run accepted once.

The same code as the benchmark (imported from its file), on real servers: a
fresh Postgres database, the API under uvicorn (2 processes) publishing to
Redis, one real Celery worker whose trainer exits at once, and the dispatcher.
200 submissions from 20 clients, each with its own Idempotency-Key, retried
with the same key on timeouts; then every run must be terminal, none twice in
the database, none lost, none trained twice.

A second case makes the client timeout shorter than the API's answer, so
retries of requests that had in fact committed really happen, and must come
back as replays (200, same id), never as second runs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.integration.celery_worker import redis_or_fail

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "load.py"


def _bench() -> ModuleType:
    module = sys.modules.get("fitfleet_bench_load")
    if module is None:
        spec = importlib.util.spec_from_file_location("fitfleet_bench_load", BENCH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return module


def _check(result: Any, submissions: int) -> None:
    report = result.report()
    assert result.unaccepted == 0, report
    assert result.accepted == submissions, report
    assert result.conflicting_ids == 0, report
    assert result.runs_in_db == submissions, report
    assert result.duplicates == 0, report
    assert result.lost == 0, report
    assert result.trained_twice == 0, report
    assert result.drain_s is not None, report
    assert result.states == {"succeeded": submissions}, report
    assert result.ok, report


def test_light_load_every_submission_accepted_once(tmp_path: Path) -> None:
    bench = _bench()
    redis_or_fail(bench.BROKER_URL)
    result = bench.run_load(submissions=200, clients=20, workers=1, timeout_s=120, workdir=tmp_path)
    _check(result, 200)


def test_retries_after_client_timeouts_are_replays_not_new_runs(tmp_path: Path) -> None:
    bench = _bench()
    redis_or_fail(bench.BROKER_URL)
    # 20 clients on 2 cores: most answers take longer than 30 ms, so many requests
    # time out after the API committed them; their retries must be replays.
    result = bench.run_load(
        submissions=60,
        clients=20,
        workers=1,
        timeout_s=120,
        client_timeout_s=0.03,
        max_attempts=60,
        workdir=tmp_path,
    )
    assert result.retries > 0, result.report()
    assert result.replayed > 0, result.report()
    _check(result, 60)
