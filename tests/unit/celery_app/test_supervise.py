"""supervise(): exit codes, cancel, SIGKILL after grace, timeout and a stolen lease, on SQLite.

The trainer is stood in for by tiny Python scripts; what matters is that the
outcome is right and that no process of the child's group survives.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, update

from shared.db.models import ExperimentState, SqlExperiment, SqlProject
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from workers.supervise import Outcome, supervise

WORKER = "host:1234"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'fitfleet.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def run_id(engine: Engine) -> str:
    """A run in state running whose lease WORKER holds (what a won claim leaves)."""
    with session_scope(engine) as session:
        session.add(SqlProject(id="pets"))
        session.flush()
        row = SqlExperiment(
            project_id="pets",
            name="pets",
            spec={"resources": {"timeout": "1h"}},
            spec_hash="0" * 64,
            state=ExperimentState.RUNNING,
            attempt=1,
            queue="gpu",
            priority=5,
            arch="resnet34",
            dataset="s3://bucket/pets",
            lease_owner=WORKER,
            lease_expires_at=datetime.now(UTC) + timedelta(seconds=60),
        )
        session.add(row)
        session.flush()
        return row.id


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def run(
    engine: Engine,
    run_id: str,
    command: list[str],
    *,
    timeout_s: float = 60.0,
    poll_s: float = 0.1,
    grace_s: float = 5.0,
    lease_ttl_s: float = 60.0,
) -> Outcome:
    return supervise(
        command,
        experiment_id=run_id,
        worker_id=WORKER,
        engine=engine,
        timeout_s=timeout_s,
        poll_s=poll_s,
        grace_s=grace_s,
        lease_ttl_s=lease_ttl_s,
    )


def assert_group_gone(outcome: Outcome) -> None:
    """No process of the child's group is left (orphans killed, then reaped by init)."""
    # A SIGKILLed orphan is a zombie until init reaps it, and killpg(.., 0)
    # still finds zombies; give init a moment.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.killpg(outcome.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with pytest.raises(ProcessLookupError):
        os.killpg(outcome.pid, 0)


def set_later(engine: Engine, run_id: str, ready: Path, **values: object) -> threading.Thread:
    """Once the child wrote ``ready``, update the run's row (as the API or another worker would)."""

    def target() -> None:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with session_scope(engine) as session:
            session.execute(
                update(SqlExperiment).where(SqlExperiment.id == run_id).values(**values)
            )

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def sleeper(ready: Path, *, ignore_term: bool = False, grandchild: bool = True) -> list[str]:
    """A child that (optionally) starts a grandchild in its group, says ready, and sleeps."""
    lines = ["import signal, subprocess, sys, time, pathlib"]
    if ignore_term:
        lines.append("signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    if grandchild:
        lines.append("subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])")
    lines += [f"pathlib.Path({str(ready)!r}).write_text('x')", "time.sleep(120)"]
    return python("\n".join(lines))


def test_exit_0_succeeds(engine: Engine, run_id: str) -> None:
    outcome = run(engine, run_id, python("raise SystemExit(0)"))
    assert (outcome.state, outcome.error, outcome.exit_code) == (ExperimentState.SUCCEEDED, None, 0)
    assert_group_gone(outcome)


def test_exit_2_fails_as_bad_input(engine: Engine, run_id: str) -> None:
    outcome = run(engine, run_id, python("raise SystemExit(2)"))
    assert outcome.state is ExperimentState.FAILED
    assert outcome.error is not None and "bad input" in outcome.error
    assert outcome.exit_code == 2


def test_other_exit_fails_with_the_code(engine: Engine, run_id: str) -> None:
    outcome = run(engine, run_id, python("raise SystemExit(1)"))
    assert outcome.state is ExperimentState.FAILED
    assert outcome.error == "training failed (exit code 1)"


def test_exit_130_after_cancel_is_cancelled(engine: Engine, run_id: str) -> None:
    with session_scope(engine) as session:
        session.execute(
            update(SqlExperiment).where(SqlExperiment.id == run_id).values(cancel_requested=True)
        )
    # The child notices the cancel first and exits 130 before our first poll.
    outcome = run(engine, run_id, python("raise SystemExit(130)"), poll_s=30.0)
    assert (outcome.state, outcome.exit_code) == (ExperimentState.CANCELLED, 130)


def test_leftover_grandchild_is_killed_when_the_leader_exits(engine: Engine, run_id: str) -> None:
    code = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    )
    outcome = run(engine, run_id, python(code))
    assert outcome.state is ExperimentState.SUCCEEDED
    assert_group_gone(outcome)


