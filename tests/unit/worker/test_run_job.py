"""The worker's run job end to end on SQLite + a local store, and its reporter's rules."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

import workers.run_job as run_job_module
import workers.service_reporter as service_reporter
from shared.db.base import utcnow
from shared.db.models import (
    ExperimentState,
    SqlArtifact,
    SqlEpochMetric,
    SqlEvent,
    SqlExperiment,
    SqlProject,
)
from shared.db.session import make_engine, session_scope
from shared.errors import BackendUnavailable
from shared.results import EpochRow, Report
from shared.settings import Settings
from shared.spec_io import dump_spec
from shared.storage.local import LocalStore
from shared.storage.memory import MemoryStore
from shared.storage.registry import open_store
from tests.unit.training.enginekit import tiny_spec
from workers.run_job import run_job
from workers.service_reporter import ServiceReporter, with_retries

REPO = Path(__file__).resolve().parents[3]
WORKER = "worker-1"


@dataclass
class Env:
    """One isolated service: a migrated SQLite file, a local store, settings."""

    settings: Settings
    engine: Engine
    store: LocalStore

    def add_run(self, spec: Any = None, *, attempt: int = 1, cancel: bool = False) -> str:
        """An experiment already claimed by ``WORKER`` (running, live lease)."""
        spec = spec if spec is not None else tiny_spec()
        with session_scope(self.engine) as session:
            if session.get(SqlProject, spec.project) is None:
                session.add(SqlProject(id=spec.project))
            row = SqlExperiment(
                project_id=spec.project,
                name=spec.name,
                spec=dump_spec(spec),
                spec_hash="0" * 64,
                state=ExperimentState.RUNNING,
                attempt=attempt,
                queue=spec.resources.queue,
                priority=spec.resources.priority,
                arch=spec.model.arch,
                dataset=spec.data.source,
                lease_owner=WORKER,
                lease_expires_at=utcnow() + timedelta(hours=1),
                cancel_requested=cancel,
            )
            session.add(row)
            session.flush()
            return row.id

    def set(self, experiment_id: str, **values: Any) -> None:
        with session_scope(self.engine) as session:
            session.execute(
                update(SqlExperiment).where(SqlExperiment.id == experiment_id).values(**values)
            )

    def rows(self, experiment_id: str) -> list[SqlEpochMetric]:
        with session_scope(self.engine) as session:
            return list(
                session.scalars(
                    select(SqlEpochMetric)
                    .where(SqlEpochMetric.experiment_id == experiment_id)
                    .order_by(SqlEpochMetric.stage, SqlEpochMetric.epoch)
                )
            )

    def artifacts(self, experiment_id: str) -> dict[str, SqlArtifact]:
        with session_scope(self.engine) as session:
            found = session.scalars(
                select(SqlArtifact).where(SqlArtifact.experiment_id == experiment_id)
            )
            return {a.name: a for a in found}

    def events(self, experiment_id: str) -> list[SqlEvent]:
        with session_scope(self.engine) as session:
            return list(
                session.scalars(
                    select(SqlEvent)
                    .where(SqlEvent.experiment_id == experiment_id)
                    .order_by(SqlEvent.id)
                )
            )

    def run_dir(self, experiment_id: str) -> Path:
        return self.settings.home / "work" / experiment_id


def make_env(root: Path, digits_root: Path) -> Env:
    from shared.db.upgrade import upgrade

    url = f"sqlite:///{root / 'ff.db'}"
    upgrade(url)
    settings = Settings(
        home=root / "home",
        database_url=url,
        artifacts_url=(root / "store").as_uri(),
        data_roots=[digits_root],
    )
    return Env(settings=settings, engine=make_engine(url), store=LocalStore(root / "store"))


@pytest.fixture
def env(tmp_path: Path, digits_root: Path) -> Iterator[Env]:
    made = make_env(tmp_path, digits_root)
    yield made
    made.engine.dispose()


@pytest.fixture(scope="module")
def finished(
    tmp_path_factory: pytest.TempPathFactory, digits_root: Path
) -> Iterator[tuple[Env, str]]:
    """One uninterrupted run, shared by the tests that only read it."""
    shared_env = make_env(tmp_path_factory.mktemp("finished"), digits_root)
    experiment_id = shared_env.add_run()
    assert run_job(experiment_id, worker_id=WORKER, settings=shared_env.settings) == 0
    yield shared_env, experiment_id
    shared_env.engine.dispose()


def numbers(rows: list[SqlEpochMetric]) -> list[tuple[Any, ...]]:
    return [(r.stage, r.epoch, r.train_loss, r.valid_loss, dict(r.metrics)) for r in rows]


def stop_after(monkeypatch: pytest.MonkeyPatch, env: Env, experiment_id: str, n: int) -> None:
    """Request a cancel in the database after ``n`` batches; poll it on every batch."""
    monkeypatch.setattr(service_reporter, "POLL_INTERVAL_S", 0.0)
    seen = [0]

    def on_batch(self: ServiceReporter, *args: Any) -> None:
        seen[0] += 1
        if seen[0] == n:
            env.set(experiment_id, cancel_requested=True)

    monkeypatch.setattr(ServiceReporter, "on_batch", on_batch)


# --------------------------------------------------------------------- run_job


def test_success_records_epochs_and_artifacts(finished: tuple[Env, str]) -> None:
    env, experiment_id = finished
    run_dir = env.run_dir(experiment_id)
    report = Report.model_validate_json((run_dir / "report.json").read_text())
    assert report.status == "succeeded"
    expected = [
        (r.stage, r.epoch, r.train_loss, r.valid_loss, dict(r.metrics))
        for stage in report.stages
        for r in stage.rows
    ]
    rows = env.rows(experiment_id)
    assert len(rows) == 4
    assert numbers(rows) == expected
    assert {r.attempt for r in rows} == {1}

    artifacts = env.artifacts(experiment_id)
    files = [run_dir / "report.json", *sorted((run_dir / "plots").glob("*.png"))]
    assert len(files) >= 4
    for path in files:
        name = path.relative_to(run_dir).as_posix()
        stored = env.store.get_bytes(f"runs/{experiment_id}/{name}")
        assert stored == path.read_bytes()
        assert artifacts[name].sha256 == hashlib.sha256(stored).hexdigest()
        assert artifacts[name].bytes == len(stored)
    assert artifacts["report.json"].kind == "report"
    assert {"checkpoints/stage-1.pt", "checkpoints/stage-2.pt"} <= set(artifacts)

    with session_scope(env.engine) as session:
        row = session.get(SqlExperiment, experiment_id)
        assert row is not None
        assert (row.current_stage, row.current_epoch) == ("stage-2", 1)
        # The job never ends the run: the supervisor releases it.
        assert row.state == ExperimentState.RUNNING
        # Each stage's outcome is in ``stages`` (the API's lr-find and epoch order read it).
        stages = [(s.name, s.position, s.train, s.epochs, s.lrs, s.kept) for s in row.stages]
        assert stages == [
            (r.name, i, r.train, r.epochs, r.lrs, r.kept) for i, r in enumerate(report.stages)
        ]
        assert all(s.started_at is not None and s.seconds > 0 for s in row.stages)


def test_cancel_requested_stops_with_a_checkpoint(env: Env) -> None:
    experiment_id = env.add_run(cancel=True)
    assert run_job(experiment_id, worker_id=WORKER, settings=env.settings) == 130
    artifacts = env.artifacts(experiment_id)
    assert "checkpoints/stage-1-epoch0.pt" in artifacts
    assert artifacts["checkpoints/latest.json"].kind == "checkpoint"
    assert any(e.kind == "stopped" for e in env.events(experiment_id))


def test_lost_lease_stops(env: Env) -> None:
    experiment_id = env.add_run()
    env.set(experiment_id, lease_owner="someone-else")
    assert run_job(experiment_id, worker_id=WORKER, settings=env.settings) == 130
    stopped = [e for e in env.events(experiment_id) if e.kind == "stopped"]
    assert stopped and "lease lost" in stopped[0].message


def test_resume_on_another_worker_matches_uninterrupted(
    env: Env, monkeypatch: pytest.MonkeyPatch, finished: tuple[Env, str]
) -> None:
    baseline_env, baseline_id = finished
    experiment_id = env.add_run()
    # 9 batches per epoch: stop in stage-2's first epoch, after stage-1's 2 epochs.
    stop_after(monkeypatch, env, experiment_id, 18 + 4)
    assert run_job(experiment_id, worker_id=WORKER, settings=env.settings) == 130
    assert len(env.rows(experiment_id)) == 2

    monkeypatch.undo()
    env.set(experiment_id, cancel_requested=False, attempt=2)
    shutil.rmtree(env.run_dir(experiment_id))  # another worker has an empty disk
    assert run_job(experiment_id, worker_id=WORKER, settings=env.settings) == 0

    rows = env.rows(experiment_id)
    assert numbers(rows) == numbers(baseline_env.rows(baseline_id))
    assert [r.attempt for r in rows] == [1, 1, 2, 2]
    resumed = [e for e in env.events(experiment_id) if e.kind == "resume"]
    assert any("resumed at stage 1" in e.message for e in resumed)


def test_missing_data_source_is_bad_input(env: Env) -> None:
    spec = tiny_spec(
        data={"source": "no-such-folder", "split": {"by": "folder"}, "size": 16},
    )
    experiment_id = env.add_run(spec)
    assert run_job(experiment_id, worker_id=WORKER, settings=env.settings) == 2
    errors = [e for e in env.events(experiment_id) if e.kind == "error"]
    assert len(errors) == 1 and "no-such-folder" in errors[0].message
    assert env.rows(experiment_id) == []


def test_pretrained_run_of_another_project_is_refused(env: Env) -> None:
    first = env.add_run(tiny_spec(project="team-a"))
    spec = tiny_spec(
        project="team-b",
        model={"arch": "resnet18", "pretrained": f"run:{first}", "head": {"lin_ftrs": [64]}},
    )
    experiment_id = env.add_run(spec)
    assert run_job(experiment_id, worker_id=WORKER, settings=env.settings) == 2
    errors = [e for e in env.events(experiment_id) if e.kind == "error"]
    assert errors and f"no run {first!r}" in errors[0].message


def test_pretrained_run_comes_from_the_store(finished: tuple[Env, str]) -> None:
    env, source_id = finished
    spec = tiny_spec(
        model={"arch": "resnet18", "pretrained": f"run:{source_id}", "head": {"lin_ftrs": [64]}},
        stages=[{"name": "tune", "train": "head", "epochs": 1, "max_lr": 1e-3}],
        interpret={"show_batch": None, "top_losses": 2, "confusion_matrix": False},
    )
    experiment_id = env.add_run(spec)
    assert run_job(experiment_id, worker_id=WORKER, settings=env.settings) == 0
    # No stage named: the last stage of the source's stored report.json.
    assert env.settings.cache_dir is not None
    assert (env.settings.cache_dir / "runs" / source_id / "stage-2.pt").is_file()
    (row,) = env.rows(experiment_id)
    baseline = env.rows(source_id)[-1]
    assert row.metrics["accuracy"] >= baseline.metrics["accuracy"] - 0.1


def test_s3_source_is_synced_into_the_cache(
    env: Env, digits_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = MemoryStore()
    for path in sorted((digits_root / "digits").rglob("*")):
        if path.is_file():
            rel = path.relative_to(digits_root / "digits").as_posix()
            bucket.put_file(f"sets/digits/{rel}", path)
    opened: list[str] = []

    def fake_open(url: str, **kw: Any) -> Any:
        if url.startswith("s3://"):
            opened.append(url)
            return bucket
        return open_store(url, **kw)

    monkeypatch.setattr(run_job_module, "open_store", fake_open)
    spec = tiny_spec(
        data={"source": "s3://bucket/sets/digits", "split": {"by": "folder"}, "size": 16},
        stages=[{"name": "only", "train": "head", "epochs": 1, "max_lr": 1e-2}],
        interpret={"show_batch": None, "top_losses": 2, "confusion_matrix": False},
    )
    experiment_id = env.add_run(spec)
    assert run_job(experiment_id, worker_id=WORKER, settings=env.settings) == 0
    assert opened == ["s3://bucket"]
    assert env.settings.cache_dir is not None
    assert len(list(env.settings.cache_dir.iterdir())) == 1
    assert len(env.rows(experiment_id)) == 1


def test_unknown_experiment_is_bad_input(env: Env) -> None:
    assert run_job("exp_missing", worker_id=WORKER, settings=env.settings) == 2


def test_command_line_in_a_subprocess(env: Env, digits_root: Path) -> None:
    spec = tiny_spec(
        stages=[{"name": "only", "train": "head", "epochs": 1, "max_lr": 1e-2}],
        interpret={"show_batch": None, "top_losses": 2, "confusion_matrix": False},
    )
    experiment_id = env.add_run(spec)
    child_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FITFLEET_HOME": str(env.settings.home),
        "FITFLEET_DATABASE_URL": env.settings.database_url,
        "FITFLEET_ARTIFACTS_URL": env.settings.artifacts_url,
        "FITFLEET_DATA_ROOTS": str(digits_root),
    }
    done = subprocess.run(
        [sys.executable, "-m", "workers.run_job", experiment_id, "--worker-id", WORKER],
        env=child_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(env.rows(experiment_id)) == 1
    assert "report.json" in env.artifacts(experiment_id)


# ------------------------------------------------------------- the reporter


def _reporter(env: Env, experiment_id: str, tmp_path: Path, **kw: Any) -> ServiceReporter:
    return ServiceReporter(
        env.engine,
        kw.pop("store", env.store),
        experiment_id=experiment_id,
        run_dir=tmp_path / "run",
        worker_id=WORKER,
        attempt=1,
        **kw,
    )


def test_identical_file_is_not_uploaded_twice(env: Env, tmp_path: Path) -> None:
    experiment_id = env.add_run()
    store = MemoryStore()
    puts: list[str] = []
    original = store.put_file

    def counting_put(key: str, path: Path, *, content_type: str | None = None) -> Any:
        puts.append(key)
        return original(key, path, content_type=content_type)

    store.put_file = counting_put  # type: ignore[method-assign]
    reporter = _reporter(env, experiment_id, tmp_path, store=store)
    report = tmp_path / "run" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text("{}")
    reporter.on_artifact("report", report)
    reporter.on_artifact("report", report)
    assert len(puts) == 1
    report.write_text('{"status": "succeeded"}')
    reporter.on_artifact("report", report)
    assert len(puts) == 2
    (row,) = env.artifacts(experiment_id).values()
    assert row.sha256 == hashlib.sha256(report.read_bytes()).hexdigest()


def test_epoch_replayed_overwrites(env: Env, tmp_path: Path) -> None:
    experiment_id = env.add_run()
    reporter = _reporter(env, experiment_id, tmp_path)
    row = EpochRow(
        stage="s", epoch=0, train_loss=1.0, valid_loss=1.0, metrics={}, seconds=1.0,
        images_per_second=1.0, lr=0.1, batch_size=4,
    )  # fmt: skip
    reporter.on_epoch(row)
    reporter.on_epoch(row.model_copy(update={"valid_loss": 0.5}))
    rows = env.rows(experiment_id)
    assert [(r.epoch, r.valid_loss) for r in rows] == [(0, 0.5)]


def test_should_stop_is_throttled(env: Env, tmp_path: Path) -> None:
    experiment_id = env.add_run()
    tick = [100.0]
    reporter = _reporter(env, experiment_id, tmp_path, clock=lambda: tick[0])
    assert reporter.should_stop() is False
    env.set(experiment_id, cancel_requested=True)
    tick[0] += 1.0
    assert reporter.should_stop() is False  # not asked again yet
    tick[0] += 1.5
    assert reporter.should_stop() is True
    assert reporter.stop_reason == "cancel requested"


def test_retries_then_reraises() -> None:
    calls = [0]
    waits: list[float] = []

    def flaky() -> str:
        calls[0] += 1
        if calls[0] < 3:
            raise BackendUnavailable("down")
        return "ok"

    assert with_retries(flaky, what="x", sleep=waits.append) == "ok"
    assert waits == [0.5, 1.0]

    def down() -> str:
        raise BackendUnavailable("down")

    waits.clear()
    with pytest.raises(BackendUnavailable):
        with_retries(down, what="x", sleep=waits.append)
    assert waits == [0.5, 1.0, 2.0]
