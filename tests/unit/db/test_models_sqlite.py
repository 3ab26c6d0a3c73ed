"""The schema on SQLite: migrations round-trip, constraints hold, errors are fitfleet's."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError
from sqlalchemy.orm import Session

from shared.db.base import Base, utcnow
from shared.db.metrics import replace_lr_find_points, upsert_epoch_metric
from shared.db.models import (
    ExperimentState,
    SqlApiToken,
    SqlArtifact,
    SqlEpochMetric,
    SqlEvent,
    SqlExperiment,
    SqlLrFindPoint,
    SqlOutbox,
    SqlProject,
    SqlStage,
    SqlWorker,
    WorkerState,
    hash_token,
)
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import current, downgrade, ensure_current, head_revision, upgrade
from shared.errors import BackendUnavailable, ConfigError, Conflict
from shared.results import EpochRow, LrFindResult
from shared.settings import Settings

TABLES = {
    "projects",
    "api_tokens",
    "experiments",
    "stages",
    "epoch_metrics",
    "lr_find_points",
    "artifacts",
    "events",
    "workers",
    "outbox",
    "sweeps",
    "run_metrics",
}

SPEC: dict[str, Any] = {
    "version": 1,
    "name": "pets",
    "data": {"source": "s3://bucket/pets", "size": [224, 224], "normalize": "imagenet"},
    "model": {"arch": "resnet34", "pretrained": "imagenet"},
    "stages": [{"name": "stage-1", "epochs": 4, "max_lr": 0.003, "lr_find": True}],
    "resources": {"queue": "gpu", "priority": 5},
    "note": None,
    "ratio": 0.25,
}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'fitfleet.db'}"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    upgrade(db_url)
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def add_experiment(session: Session, project: str = "pets", **overrides: Any) -> SqlExperiment:
    """A queued experiment in ``project`` (created if missing), flushed so it has an id."""
    if session.get(SqlProject, project) is None:
        session.add(SqlProject(id=project))
    values: dict[str, Any] = {
        "project_id": project,
        "name": "pets",
        "spec": SPEC,
        "spec_hash": "0" * 64,
        "queue": "gpu",
        "priority": 5,
        "arch": "resnet34",
        "dataset": "s3://bucket/pets",
        "tags": ["baseline", "fastai-lesson-1"],
    }
    values.update(overrides)
    experiment = SqlExperiment(**values)
    session.add(experiment)
    session.flush()
    return experiment


def epoch_row(epoch: int, *, valid_loss: float = 0.5, stage: str = "stage-1") -> EpochRow:
    return EpochRow(
        stage=stage,
        epoch=epoch,
        train_loss=0.7,
        valid_loss=valid_loss,
        metrics={"error_rate": 0.1},
        seconds=12.5,
        images_per_second=900.0,
        lr=1e-3,
        batch_size=64,
    )


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


# --------------------------------------------------------------------------- migrations


def test_upgrade_creates_every_table_at_head(db_url: str, engine: Engine) -> None:
    assert table_names(engine) == TABLES
    assert set(Base.metadata.tables) == TABLES
    assert current(db_url) == head_revision() == "0002"


def test_migrations_match_the_models(engine: Engine) -> None:
    """What `alembic check` does: a migrated database and the models have no differences."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_downgrade_to_base_leaves_no_tables_then_upgrades_again(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with session_scope(engine) as session:
            add_experiment(session)

        downgrade(db_url, "base")
        assert table_names(engine) == set()
        assert current(db_url) is None

        upgrade(db_url)
        assert table_names(engine) == TABLES
        assert current(db_url) == head_revision()
        with session_scope(engine) as session:
            assert session.scalar(select(func.count()).select_from(SqlExperiment)) == 0
    finally:
        engine.dispose()


def test_unknown_revision_is_a_config_error(db_url: str) -> None:
    upgrade(db_url)
    with pytest.raises(ConfigError, match="migration failed"):
        downgrade(db_url, "nonsense")


