"""Per-token rate limits on submission: a token bucket per API token, per API process.

A script stuck in a retry loop, or a sweep gone wrong, must not fill the queue
for the whole team: each token may submit ``rate`` runs a second on average,
with bursts of up to ``burst``. Over the limit the API answers 429 with a
Retry-After saying when the next submission will be accepted. The buckets
live in the API process (so with N processes a token's ceiling is N times
the rate); a limit of 0 turns it off.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from shared.errors import FitfleetError


class RateLimited(FitfleetError):
    """This token submitted faster than its limit; try again after ``retry_after_s``."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SubmitLimiter:
    """Token buckets by API token id: ``rate`` per second, ``burst`` at most."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tokens: int = 100_000,
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.clock = clock
        self.max_tokens = max_tokens
        self._buckets: dict[str, tuple[float, float]] = {}  # token -> (level, at)
        self._lock = threading.Lock()

    def take(self, token_id: str) -> None:
        """Spend one submission of ``token_id``'s bucket, or raise :class:`RateLimited`."""
        if self.rate <= 0:
            return
        now = self.clock()
        with self._lock:
            level, at = self._buckets.get(token_id, (float(self.burst), now))
            level = min(float(self.burst), level + (now - at) * self.rate)
            if level < 1.0:
                wait = (1.0 - level) / self.rate
                self._buckets[token_id] = (level, now)
                raise RateLimited(
                    f"this token may submit {self.rate:g} runs a second (bursts of "
                    f"{self.burst}); try again in {max(wait, 0.1):.1f} s",
                    retry_after_s=wait,
                )
            if len(self._buckets) >= self.max_tokens and token_id not in self._buckets:
                self._buckets.clear()  # bounded memory; a reset only forgives
            self._buckets[token_id] = (level - 1.0, now)


def retry_after_header(exc: RateLimited) -> str:
    """Whole seconds, rounded up (Retry-After takes no fractions)."""
    return str(max(1, math.ceil(exc.retry_after_s)))
