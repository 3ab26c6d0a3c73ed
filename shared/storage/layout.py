"""Where a run's files live in the store: ``runs/<experiment-id>/<path in the run folder>``.

One function for writers (the worker's reporter) and readers (the API), so the
two can never disagree about a key.
"""

from __future__ import annotations

from shared.storage.base import validate_key


def run_prefix(experiment_id: str) -> str:
    """The folder of one run's artifacts (everything a deleted run leaves behind)."""
    return validate_key(f"runs/{experiment_id}")


def run_key(experiment_id: str, relative: str) -> str:
    """The key of one file of a run, e.g. ``runs/exp_x/plots/losses.png``."""
    return validate_key(f"runs/{experiment_id}/{relative}")
