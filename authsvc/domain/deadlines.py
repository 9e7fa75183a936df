"""CMS-0057-F decision deadlines, measured from when the payer received the request."""

from __future__ import annotations

import dataclasses
import datetime as dt

ALLOWED = {"expedited": dt.timedelta(hours=72), "standard": dt.timedelta(hours=168)}
AT_RISK_SHARE = 0.20


def decision_due_at(
    payer_received_at: dt.datetime | None, urgency: str, cms0057_impacted: bool = True
) -> dt.datetime | None:
    """72 h for expedited, 168 h for standard, exact UTC; None for payers the rule doesn't bind."""
    if payer_received_at is None or not cms0057_impacted:
        return None
    return payer_received_at + ALLOWED[urgency]


@dataclasses.dataclass(frozen=True)
class DeadlineStatus:
    overdue: bool
    at_risk: bool


def deadline_status(
    due_at: dt.datetime | None, urgency: str, now: dt.datetime, final: bool
) -> DeadlineStatus:
    """`overdue` once the deadline passed on a non-final case; `at_risk` under 20 % left."""
    if due_at is None or final:
        return DeadlineStatus(False, False)
    if now > due_at:
        return DeadlineStatus(True, False)
    left = due_at - now
    return DeadlineStatus(False, left < ALLOWED[urgency] * AT_RISK_SHARE)
