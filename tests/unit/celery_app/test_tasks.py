"""The Celery app config, the train task run in-process, and ``dispatch --once``, with no servers.

The task function is called directly (no worker): on SQLite with a stand-in
trainer it must claim, supervise, release, and refuse a duplicate delivery.
``dispatch --once`` publishes through the embedded ``filesystem://`` broker.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, select

from shared.celery import REDIS_VISIBILITY_TIMEOUT_S, make_celery
from shared.db.models import ExperimentState, SqlExperiment, SqlOutbox
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from shared.runs import TRAIN_TASK
from shared.settings import Settings, get_settings
from tests.rows import add_queued_run
from workers import tasks
from workers.cli import dispatch, worker_argv


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """FITFLEET_HOME in tmp_path (so the SQLite file and broker folders live there)."""
    home = tmp_path / "home"
    monkeypatch.setenv("FITFLEET_HOME", str(home))
    for name in ("FITFLEET_DATABASE_URL", "FITFLEET_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()
    tasks._engine(get_settings().database_url).dispose()
    tasks._engine.cache_clear()


@pytest.fixture
def engine(env: Path) -> Iterator[Engine]:
    url = get_settings().database_url
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def submit(engine: Engine) -> str:
    with session_scope(engine) as session:
        return add_queued_run(session, spec={"resources": {"timeout": "5m"}})


def read(engine: Engine, run_id: str) -> SqlExperiment:
    with session_scope(engine) as session:
        row = session.get(SqlExperiment, run_id)
        assert row is not None
        return row


def use_child(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    monkeypatch.setenv("FITFLEET_WORKER_CHILD_COMMAND", json.dumps([sys.executable, "-c", code]))
    monkeypatch.setenv("FITFLEET_WORKER_POLL_S", "0.1")
    get_settings.cache_clear()


def test_make_celery_embedded_default_uses_filesystem_folders_under_home(tmp_path: Path) -> None:
    app = make_celery(Settings(home=tmp_path))
    try:
        conf = app.conf
        assert conf.broker_url == "filesystem://"
        options = conf.broker_transport_options
        assert options["data_folder_in"] == options["data_folder_out"]
        assert Path(options["data_folder_in"]).is_dir()
        assert Path(options["processed_folder"]).is_dir()
        assert Path(options["data_folder_in"]).is_relative_to(tmp_path)
        assert conf.task_acks_late is True
        assert conf.task_reject_on_worker_lost is True
        assert conf.worker_prefetch_multiplier == 1
        assert conf.task_ignore_result is True
        assert conf.task_default_queue == "gpu"
        assert conf.task_serializer == "json"
        assert list(conf.accept_content) == ["json"]
    finally:
        app.close()


def test_make_celery_redis_visibility_timeout_outlasts_runs(tmp_path: Path) -> None:
    app = make_celery(Settings(home=tmp_path, broker_url="redis://127.0.0.1:6379/0"))
    try:
        timeout = app.conf.broker_transport_options["visibility_timeout"]
        assert timeout == REDIS_VISIBILITY_TIMEOUT_S >= 7 * 24 * 3600
    finally:
        app.close()


def test_child_command_default_and_override(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    assert tasks.child_command(settings, "exp_1", "h:1") == [
        sys.executable,
        "-m",
        "workers.run_job",
        "exp_1",
        "--worker-id",
        "h:1",
    ]
    monkeypatch.setenv("FITFLEET_WORKER_CHILD_COMMAND", '["fake", "--flag"]')
    get_settings.cache_clear()
    assert tasks.child_command(get_settings(), "exp_1", "h:1") == [
        "fake",
        "--flag",
        "exp_1",
        "--worker-id",
        "h:1",
    ]


def test_timeout_seconds_reads_the_spec_or_defaults() -> None:
    assert tasks.timeout_seconds({"resources": {"timeout": "90m"}}) == 5400.0
    assert tasks.timeout_seconds({}) == 6 * 3600.0
    assert tasks.timeout_seconds({"resources": {"timeout": "soon"}}) == tasks.DEFAULT_TIMEOUT_S


def test_train_run_succeeds_once_and_refuses_a_duplicate(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_child(monkeypatch, "import sys; assert sys.argv[2] == '--worker-id'")
    run_id = submit(engine)
    tasks.train_run(run_id)
    done = read(engine, run_id)
    assert (done.state, done.attempt, done.lease_owner) == (ExperimentState.SUCCEEDED, 1, None)
    tasks.train_run(run_id)  # a redelivery: claim fails, nothing changes
    again = read(engine, run_id)
    assert (again.state, again.attempt, again.finished_at) == (
        ExperimentState.SUCCEEDED,
        1,
        done.finished_at,
    )


def test_train_run_bad_input_fails_the_run(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    use_child(monkeypatch, "raise SystemExit(2)")
    run_id = submit(engine)
    tasks.train_run(run_id)
    row = read(engine, run_id)
    assert row.state is ExperimentState.FAILED
    assert row.error is not None and "bad input" in row.error


def test_train_run_unstartable_trainer_fails_the_run(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FITFLEET_WORKER_CHILD_COMMAND", json.dumps([str(tmp_path / "nope")]))
    get_settings.cache_clear()
    run_id = submit(engine)
    tasks.train_run(run_id)
    row = read(engine, run_id)
    assert row.state is ExperimentState.FAILED
    assert row.error is not None and row.error.startswith("could not start the trainer")


def test_task_is_registered_under_the_contract_name(env: Path) -> None:
    from workers.celery_entry import app

    assert TRAIN_TASK in app.tasks
    assert app.tasks[TRAIN_TASK].acks_late is True


def test_worker_argv_uses_prefork() -> None:
    argv = worker_argv("gpu,cpu", 2)
    assert argv[:1] == ["worker"]
    assert argv[argv.index("--pool") + 1] == "prefork"
    assert argv[argv.index("--queues") + 1] == "gpu,cpu"
    assert argv[argv.index("--concurrency") + 1] == "2"


def test_dispatch_once_publishes_through_the_filesystem_broker(engine: Engine, env: Path) -> None:
    run_id = submit(engine)
    result = CliRunner().invoke(dispatch, ["--once"])
    assert result.exit_code == 0, result.output
    assert read(engine, run_id).state is ExperimentState.DISPATCHED
    with session_scope(engine) as session:
        sent = session.scalars(select(SqlOutbox.sent_at)).all()
    assert len(sent) == 1 and sent[0] is not None
    messages = list((env / "broker" / "queue").iterdir())
    assert len(messages) == 1
    assert run_id in messages[0].read_text()


def test_train_run_shows_the_fleet_row_busy_with_the_run_then_idle(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime

    from shared import fleet
    from shared.db.models import SqlWorker, WorkerState
    from workers.supervise import Outcome

    monkeypatch.setenv("FITFLEET_WORKER_NAME", "w-test")
    get_settings.cache_clear()
    with session_scope(engine) as session:
        fleet.register_worker(
            session,
            worker_id="w-test",
            hostname="box",
            queues=["gpu"],
            gpus=0,
            gpu_model=None,
            memory_bytes=None,
            versions={},
            now=datetime.now(UTC),
        )
    seen: list[tuple[WorkerState, str | None]] = []

    def fake_supervise(*_args: object, **_kwargs: object) -> Outcome:
        with session_scope(engine) as session:
            row = session.get(SqlWorker, "w-test")
            assert row is not None
            seen.append((row.state, row.current_experiment_id))
        if len(seen) == 2:
            raise RuntimeError("supervisor crashed")
        return Outcome(ExperimentState.SUCCEEDED, None, 0, 1)

    monkeypatch.setattr(tasks, "supervise", fake_supervise)
    first = submit(engine)
    tasks.train_run(first)
    second = submit(engine)
    with pytest.raises(RuntimeError):
        tasks.train_run(second)  # even a crash leaves the row idle (the hook's finally)
    assert seen == [(WorkerState.BUSY, first), (WorkerState.BUSY, second)]
    with session_scope(engine) as session:
        row = session.get(SqlWorker, "w-test")
        assert row is not None
        assert (row.state, row.current_experiment_id) == (WorkerState.IDLE, None)
