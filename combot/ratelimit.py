"""Per-participant message rate limits, kept in each worker's memory (a token bucket each)."""

from __future__ import annotations

import time
from typing import Callable


class RateLimiter:
    """Allow `per_window` messages per `window` seconds per key, with bursts up to `per_window`."""

    def __init__(self, per_window: int, window: float, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        self.rate = per_window / window if per_window > 0 else 0.0
        self.capacity = float(per_window)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str) -> bool:
        if self.rate <= 0:
            return True
        now = self.clock()
        tokens, last = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._buckets.clear()  # bounded memory; forgetting old buckets only ever allows more
        self._buckets[key] = (tokens - 1.0, now)
        return True
