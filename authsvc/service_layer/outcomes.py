"""The billing feed: one append-only row per line decision or change, versioned per line."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from authsvc.adapters.db import repo
from authsvc.domain import ids

#: payer review action → feed outcome
OUTCOME_BY_ACTION = {"A1": "approved", "A2": "approved", "A3": "denied", "A6": "modified",
                     "NA": "no_auth_required"}


def emit(conn: sa.Connection, *, order: dict, case_id: str | None, sequence: int, code: str,
         outcome: str, decided_at: dt.datetime, auth_number: str | None = None,
         authorized_quantity: int | None = None, valid_from: dt.date | None = None,
         valid_to: dt.date | None = None, denial_code: str | None = None,
         denial_text: str | None = None) -> None:
    """Append the next version for (order, sequence). Call `repo.lock_outcome_feed` first."""
    from authsvc.service_layer import webhooks_out

    outcome_id = ids.new_id("out")
    repo.insert_outcome(conn, {
        "id": outcome_id, "org_id": order["org_id"], "order_id": order["id"],
        "case_id": case_id, "sequence": sequence, "code": code, "outcome": outcome,
        "auth_number": auth_number, "authorized_quantity": authorized_quantity,
        "valid_from": valid_from, "valid_to": valid_to, "denial_code": denial_code,
        "denial_text": denial_text, "payer_id": order["payer_id"], "decided_at": decided_at,
        "version": repo.next_outcome_version(conn, order["id"], sequence),
    })
    # Same transaction as the outcome: a subscriber's delivery exists iff the outcome does.
    webhooks_out.enqueue_event(conn, order["org_id"], "outcome.created",
                               {"outcome_id": outcome_id})


def emit_case_decision(conn: sa.Connection, order: dict, case: dict, lines: list[dict],
                       now: dt.datetime) -> None:
    """Outcomes of a case that reached a decided state, one per decided line."""
    repo.lock_outcome_feed(conn)
    for line in lines:
        outcome = OUTCOME_BY_ACTION.get(line["review_action"] or "")
        if outcome is None:
            continue
        quantity = line["authorized_quantity"]
        if outcome == "approved" and quantity is None:
            quantity = line["quantity"]  # an approval stating no quantity grants the request
        emit(conn, order=order, case_id=case["id"], sequence=line["sequence"], code=line["code"],
             outcome=outcome, decided_at=line["decided_at"] or now,
             auth_number=line["auth_number"] if outcome != "denied" else None,
             authorized_quantity=quantity if outcome in ("approved", "modified") else None,
             valid_from=line["valid_from"], valid_to=line["valid_to"],
             denial_code=line["denial_code"] if outcome == "denied" else None,
             denial_text=line["denial_text"] if outcome == "denied" else None)
