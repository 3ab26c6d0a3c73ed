"""The declarative base every ``Sql*`` model shares, and the column types they agree on.

Two things here exist for Alembic's sake:

* a naming convention for every constraint and index, so a migration names
  them the same way on SQLite and Postgres and a later migration can drop one
  by name (SQLite would otherwise leave them unnamed and batch mode could not
  find them);
* column types that behave the same on both backends (timestamps always
  timezone-aware UTC, JSON stored as JSONB on Postgres), so the models never
  branch on the dialect.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Integer, MetaData
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator, TypeEngine

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on Postgres (indexable, compact, compared by value); plain JSON text elsewhere.
JsonType: TypeEngine[Any] = JSON().with_variant(JSONB(), "postgresql")

# Surrogate keys for append-heavy tables: 64-bit on Postgres; SQLite only
# auto-increments a column declared exactly INTEGER PRIMARY KEY (already 64-bit there).
BigIntId: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC (the only kind of datetime we store)."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that is timezone-aware UTC in Python on every backend.

    Postgres keeps ``timestamptz`` natively; SQLite has no time zones and would
    hand back naive datetimes, which then compare wrongly against aware ones
    (``lease_expires_at < utcnow()`` raises). Naive input is refused rather than
    guessed at: a naive value is almost always ``datetime.utcnow()`` or local
    time by mistake.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Store UTC; SQLite gets the naive UTC wall time since it cannot keep an offset."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: use an aware UTC datetime (utcnow())")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Read back as aware UTC, whatever the backend returned."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Base of every ORM model; ``Base.metadata`` is what Alembic compares against."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute as is
        datetime: UtcDateTime(),
        dict[str, Any]: JsonType,
        list[str]: JsonType,
    }
