"""The dashboard's queries and sweeps on Postgres: the same tests as on SQLite.

Sorting with NULLs last, JSONB tag containment and the sweep's one-transaction
insert are spelled per backend, so each test of tests/unit/api/test_queries.py
runs here again against a fresh Postgres database.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from shared.db.session import make_engine
from tests.integration.pg import temporary_database
from tests.unit.api.test_queries import (  # noqa: F401  (collected here, on Postgres)
    Api,
    make_api,
    test_a_bad_sweep_creates_nothing_and_names_the_field,
    test_a_grid_sweep_makes_every_combination_and_compares_per_sweep,
    test_a_random_sweep_draws_count_trials_reproducibly,
    test_a_resumed_epoch_rewrites_the_summary,
    test_datasets_list_runs_and_metrics,
    test_events_follow_after_an_id,
    test_failures_grouped_by_reason,
    test_leaderboard_ranks_by_best_value_not_last,
    test_metric_sorts_page_through_runs_with_and_without_a_value,
    test_runs_filters_and_visibility,
    test_runs_sorted_by_best_and_final_metric_with_progress,
)

pytestmark = pytest.mark.integration

TABLES = ("run_metrics", "epoch_metrics", "events", "outbox", "experiments", "sweeps")
TABLES += ("api_tokens", "projects")


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with temporary_database("queries") as url:
        yield url


@pytest.fixture
def api(database: str, tmp_path: Path) -> Iterator[Api]:
    engine = make_engine(database)
    with engine.begin() as conn:  # each test starts from empty tables
        if "run_metrics" in inspect(conn).get_table_names():
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
    engine.dispose()
    yield from make_api(database, tmp_path)
