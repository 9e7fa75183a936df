"""The billing feed: one append-only row per line decision or change, versioned per line.

Writers (`emit`) take `repo.lock_outcome_feed` so positions are assigned in commit order;
readers (`feed_page`) return the rows after a position in position order, so a consumer
that stores the last cursor never misses or double-counts an outcome.
"""

from __future__ import annotations

import binascii
import datetime as dt
import json

import sqlalchemy as sa

from authsvc.adapters.db import repo
from authsvc.adapters.db import tables as t
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


# ------------------------------------------------------------------ the feed (GET /v1/outcomes)

_o = t.outcomes
#: one statement built once: the same query as `repo.outcomes_after` (org, position > cursor,
#: position order, limit), selecting only the columns a feed item shows, as plain tuples.
_FEED = (sa.select(_o.c.position, _o.c.id, _o.c.order_id, _o.c.case_id, _o.c.sequence,
                   _o.c.code, _o.c.outcome, _o.c.auth_number, _o.c.authorized_quantity,
                   _o.c.valid_from, _o.c.valid_to, _o.c.denial_code, _o.c.denial_text,
                   _o.c.payer_id, _o.c.decided_at, _o.c.version)
         .where(_o.c.org_id == sa.bindparam("org_id"),
                _o.c.position > sa.bindparam("position"))
         .order_by(_o.c.position).limit(sa.bindparam("limit")))
_ZERO = dt.timedelta(0)
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def cursor_for(position: int) -> str:
    """The opaque cursor of a feed position: byte for byte `views.encode_cursor({"p": n})`."""
    return (binascii.b2a_base64(b'{"p":%d}' % position, newline=False).translate(_URLSAFE)
            .rstrip(b"=").decode())


def _iso(value: dt.datetime) -> str:
    """`clock.isoformat` without the conversion when the value is already UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    elif value.utcoffset() != _ZERO:
        value = value.astimezone(dt.UTC)
    return value.isoformat()[:-6] + "Z"


#: positions are a 32-bit INTEGER column: a larger "p" was never issued (and PostgreSQL
#: would refuse to compare it: a DataError, once a 500).
MAX_POSITION = 2**31


def feed_page(conn: sa.Connection, org_id: str, after: str | None, limit: int) -> dict:
    """`views.outcome_feed`, made cheap per item (the feed is read in bulk by billing).

    Same rows in the same order and the same item shapes as `views.outcome_item`; raises
    `views.BadCursor` for a cursor this service did not issue.
    """
    from authsvc.service_layer.views import BadCursor, decode_cursor

    position = 0
    if after:
        data = decode_cursor(after)
        if not isinstance(data, dict) or type(data.get("p")) is not int \
                or not 0 <= data["p"] < MAX_POSITION:
            raise BadCursor("unreadable cursor")  # beyond the column's range: not ours
        position = data["p"]
    rows = conn.execute(_FEED, {"org_id": org_id, "position": position, "limit": limit}).all()
    items = [{
        "id": oid, "cursor": cursor_for(pos), "order_id": order_id, "case_id": case_id,
        "sequence": sequence, "code": code, "outcome": outcome, "auth_number": auth_number,
        "authorized_quantity": quantity,
        "valid_from": valid_from.isoformat() if valid_from is not None else None,
        "valid_to": valid_to.isoformat() if valid_to is not None else None,
        "denial_reason": ({"code": denial_code, "text": denial_text}
                          if denial_code or denial_text else None),
        "payer_id": payer_id, "decided_at": _iso(decided_at), "version": version,
    } for (pos, oid, order_id, case_id, sequence, code, outcome, auth_number, quantity,
           valid_from, valid_to, denial_code, denial_text, payer_id, decided_at, version)
        in rows]
    next_cursor = items[-1]["cursor"] if items else (after or cursor_for(0))
    return {"items": items, "next_cursor": next_cursor}


def feed_page_json(conn: sa.Connection, org_id: str, after: str | None, limit: int) -> str:
    """The page as compact JSON text (the route's body, without Flask's sorted re-encoding)."""
    return json.dumps(feed_page(conn, org_id, after, limit), separators=(",", ":"))
