"""The schema on a real Postgres: migrations round-trip and agree with the models.

Each test session creates its own database ``fitfleet_test_<random>`` on the
server named by ``FITFLEET_TEST_POSTGRES_URL`` (default: the local CI server)
and drops it at the end. An unreachable server fails these tests; it never
skips them.
"""

from __future__ import annotations

import math
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from psycopg import sql
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError

from shared.db.base import Base
from shared.db.metrics import upsert_epoch_metric
from shared.db.models import SqlEpochMetric, SqlExperiment, SqlOutbox, SqlProject
from shared.db.session import make_engine, normalize_url, session_scope
from shared.db.upgrade import current, downgrade, head_revision, upgrade
from shared.errors import Conflict
from shared.results import EpochRow

pytestmark = pytest.mark.integration

ADMIN_URL = os.environ.get(
    "FITFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)

TABLES = set(Base.metadata.tables)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, empty database for this test session, dropped afterwards."""
    admin = normalize_url(ADMIN_URL).set(drivername="postgresql")
    admin_dsn = admin.render_as_string(hide_password=False)
    name = f"fitfleet_test_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.OperationalError as exc:
        pytest.fail(f"Postgres is not reachable at {admin!r}: {exc}", pytrace=False)
    try:
        yield normalize_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    """An engine on the session database at head; rows are removed after each test."""
    upgrade(pg_url)
    engine = make_engine(pg_url)
    yield engine
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE projects, api_tokens, workers CASCADE"))
    engine.dispose()


def add_experiment(engine: Engine, **overrides: Any) -> str:
    with session_scope(engine) as session:
        if session.get(SqlProject, "pets") is None:
            session.add(SqlProject(id="pets"))
        values: dict[str, Any] = {
            "project_id": "pets",
            "name": "pets",
            "spec": {"name": "pets", "stages": [{"name": "stage-1", "epochs": 1}], "x": None},
            "spec_hash": "0" * 64,
            "queue": "gpu",
            "priority": 5,
            "arch": "resnet34",
            "dataset": "s3://bucket/pets",
        }
        values.update(overrides)
        experiment = SqlExperiment(**values)
        session.add(experiment)
        session.flush()
        return experiment.id


def epoch_row(epoch: int, valid_loss: float) -> EpochRow:
    return EpochRow(
        stage="stage-1",
        epoch=epoch,
        train_loss=0.7,
        valid_loss=valid_loss,
        metrics={"error_rate": 0.1},
        seconds=3.0,
        images_per_second=1000.0,
        lr=1e-3,
    )


def test_upgrade_downgrade_upgrade(pg_url: str) -> None:
    upgrade(pg_url)
    assert current(pg_url) == head_revision()
    downgrade(pg_url, "base")
    engine = make_engine(pg_url)
    try:
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        assert current(pg_url) is None
        upgrade(pg_url)
        assert set(inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
        assert current(pg_url) == head_revision()
    finally:
        engine.dispose()


def test_concurrent_upgrades_wait_for_each_other(pg_url: str) -> None:
    """Replicas starting together all run the upgrade; one does the work, none fails.

    Separate processes, as replicas are: Alembic's ``context`` is process-global,
    so threads cannot migrate concurrently in any case.
    """
    downgrade(pg_url, "base")
    script = "import sys; from shared.db.upgrade import upgrade; upgrade(sys.argv[1])"
    root = Path(__file__).resolve().parents[3]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, pg_url],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    assert current(pg_url) == head_revision()


def test_migrations_match_the_models(engine: Engine) -> None:
    """`alembic check`: autogenerate finds nothing to add, drop or retype."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_postgres_gets_jsonb_timestamptz_checks_and_the_partial_index(engine: Engine) -> None:
    inspector = inspect(engine)
    columns = {c["name"]: c["type"] for c in inspector.get_columns("experiments")}
    assert isinstance(columns["spec"], JSONB)
    assert getattr(columns["created_at"], "timezone", False) is True
    checks = {c["name"] for c in inspector.get_check_constraints("experiments")}
    assert "ck_experiments_state" in checks
    unsent = {i["name"]: i for i in inspector.get_indexes("outbox")}["ix_outbox_unsent"]
    assert "sent_at IS NULL" in str(unsent.get("dialect_options", {}).get("postgresql_where"))


def test_resumed_epoch_overwrites_instead_of_duplicating(engine: Engine) -> None:
    experiment_id = add_experiment(engine)
    with session_scope(engine) as session:
        upsert_epoch_metric(session, experiment_id, epoch_row(0, 0.9), attempt=1)
        upsert_epoch_metric(session, experiment_id, epoch_row(1, 0.8), attempt=1)
    with session_scope(engine) as session:
        upsert_epoch_metric(session, experiment_id, epoch_row(1, 0.6), attempt=2)
    with session_scope(engine) as session:
        rows = session.scalars(select(SqlEpochMetric).order_by(SqlEpochMetric.epoch)).all()
        assert [(r.epoch, r.valid_loss, r.attempt) for r in rows] == [(0, 0.9, 1), (1, 0.6, 2)]


def test_non_finite_metrics_do_not_break_jsonb(engine: Engine) -> None:
    experiment_id = add_experiment(engine)
    row = epoch_row(0, math.nan).model_copy(update={"metrics": {"error_rate": math.nan}})
    with session_scope(engine) as session:
        upsert_epoch_metric(session, experiment_id, row)
    with session_scope(engine) as session:
        stored = session.get_one(SqlEpochMetric, (experiment_id, "stage-1", 0))
        assert stored.valid_loss is None
        assert stored.metrics == {"error_rate": None}


def test_json_and_times_round_trip(engine: Engine) -> None:
    experiment_id = add_experiment(engine, tags=["a", "b"])
    with session_scope(engine) as session:
        loaded = session.get_one(SqlExperiment, experiment_id)
        assert loaded.spec["stages"] == [{"name": "stage-1", "epochs": 1}]
        assert loaded.spec["x"] is None
        assert loaded.tags == ["a", "b"]
        assert loaded.created_at.tzinfo is UTC


def test_duplicate_idempotency_key_is_a_conflict_and_rolls_back_the_outbox(
    engine: Engine,
) -> None:
    def submit() -> None:
        experiment_id = add_experiment(engine, idempotency_key="once")
        with session_scope(engine) as session:
            session.add(
                SqlOutbox(
                    experiment_id=experiment_id,
                    task="workers.train_run",
                    queue="gpu",
                    priority=5,
                    payload={"experiment_id": experiment_id},
                )
            )

    submit()
    with pytest.raises(Conflict) as caught:
        submit()
    assert isinstance(caught.value.__cause__, IntegrityError)
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(SqlOutbox)) == 1


def test_dispatcher_can_claim_unsent_rows_with_skip_locked(engine: Engine) -> None:
    """Two dispatchers never publish the same outbox row."""
    experiment_id = add_experiment(engine)
    with session_scope(engine) as session:
        session.add_all(
            [
                SqlOutbox(experiment_id=experiment_id, task="t", queue="gpu", priority=p)
                for p in (5, 1)
            ]
        )
    unsent = (
        select(SqlOutbox)
        .where(SqlOutbox.sent_at.is_(None))
        .order_by(SqlOutbox.priority, SqlOutbox.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    with session_scope(engine) as first, session_scope(engine) as second:
        claimed_first = first.scalars(unsent).one()
        claimed_second = second.scalars(unsent).one()
        assert (claimed_first.priority, claimed_second.priority) == (1, 5)
