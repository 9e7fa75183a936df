"""The per-payer circuit breaker opens after repeated failures and resumes by itself."""

from __future__ import annotations

import datetime as dt

from authsvc.domain.breaker import CircuitBreaker

T0 = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def test_opens_after_the_threshold_and_lets_one_trial_through_after_the_cooldown() -> None:
    b = CircuitBreaker(threshold=3, cooldown=dt.timedelta(seconds=30))
    for _ in range(2):
        b.failure(T0)
        assert b.allow(T0) is None
    b.failure(T0)
    assert b.is_open
    assert b.allow(T0 + dt.timedelta(seconds=10)) == T0 + dt.timedelta(seconds=30)
    assert b.allow(T0 + dt.timedelta(seconds=31)) is None  # the trial call
    assert b.allow(T0 + dt.timedelta(seconds=31)) is not None  # only one at a time
    b.success()
    assert not b.is_open and b.allow(T0 + dt.timedelta(seconds=32)) is None


def test_a_failed_trial_opens_it_again() -> None:
    b = CircuitBreaker(threshold=1, cooldown=dt.timedelta(seconds=5))
    b.failure(T0)
    assert b.allow(T0 + dt.timedelta(seconds=6)) is None
    b.failure(T0 + dt.timedelta(seconds=6))
    assert b.allow(T0 + dt.timedelta(seconds=7)) == T0 + dt.timedelta(seconds=11)