def test_ensure_current_refuses_an_unmigrated_database(db_url: str) -> None:
    with pytest.raises(ConfigError, match="fitfleet db upgrade"):
        ensure_current(db_url)
    upgrade(db_url)
    ensure_current(db_url)


def test_in_memory_engine_is_migrated_in_place_and_shared_across_threads() -> None:
    engine = make_engine("sqlite://")
    try:
        upgrade(engine)
        assert current(engine) == head_revision()
        with engine.connect() as connection:
            # env.py turns foreign keys off while migrating; they must be back on.
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1

        found: list[int | None] = []

        def read_in_thread() -> None:
            with session_scope(engine) as session:
                found.append(session.scalar(select(func.count()).select_from(SqlExperiment)))

        with session_scope(engine) as session:
            add_experiment(session)
        thread = threading.Thread(target=read_in_thread)
        thread.start()
        thread.join()
        assert found == [1]
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- rows


def test_experiment_round_trip_keeps_json_enums_and_utc_times(engine: Engine) -> None:
    with session_scope(engine) as session:
        token = SqlApiToken(
            name="alice", token_hash=hash_token("s3cret"), prefix="s3cr", project_id=None
        )
        token.is_admin = True
        session.add(token)
        session.flush()
        experiment = add_experiment(session, submitted_by=token.id, idempotency_key="k1")
        experiment_id = experiment.id

    with session_scope(engine) as session:
        loaded = session.get_one(SqlExperiment, experiment_id)
        assert experiment_id.startswith("exp_") and len(experiment_id) == 16
        assert loaded.spec == SPEC
        assert loaded.tags == ["baseline", "fastai-lesson-1"]
        assert loaded.state is ExperimentState.QUEUED
        assert loaded.attempt == 0 and loaded.cancel_requested is False
        assert loaded.created_at.tzinfo is UTC
        assert abs(loaded.created_at - utcnow()) < timedelta(minutes=1)
        assert loaded.project.id == "pets"
        stored = session.execute(text("SELECT state FROM experiments")).scalar_one()
        assert stored == "queued"  # the enum's value, not its Python name
        assert session.get_one(SqlApiToken, token.id).token_hash == hash_token("s3cret")


def test_times_compare_correctly_after_a_round_trip(engine: Engine) -> None:
    """SQLite keeps no offset; what comes back must still be the same instant, in UTC."""
    expires = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    in_paris = expires.astimezone(ZoneInfo("Europe/Paris"))
    with session_scope(engine) as session:
        add_experiment(session, lease_owner="w1", lease_expires_at=in_paris)
    with session_scope(engine) as session:
        expired = session.scalars(
            select(SqlExperiment.lease_expires_at).where(
                SqlExperiment.lease_expires_at < expires + timedelta(seconds=1)
            )
        ).all()
        assert expired == [expires]


def test_naive_datetimes_are_refused(engine: Engine) -> None:
    with pytest.raises(StatementError, match="naive datetime"), session_scope(engine) as session:
        add_experiment(session, started_at=datetime(2030, 1, 1))


def test_every_table_takes_a_row(engine: Engine) -> None:
    with session_scope(engine) as session:
        experiment = add_experiment(session)
        session.add_all(
            [
                SqlStage(
                    experiment_id=experiment.id,
                    name="stage-1",
                    position=0,
                    train="head",
                    epochs=4,
                    schedule="one_cycle",
                    lrs=[0.003],
                ),
                SqlArtifact(
                    experiment_id=experiment.id,
                    kind="checkpoint",
                    name="checkpoints/stage-1.pt",
                    uri="file:///tmp/a.pt",
                    bytes=123,
                    sha256="a" * 64,
                ),
                SqlEvent(experiment_id=experiment.id, kind="queued", data={"by": "alice"}),
                SqlEvent(kind="worker_lost", actor="system"),
                SqlWorker(
                    id="celery@gpu-1",
                    hostname="gpu-1",
                    queues=["gpu"],
                    gpus=8,
                    versions={"torch": "2.4"},
                    current_experiment_id=experiment.id,
                ),
                SqlOutbox(
                    experiment_id=experiment.id,
                    task="workers.train_run",
                    queue="gpu",
                    priority=5,
                    payload={"experiment_id": experiment.id},
                ),
            ]
        )
        experiment_id = experiment.id
    with session_scope(engine) as session:
        loaded = session.get_one(SqlExperiment, experiment_id)
        assert [s.name for s in loaded.stages] == ["stage-1"]
        assert loaded.stages[0].lrs == [0.003]
        assert [a.name for a in loaded.artifacts] == ["checkpoints/stage-1.pt"]
        assert session.get_one(SqlWorker, "celery@gpu-1").state is WorkerState.IDLE
        unsent = session.scalars(
            select(SqlOutbox).where(SqlOutbox.sent_at.is_(None)).order_by(SqlOutbox.id)
        ).all()
        assert [o.payload for o in unsent] == [{"experiment_id": experiment_id}]


