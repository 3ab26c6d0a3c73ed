"""Preparing the next batches in a background thread while the model computes.

Decoding, cropping and augmenting release the GIL (PIL, torch ops), so one
thread a couple of batches ahead hides most of the data time behind the
forward and backward passes — fastai's DataLoader workers do the same with
processes, which are not allowed inside a Celery pool process.  Batches come
out in the same order as the wrapped iterator yields them, so results do not
change.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(source: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Yield ``source``'s items, computing up to ``depth`` of them ahead.

    Leaving the loop early (a stop request) stops the thread after at most
    one more item; an exception in ``source`` is raised in the consumer.
    """
    if depth <= 0:
        yield from source
        return
    items: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            items.put(_Failure(exc))

    thread = threading.Thread(target=produce, name="fitfleet-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=5)
