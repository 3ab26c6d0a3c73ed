"""Comparing runs: only the spec fields that differ, final and best metrics, curves.

Peers show every field of every run side by side and leave people to spot the
difference; fitfleet flattens each spec to dotted paths and keeps the paths
whose values are not all equal, so two runs that differ in one learning rate
show exactly one row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from shared.results import HIGHER_IS_BETTER

_MISSING = "<absent>"


def flatten(document: Any, prefix: str = "") -> dict[str, Any]:
    """``{"data": {"size": 28}}`` -> ``{"data.size": 28}``; list items get their index."""
    if isinstance(document, Mapping):
        if not document and prefix:
            return {prefix: {}}
        flat: dict[str, Any] = {}
        for key, value in document.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(document, list) and document and any(isinstance(v, Mapping) for v in document):
        flat = {}
        for index, value in enumerate(document):
            flat.update(flatten(value, f"{prefix}.{index}"))
        return flat
    return {prefix: document}


def spec_differences(specs: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Dotted path -> one value per spec, for the paths whose values differ.

    A path present in some specs only shows ``"<absent>"`` for the others.
    ``name`` differs between almost all runs and is left out: it is shown
    with each run anyway.
    """
    flats = [flatten(spec) for spec in specs]
    paths = sorted({path for flat in flats for path in flat})
    differences: dict[str, list[Any]] = {}
    for path in paths:
        if path == "name":
            continue
        values = [flat.get(path, _MISSING) for flat in flats]
        if any(v != values[0] for v in values[1:]):
            differences[path] = values
    return differences


def best_values(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The best value each metric reached over all epochs (not the last one)."""
    best: dict[str, float] = {}

    def consider(name: str, value: Any) -> None:
        if not isinstance(value, int | float) or not math.isfinite(value):
            return
        better = max if name in HIGHER_IS_BETTER else min
        best[name] = better(best[name], float(value)) if name in best else float(value)

    for row in rows:
        consider("valid_loss", row.get("valid_loss"))
        consider("train_loss", row.get("train_loss"))
        for name, value in (row.get("metrics") or {}).items():
            consider(name, value)
    return best
