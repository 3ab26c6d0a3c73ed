"""Alembic environment for fitfleet: the database comes from the caller, the schema from the models.

``shared.db.upgrade`` puts either a URL or an open connection into
``config.attributes``; the ``alembic`` command line (through the root
``alembic.ini``) puts neither, and then the URL comes from
``FITFLEET_DATABASE_URL`` via the settings. ``target_metadata`` is the
models' metadata, so ``alembic revision --autogenerate`` and ``alembic check``
compare against the code.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, text

from shared.db import models  # noqa: F401  (importing it puts every table on Base.metadata)
from shared.db.base import Base
from shared.db.session import make_engine, normalize_url
from shared.db.upgrade import CONNECTION_ATTRIBUTE, URL_ATTRIBUTE
from shared.errors import Conflict

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None:
    # Only the `alembic` command line has an ini file (with logging sections);
    # keep loggers the host program already set up.
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = config.attributes.get(URL_ATTRIBUTE)
    if isinstance(url, str) and url:
        return url
    from shared.settings import get_settings

    return get_settings().database_url


def _set_sqlite_foreign_keys(connection: Connection, *, on: bool) -> None:
    # Batch mode rebuilds a SQLite table by copy, drop and rename; with foreign
    # keys on, dropping ``experiments`` would cascade-delete every metric,
    # stage and artifact row. The pragma only takes effect outside a
    # transaction, so it goes to the driver connection before BEGIN.
    driver = connection.connection.driver_connection
    assert driver is not None
    driver.execute(f"PRAGMA foreign_keys = {'ON' if on else 'OFF'}")


def _check_sqlite_foreign_keys(connection: Connection) -> None:
    # With enforcement off during the migration, check once at the end, still
    # inside the transaction, so a migration that orphans rows is rolled back.
    problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if problems:
        raise Conflict(f"migration left rows that break foreign keys: {problems[:10]}")


# Any fixed 64-bit number; every fitfleet process migrating a database takes it.
_POSTGRES_MIGRATION_LOCK = 0x666974666C656574  # b"fitfleet"


def _migrate(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode recreates the table instead.
        render_as_batch=sqlite,
        # Alembic assumes SQLite DDL autocommits and would commit after each
        # step; make_engine emits real BEGINs, so the whole upgrade is one
        # transaction there too (and the foreign-key check below can veto it).
        transactional_ddl=True,
    )
    if sqlite:
        _set_sqlite_foreign_keys(connection, on=False)
    try:
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Several API replicas may run `fitfleet db upgrade` as they
                # start; the second waits here, then finds nothing left to do.
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _POSTGRES_MIGRATION_LOCK}
                )
            context.run_migrations()
            if sqlite:
                _check_sqlite_foreign_keys(connection)
    finally:
        if sqlite:
            _set_sqlite_foreign_keys(connection, on=True)


def run_migrations_offline() -> None:
    """Print the SQL (``alembic upgrade --sql``) for the configured database's dialect."""
    url = normalize_url(_url())
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        compare_type=True,
        render_as_batch=url.get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate through the caller's connection, or open (and close) one from the URL."""
    connection = config.attributes.get(CONNECTION_ATTRIBUTE)
    if isinstance(connection, Connection):
        _migrate(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as own_connection:
            _migrate(own_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
