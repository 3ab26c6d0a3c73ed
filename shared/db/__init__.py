"""fitfleet's relational store: models, engines and sessions, migrations, metric writes.

Modules: ``base`` (declarative base, column types), ``models`` (the ``Sql*``
tables), ``session`` (``make_engine``, ``session_scope``), ``upgrade`` (Alembic
from Python), ``metrics`` (upserts for epoch rows and LR-finder curves).
Nothing here is built at import time, and nothing here imports torch or FastAPI.
"""
