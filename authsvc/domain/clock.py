"""The one clock. Deadlines and leases read time through it so tests can move it."""

from __future__ import annotations

import datetime as dt
from typing import Protocol

UTC = dt.UTC


class Clock(Protocol):
    def now(self) -> dt.datetime: ...


class SystemClock:
    """Wall-clock UTC time."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(UTC)


class FixedClock:
    """A clock that only moves when told to (for tests and simulations)."""

    def __init__(self, at: dt.datetime):
        self._at = at if at.tzinfo else at.replace(tzinfo=UTC)

    def now(self) -> dt.datetime:
        return self._at

    def advance(self, delta: dt.timedelta) -> None:
        self._at = self._at + delta

    def set(self, at: dt.datetime) -> None:
        self._at = at


_clock: Clock = SystemClock()


def now() -> dt.datetime:
    """Current UTC time from the installed clock."""
    return _clock.now()


def install(clock: Clock) -> Clock:
    """Install a clock (tests); returns the previous one so it can be restored."""
    global _clock
    previous, _clock = _clock, clock
    return previous


def isoformat(value: dt.datetime | None) -> str | None:
    """RFC 3339 UTC with a trailing Z, the one timestamp format of the API."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
