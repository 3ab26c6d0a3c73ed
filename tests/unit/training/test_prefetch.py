"""The background prefetcher keeps order, surfaces errors and stops when abandoned."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from workers.training.prefetch import prefetch


def test_same_items_in_the_same_order() -> None:
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))
    assert list(prefetch(iter(range(5)), depth=0)) == list(range(5))


def test_an_error_in_the_source_reaches_the_consumer() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise ValueError("decode failed")

    stream = prefetch(broken())
    assert next(stream) == 1
    with pytest.raises(ValueError, match="decode failed"):
        next(stream)


def test_leaving_early_stops_the_thread() -> None:
    produced = []

    def endless() -> Iterator[int]:
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    stream = prefetch(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    time.sleep(0.3)
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count <= 3 + 2 + 1
    assert not any(t.name == "fitfleet-prefetch" for t in threading.enumerate())
