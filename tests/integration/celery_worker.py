"""A real Celery worker for integration tests, and the Redis it needs.

Both the worker test and the whole-service flow test start one; this is the
one way they do it: a subprocess in its own process group, stopped warm, then
every process of the group killed and checked gone.  Redis unreachable fails
the test (never a skip).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[2]


def unique_queue(prefix: str) -> str:
    """A queue name of this test run only: concurrent runs (CI and a developer) on one
    Redis must never take each other's messages, so nothing is shared and nothing flushed."""
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 10**9}"


def redis_or_fail(url: str) -> str:
    """``url`` if Redis answers there; otherwise the test fails (never a skip)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {url}: {exc}", pytrace=False)
    finally:
        client.close()
    return url


@contextmanager
def celery_worker(
    env: dict[str, str], *, queue: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A workers.celery_entry worker -Q queue`` (prefork, one process) with ``env``."""
    command = [
        sys.executable, "-m", "celery", "-A", "workers.celery_entry", "worker",
        "-Q", queue, "--pool", "prefork", "--concurrency", "1", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Pool processes are in the worker's group: kill stragglers, then check.
        deadline = time.monotonic() + 10
        while True:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "worker processes left behind"
            time.sleep(0.1)
