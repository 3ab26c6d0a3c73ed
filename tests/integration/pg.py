"""A throwaway, migrated Postgres database for integration tests.

Each user gets ``fitfleet_<prefix>_<random>`` on the server named by
``FITFLEET_TEST_POSTGRES_URL`` (default: the local CI server), migrated to head
and dropped afterwards (``WITH (FORCE)``, so a leaked connection cannot keep it
alive). An unreachable server *fails* the test: a broken environment must never
pass CI by skipping everything.

Use :func:`temporary_database` from a module's own fixture, or import the
session-scoped :func:`postgres_url` fixture through a conftest.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql

from shared.db.session import normalize_url
from shared.db.upgrade import upgrade

ADMIN_URL = os.environ.get(
    "FITFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def _admin_dsn() -> str:
    # psycopg's own DSN (no "+psycopg" driver suffix) for CREATE/DROP DATABASE.
    return (
        normalize_url(ADMIN_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    )


@contextmanager
def temporary_database(prefix: str = "test") -> Iterator[str]:
    """Create and migrate a fresh database, yield its SQLAlchemy URL, then drop it."""
    name = f"fitfleet_{prefix}_{secrets.token_hex(6)}"
    dsn = _admin_dsn()
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.OperationalError as exc:
        shown = normalize_url(ADMIN_URL).render_as_string(hide_password=True)
        pytest.fail(f"Postgres is not reachable at {shown}: {exc}", pytrace=False)
    url = normalize_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated database shared by the whole test session, dropped at the end."""
    with temporary_database("it") as url:
        yield url