def test_cancel_terminates_the_group_quickly(engine: Engine, run_id: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    thread = set_later(engine, run_id, ready, cancel_requested=True)
    outcome = run(engine, run_id, sleeper(ready), poll_s=0.2)
    thread.join()
    assert outcome.state is ExperimentState.CANCELLED
    assert outcome.exit_code == -15  # SIGTERM, not the SIGKILL after grace
    assert_group_gone(outcome)


def test_cancel_latency_is_under_three_seconds(engine: Engine, run_id: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    marks: dict[str, float] = {}

    def cancel() -> None:
        while not ready.exists():
            time.sleep(0.02)
        marks["cancel"] = time.monotonic()
        with session_scope(engine) as session:
            session.execute(
                update(SqlExperiment)
                .where(SqlExperiment.id == run_id)
                .values(cancel_requested=True)
            )

    thread = threading.Thread(target=cancel, daemon=True)
    thread.start()
    outcome = run(engine, run_id, sleeper(ready, grandchild=False), poll_s=1.0)
    stopped = time.monotonic()
    thread.join()
    assert outcome.state is ExperimentState.CANCELLED
    assert stopped - marks["cancel"] < 3.0
    assert_group_gone(outcome)


def test_child_ignoring_sigterm_is_killed_after_grace(
    engine: Engine, run_id: str, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    thread = set_later(engine, run_id, ready, cancel_requested=True)
    started = time.monotonic()
    outcome = run(engine, run_id, sleeper(ready, ignore_term=True), poll_s=0.1, grace_s=1.0)
    elapsed = time.monotonic() - started
    thread.join()
    assert outcome.state is ExperimentState.CANCELLED
    assert outcome.exit_code == -9
    assert 1.0 <= elapsed < 10.0
    assert_group_gone(outcome)


def test_timeout_fails_with_the_reason(engine: Engine, run_id: str, tmp_path: Path) -> None:
    outcome = run(engine, run_id, sleeper(tmp_path / "ready"), timeout_s=1.0)
    assert outcome.state is ExperimentState.FAILED
    assert outcome.error == "timed out after 1 s (resources.timeout)"
    assert_group_gone(outcome)


def test_stolen_lease_stops_the_child_and_changes_nothing(
    engine: Engine, run_id: str, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    thread = set_later(engine, run_id, ready, lease_owner="other:99")
    outcome = run(engine, run_id, sleeper(ready))
    thread.join()
    assert outcome.state is None and outcome.lease_lost
    assert_group_gone(outcome)
    with session_scope(engine) as session:
        row = session.get(SqlExperiment, run_id)
        assert row is not None
        assert (row.state, row.lease_owner) == (ExperimentState.RUNNING, "other:99")


def test_lease_is_renewed_while_the_child_runs(engine: Engine, run_id: str) -> None:
    with session_scope(engine) as session:
        session.execute(
            update(SqlExperiment)
            .where(SqlExperiment.id == run_id)
            .values(lease_expires_at=datetime.now(UTC) + timedelta(seconds=1))
        )
    outcome = run(engine, run_id, python("import time; time.sleep(0.5)"), lease_ttl_s=600.0)
    assert outcome.state is ExperimentState.SUCCEEDED
    with session_scope(engine) as session:
        row = session.get(SqlExperiment, run_id)
        assert row is not None and row.lease_expires_at is not None
        assert row.lease_expires_at > datetime.now(UTC) + timedelta(seconds=500)


def test_unstartable_command_raises(engine: Engine, run_id: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run(engine, run_id, [str(tmp_path / "no-such-trainer")])
