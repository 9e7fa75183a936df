"""Order events: the timeline row and what it causes, in one transaction.

Every state change that a patient, caregiver, provider or subscriber may hear about goes
through `record`, so a notification row or a webhook delivery is written exactly when (and
only if) its event commits.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from authsvc.adapters.db import repo


def record(conn: sa.Connection, *, org_id: str, order_id: str, at: dt.datetime, event: str,
           actor: str, case_id: str | None = None, detail: dict | None = None,
           contacts: list | None = None) -> None:
    """Append the timeline event, plan the notifications and queue the webhooks it causes
    (`contacts`: the patient's, when the caller holds them, as order intake does)."""
    from authsvc.service_layer import notifications, webhooks_out

    repo.add_timeline(conn, org_id=org_id, order_id=order_id, at=at, event=event, actor=actor,
                      case_id=case_id, detail=detail)
    notifications.plan(conn, org_id=org_id, order_id=order_id, case_id=case_id, event=event,
                       at=at, detail=detail, contacts=contacts)
    webhooks_out.announce(conn, org_id=org_id, order_id=order_id, case_id=case_id, event=event,
                          at=at, detail=detail)
