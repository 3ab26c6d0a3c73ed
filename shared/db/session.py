"""Engines and sessions: the one place that knows how each database URL is opened.

Nothing is built at import time: callers make an engine from a URL (usually
``get_settings().database_url``) and open sessions with :func:`session_scope`,
which commits or rolls back and turns SQLAlchemy's errors into fitfleet's
(:class:`~shared.errors.BackendUnavailable` is worth a retry,
:class:`~shared.errors.Conflict` is not).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from shared.errors import BackendUnavailable, ConfigError, Conflict

logger = logging.getLogger(__name__)

POSTGRES_DRIVER = "postgresql+psycopg"
SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10


KNOWN_URLS = "sqlite:///path/to/file.db, sqlite:// (in memory), postgresql+psycopg://..."


def normalize_url(url: str) -> URL:
    """Parse ``url``, mapping ``postgres://`` and ``postgresql://`` to the psycopg 3 driver.

    Hosting providers hand out ``postgres://`` URLs, which SQLAlchemy no longer
    accepts, and a bare ``postgresql://`` would pick psycopg2, which we do not
    install.

    Raises:
        ConfigError: the URL cannot be parsed or names a database fitfleet does
            not support (the migrations and upserts know SQLite and Postgres).
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"cannot parse database URL; expected one of {KNOWN_URLS}") from exc
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername=POSTGRES_DRIVER)
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"unsupported database {parsed.drivername!r}; expected one of {KNOWN_URLS}"
        )
    return parsed


def _is_memory_sqlite(url: URL) -> bool:
    database = url.database or ""
    return database in ("", ":memory:") or url.query.get("mode") == "memory"


#: Postgres connections a process keeps open, and how many more it may open
#: under a burst. With the API's 2 processes, a dispatcher and a few workers
#: this stays well under Postgres's default 100 connections.
POOL_SIZE = 15
POOL_OVERFLOW = 10


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine for ``url`` set up for how fitfleet uses that backend.

    SQLite: foreign keys on (SQLite ignores them otherwise), a busy timeout so
    the API, dispatcher and worker processes wait for each other's writes
    instead of failing, WAL for files (readers no longer block the writer),
    ``check_same_thread=False`` for threaded servers, real ``BEGIN`` statements
    (see :func:`_install_sqlite_transactions`), and one shared connection for
    an in-memory database so every session sees the same tables. The parent
    folder of a database file is created, so the embedded default works on a
    fresh machine.

    Postgres: psycopg 3, ``pool_pre_ping`` (connections dropped by a restart or
    a proxy are replaced, not handed out), a connect timeout so an
    unreachable server fails fast as :class:`BackendUnavailable`, and a pool
    that keeps :data:`POOL_SIZE` connections open: SQLAlchemy's default of 5
    made a busy API open and close a connection (a Postgres backend fork)
    for most requests.
    """
    parsed = normalize_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False}
        memory = _is_memory_sqlite(parsed)
        if memory:
            kwargs["poolclass"] = StaticPool
        elif parsed.database:
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, **kwargs)
        _install_sqlite_transactions(engine, wal=not memory)
        return engine
    kwargs["pool_pre_ping"] = True
    kwargs["pool_size"] = POOL_SIZE
    kwargs["max_overflow"] = POOL_OVERFLOW
    kwargs["connect_args"] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
    return create_engine(parsed, **kwargs)


def _install_sqlite_transactions(engine: Engine, *, wal: bool) -> None:
    """Per-connection pragmas, and SQLAlchemy (not the sqlite3 module) emitting BEGIN.

    Python's sqlite3 (before 3.16) only opens a transaction before INSERT,
    UPDATE or DELETE, so SELECTs are not repeatable, SAVEPOINTs escape the
    enclosing transaction and DDL autocommits (a failed migration would be
    left half-applied). SQLAlchemy's documented fix: turn the module's
    handling off and emit BEGIN on every transaction start.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if wal:
                cursor.execute("PRAGMA journal_mode = WAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")


def _first_line(exc: SQLAlchemyError) -> str:
    # The driver's own message, without SQLAlchemy's statement dump and
    # parameters (which may hold a spec or a token hash).
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise SQLAlchemy's errors as fitfleet's, chained ``from`` the original.

    ``OperationalError`` (server down, connection lost, SQLite locked) and a
    pool timeout become :class:`BackendUnavailable`; ``IntegrityError`` (a
    unique, foreign-key or check constraint) becomes :class:`Conflict`.
    Anything else passes through unchanged.
    """
    try:
        yield
    except IntegrityError as exc:
        raise Conflict(_first_line(exc)) from exc
    except (OperationalError, PoolTimeoutError) as exc:
        raise BackendUnavailable(f"database unavailable: {_first_line(exc)}") from exc


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises.

    Objects stay readable after the commit (``expire_on_commit=False``) so a
    caller can convert them to pydantic models without another round trip.
    Database errors raised in the block or by the commit are translated by
    :func:`translate_errors`.
    """
    session = Session(engine, expire_on_commit=False)
    try:
        with translate_errors():
            try:
                yield session
                session.commit()
            except BaseException:
                _rollback_quietly(session)
                raise
    finally:
        session.close()


def _rollback_quietly(session: Session) -> None:
    # A rollback on a dead connection can fail too; the error that got us
    # here is the one worth reporting.
    try:
        session.rollback()
    except SQLAlchemyError:
        logger.warning("rollback failed after an error", exc_info=True)
