"""Who hears about an order event (issue 6 fills this in; events arrive via timeline.record).

`plan` runs inside the transaction of the event that causes it and writes `notifications`
rows plus outbox rows for the sender; it must never send anything itself.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa


def plan(conn: sa.Connection, *, org_id: str, order_id: str, case_id: str | None, event: str,
         at: dt.datetime, detail: dict | None = None) -> None:
    """No notification channels are configured yet: nothing to plan."""
    return None
