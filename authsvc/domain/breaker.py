"""A per-payer circuit breaker: stop hammering a payer that is down, resume by itself."""

from __future__ import annotations

import datetime as dt
import threading


class CircuitBreaker:
    """Opens after `threshold` consecutive failures; after `cooldown` one trial call is let
    through (half-open): success closes it, failure opens it again."""

    def __init__(self, threshold: int = 5, cooldown: dt.timedelta = dt.timedelta(seconds=30)):
        self.threshold = threshold
        self.cooldown = cooldown
        self._failures = 0
        self._opened_at: dt.datetime | None = None
        self._trial = False
        self._lock = threading.Lock()

    def allow(self, now: dt.datetime) -> dt.datetime | None:
        """None when a call may go out now, else when to try again."""
        with self._lock:
            if self._opened_at is None:
                return None
            reopen = self._opened_at + self.cooldown
            if now >= reopen and not self._trial:
                self._trial = True
                return None
            return max(reopen, now + dt.timedelta(seconds=1))

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._trial = False

    def failure(self, now: dt.datetime) -> None:
        with self._lock:
            self._failures += 1
            if self._trial or self._failures >= self.threshold:
                self._opened_at = now
                self._trial = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None
