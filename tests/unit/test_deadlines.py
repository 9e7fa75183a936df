"""CMS-0057-F deadlines from payer_received_at (scenario 11), with an injectable clock."""

from __future__ import annotations

import datetime as dt

from authsvc.domain import clock, deadlines

T0 = dt.datetime(2026, 11, 2, 15, 30, tzinfo=dt.UTC)


def test_expedited_is_72_hours_and_standard_168_exact_utc() -> None:
    assert deadlines.decision_due_at(T0, "expedited") == T0 + dt.timedelta(hours=72)
    assert deadlines.decision_due_at(T0, "standard") == T0 + dt.timedelta(hours=168)


def test_no_deadline_before_the_payer_received_it_or_for_unimpacted_payers() -> None:
    assert deadlines.decision_due_at(None, "standard") is None
    assert deadlines.decision_due_at(T0, "expedited", cms0057_impacted=False) is None


def test_at_risk_in_the_last_20_percent_then_overdue() -> None:
    due = deadlines.decision_due_at(T0, "expedited")
    fixed = clock.FixedClock(T0 + dt.timedelta(hours=57, minutes=35))
    previous = clock.install(fixed)
    try:
        status = deadlines.deadline_status(due, "expedited", clock.now(), final=False)
        assert status == deadlines.DeadlineStatus(overdue=False, at_risk=False)
        fixed.advance(dt.timedelta(minutes=2))  # past 57.6 h: under 20 % (14.4 h) left
        status = deadlines.deadline_status(due, "expedited", clock.now(), final=False)
        assert status.at_risk and not status.overdue
        fixed.set(due + dt.timedelta(seconds=1))
        status = deadlines.deadline_status(due, "expedited", clock.now(), final=False)
        assert status.overdue and not status.at_risk
        assert deadlines.deadline_status(due, "expedited", clock.now(), final=True) == \
            deadlines.DeadlineStatus(False, False)
    finally:
        clock.install(previous)


def test_standard_case_is_not_flagged_on_day_six() -> None:
    due = deadlines.decision_due_at(T0, "standard")
    day6 = T0 + dt.timedelta(days=6) - dt.timedelta(hours=10)
    status = deadlines.deadline_status(due, "standard", day6, final=False)
    assert not status.overdue and not status.at_risk