# --------------------------------------------------------------------------- constraints


def test_duplicate_epoch_is_a_conflict(engine: Engine) -> None:
    with session_scope(engine) as session:
        experiment_id = add_experiment(session).id
    row: dict[str, Any] = {
        "experiment_id": experiment_id,
        "stage": "stage-1",
        "epoch": 0,
        "seconds": 1.0,
        "images_per_second": 1.0,
        "lr": 1e-3,
    }
    with session_scope(engine) as session:
        session.add(SqlEpochMetric(**row))
    with pytest.raises(Conflict) as caught, session_scope(engine) as session:
        session.add(SqlEpochMetric(**row))
    assert isinstance(caught.value.__cause__, IntegrityError)


def test_idempotency_key_conflict_rolls_back_the_outbox_row_too(engine: Engine) -> None:
    """The transactional outbox: the run and its message commit together or not at all."""

    def submit(key: str, project: str = "pets") -> None:
        with session_scope(engine) as session:
            experiment = add_experiment(session, project=project, idempotency_key=key)
            session.add(
                SqlOutbox(
                    experiment_id=experiment.id,
                    task="workers.train_run",
                    queue="gpu",
                    priority=5,
                    payload={"experiment_id": experiment.id},
                )
            )

    submit("retry-me")
    with pytest.raises(Conflict):
        submit("retry-me")
    submit("retry-me", project="other")  # unique per project only
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(SqlOutbox)) == 2
        assert session.scalar(select(func.count()).select_from(SqlExperiment)) == 2


def test_foreign_keys_are_enforced(engine: Engine) -> None:
    with pytest.raises(Conflict), session_scope(engine) as session:
        upsert_epoch_metric(session, "exp_doesnotexist", epoch_row(0))


def test_state_check_constraint_rejects_unknown_states(engine: Engine) -> None:
    with session_scope(engine) as session:
        add_experiment(session)
    with pytest.raises(Conflict), session_scope(engine) as session:
        session.execute(text("UPDATE experiments SET state = 'paused'"))


def test_deleting_an_experiment_deletes_its_results(engine: Engine) -> None:
    with session_scope(engine) as session:
        experiment_id = add_experiment(session).id
        upsert_epoch_metric(session, experiment_id, epoch_row(0))
        session.add(SqlEvent(experiment_id=experiment_id, kind="queued"))
    with session_scope(engine) as session:
        session.delete(session.get_one(SqlExperiment, experiment_id))
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(SqlEpochMetric)) == 0
        assert session.scalar(select(func.count()).select_from(SqlEvent)) == 0


def test_admin_is_the_only_token_without_a_project(engine: Engine) -> None:
    with pytest.raises(Conflict), session_scope(engine) as session:
        session.add(SqlApiToken(token_hash=hash_token("x"), prefix="x", project_id=None))


# --------------------------------------------------------------------------- upserts


