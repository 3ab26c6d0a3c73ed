"""Run the Alembic migrations from Python, without an ``alembic.ini`` in the working directory.

``fitfleet db upgrade``, the deploy prestart step and the tests call these
functions; the Alembic config is built here, pointing at the repository's
``migrations/`` folder, and the database is handed to ``migrations/env.py``
through ``Config.attributes`` (never through the ini options, whose ``%``
interpolation would mangle URL-encoded passwords).

Alembic's ``context`` is process-global: run one migration per process at a
time (separate processes may race; on Postgres they queue on an advisory lock).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Engine

from shared.db.session import make_engine, translate_errors
from shared.errors import ConfigError

# shared/db/upgrade.py -> the repository root -> migrations/
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

# Keys of Config.attributes that migrations/env.py reads.
URL_ATTRIBUTE = "fitfleet_database_url"
CONNECTION_ATTRIBUTE = "connection"

Target = str | Engine


def alembic_config() -> Config:
    """An Alembic config for fitfleet's migrations, built in code."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise ConfigError(f"migrations folder not found at {MIGRATIONS_DIR}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    return config


@contextmanager
def _configured(target: Target) -> Iterator[Config]:
    """A config carrying ``target``: a URL for env.py to open, or a connection from an engine.

    An engine is passed as one of its connections so an in-memory SQLite
    database (one connection, see ``make_engine``) is migrated in place.
    """
    config = alembic_config()
    if isinstance(target, str):
        config.attributes[URL_ATTRIBUTE] = target
        yield config
        return
    with target.connect() as connection:
        config.attributes[CONNECTION_ATTRIBUTE] = connection
        yield config


def upgrade(target: Target, revision: str = "head") -> None:
    """Migrate the database at ``target`` (a URL or an engine) up to ``revision``."""
    with _configured(target) as config, _alembic_errors():
        command.upgrade(config, revision)


def downgrade(target: Target, revision: str) -> None:
    """Migrate the database at ``target`` down to ``revision`` (``base`` drops everything)."""
    with _configured(target) as config, _alembic_errors():
        command.downgrade(config, revision)


def head_revision() -> str:
    """The newest revision the code ships (what ``upgrade`` goes to by default)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise ConfigError(f"no migrations in {MIGRATIONS_DIR}")
    return head


def current(target: Target) -> str | None:
    """The revision the database at ``target`` is at, or None if it was never migrated."""
    engine = make_engine(target) if isinstance(target, str) else target
    try:
        with translate_errors(), engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        if isinstance(target, str):
            engine.dispose()


def ensure_current(target: Target) -> None:
    """Refuse to serve from a database whose schema is not the code's.

    Raises:
        ConfigError: the database is behind (or ahead of) the code, with the
            command that fixes it.
    """
    found, wanted = current(target), head_revision()
    if found != wanted:
        raise ConfigError(
            f"database schema is at revision {found or 'none'}, this code needs {wanted}: "
            "run `fitfleet db upgrade`"
        )


@contextmanager
def _alembic_errors() -> Iterator[None]:
    # Database errors are translated by translate_errors(); Alembic's own
    # (unknown revision, multiple heads) are configuration problems.
    try:
        with translate_errors():
            yield
    except CommandError as exc:
        raise ConfigError(f"migration failed: {exc}") from exc