def test_resumed_epoch_overwrites_instead_of_duplicating(engine: Engine) -> None:
    with session_scope(engine) as session:
        experiment_id = add_experiment(session).id
        upsert_epoch_metric(session, experiment_id, epoch_row(0, valid_loss=0.9), attempt=1)
        upsert_epoch_metric(session, experiment_id, epoch_row(1, valid_loss=0.8), attempt=1)
    with session_scope(engine) as session:
        upsert_epoch_metric(session, experiment_id, epoch_row(1, valid_loss=0.6), attempt=2)

    with session_scope(engine) as session:
        rows = session.scalars(select(SqlEpochMetric).order_by(SqlEpochMetric.epoch)).all()
        assert [(r.epoch, r.valid_loss, r.attempt) for r in rows] == [(0, 0.9, 1), (1, 0.6, 2)]
        assert rows[1].metrics == {"error_rate": 0.1}
        assert rows[1].recorded_at.tzinfo is UTC


def test_non_finite_values_are_stored_as_null(engine: Engine) -> None:
    row = epoch_row(0).model_copy(
        update={"train_loss": math.nan, "metrics": {"error_rate": math.inf, "accuracy": 0.5}}
    )
    with session_scope(engine) as session:
        experiment_id = add_experiment(session).id
        upsert_epoch_metric(session, experiment_id, row)
    with session_scope(engine) as session:
        stored = session.get_one(SqlEpochMetric, (experiment_id, "stage-1", 0))
        assert stored.train_loss is None
        assert stored.metrics == {"error_rate": None, "accuracy": 0.5}


def test_lr_find_rerun_replaces_the_whole_curve(engine: Engine) -> None:
    def result(n: int) -> LrFindResult:
        return LrFindResult(
            stage="stage-1",
            lrs=[1e-7 * 10**i for i in range(n)],
            losses=[1.0 / (i + 1) for i in range(n)],
            suggestion=1e-3,
            suggest_method="steep",
            min_loss_lr_div10=1e-4,
            stopped_early=False,
        )

    with session_scope(engine) as session:
        experiment_id = add_experiment(session).id
        replace_lr_find_points(session, experiment_id, result(6))
    with session_scope(engine) as session:
        replace_lr_find_points(session, experiment_id, result(4))
    with session_scope(engine) as session:
        steps = session.scalars(select(SqlLrFindPoint.step).order_by(SqlLrFindPoint.step)).all()
        assert steps == [0, 1, 2, 3]


# --------------------------------------------------------------------------- engines and errors


def test_unreachable_sqlite_file_is_backend_unavailable(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}")  # a directory: SQLite cannot open it
    try:
        with pytest.raises(BackendUnavailable) as caught, session_scope(engine) as session:
            session.execute(text("SELECT 1"))
        assert isinstance(caught.value.__cause__, OperationalError)
    finally:
        engine.dispose()


def test_unreachable_postgres_is_backend_unavailable() -> None:
    engine = make_engine("postgresql://postgres@127.0.0.1:1/nothing")
    try:
        with pytest.raises(BackendUnavailable), session_scope(engine) as session:
            session.execute(text("SELECT 1"))
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u:p%40ss@db:5432/fitfleet",
        "postgresql://u:p%40ss@db:5432/fitfleet",
        "postgresql+psycopg://u:p%40ss@db:5432/fitfleet",
    ],
)
def test_postgres_urls_use_psycopg3(url: str) -> None:
    engine = make_engine(url)
    try:
        assert engine.url.drivername == "postgresql+psycopg"
        assert engine.url.password == "p@ss"
    finally:
        engine.dispose()


@pytest.mark.parametrize("url", ["mysql://db/fitfleet", "not a url"])
def test_unsupported_database_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="postgresql"):
        make_engine(url)


def test_other_errors_roll_back_and_pass_through(engine: Engine) -> None:
    def add_then_fail() -> None:
        with session_scope(engine) as session:
            add_experiment(session)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        add_then_fail()
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(SqlExperiment)) == 0


def test_default_database_is_sqlite_in_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FITFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FITFLEET_DATABASE_URL", raising=False)
    assert Settings().database_url == f"sqlite:///{tmp_path / 'home' / 'fitfleet.db'}"
    monkeypatch.setenv("FITFLEET_DATABASE_URL", "postgresql://db/fitfleet")
    assert Settings().database_url == "postgresql://db/fitfleet"
