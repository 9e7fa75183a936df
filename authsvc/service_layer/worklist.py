"""The coordinator's worklist (`GET /v1/cases`) and the case detail (`GET /v1/cases/{id}`)."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from authsvc.adapters.db import repo
from authsvc.adapters.db import repo_cases as rc
from authsvc.domain import cases as cs
from authsvc.domain import clock, deadlines
from authsvc.domain.errors import NotFound
from authsvc.service_layer import views
from authsvc.service_layer.views import BadCursor, decode_cursor, encode_cursor

WorklistFilter = rc.WorklistFilter


def _attention(case: dict, overdue: bool) -> dict | None:
    """The stored reason, or `overdue` as soon as the deadline passed (before the sweep)."""
    if case.get("attention_reason"):
        return {"reason": case["attention_reason"],
                "since": clock.isoformat(case["attention_since"])}
    if overdue:
        return {"reason": "overdue", "since": clock.isoformat(case["decision_due_at"])}
    return None


def _event(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"at": clock.isoformat(row["at"]), "event": row["event"], "actor": row["actor"]}


def worklist_item(case: dict, last_event: dict | None, now: dt.datetime) -> dict:
    status = deadlines.deadline_status(case["decision_due_at"], case["urgency"], now,
                                       cs.is_final(case["state"]))
    return {
        **views.case_summary(case),
        "order_id": case["order_id"], "external_id": case.get("external_id"),
        "related_case_id": case["related_case_id"],
        "payer_received_at": clock.isoformat(case["payer_received_at"]),
        "overdue": status.overdue, "at_risk": status.at_risk,
        "needs_attention": _attention(case, status.overdue),
        "assignee": case["assignee"],
        "last_event": _event(last_event),
        "links": {"self": f"/v1/cases/{case['id']}"},
    }


def _decode(cursor: str) -> tuple[dt.datetime | None, str]:
    import re

    data = decode_cursor(cursor)
    try:
        due = data["d"]
        case_id = data["id"]
        if not isinstance(case_id, str) or (due is not None and not isinstance(due, str)):
            raise TypeError
        if not re.fullmatch(r"[a-z]+_[0-9a-z]+", case_id):  # e.g. a NUL PostgreSQL refuses
            raise ValueError
        return (dt.datetime.fromisoformat(due) if due else None), case_id
    except (KeyError, TypeError, ValueError) as exc:
        raise BadCursor("unreadable cursor") from exc


def case_list(conn: sa.Connection, org_id: str, f: WorklistFilter, *, cursor: str | None,
              limit: int) -> dict:
    """One page of the worklist; `next_cursor` is the keyset position of the last item."""
    now = clock.now()
    after = _decode(cursor) if cursor else None
    rows = rc.worklist(conn, org_id, f, now, after, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    events = rc.last_events(conn, rows)
    items = [worklist_item(r, events.get(r["id"]), now) for r in rows]
    next_cursor = None
    if more and rows:
        last = rows[-1]
        due = last["decision_due_at"]
        next_cursor = encode_cursor({"d": due.isoformat() if due else None, "id": last["id"]})
    return {"items": items, "next_cursor": next_cursor}


def state_counts(conn: sa.Connection, org_id: str, states: tuple[str, ...]) -> dict[str, int]:
    """Cases per state for the worklist's header (every state asked for, zeros included)."""
    found = rc.count_by_state(conn, org_id, states)
    return {state: found.get(state, 0) for state in states}


def case_detail(conn: sa.Connection, org_id: str, case_id: str, *, with_bodies: bool) -> dict:
    """`views.case_view` plus kind, notes, attachments, info requests and the timeline.

    Payer exchange bodies carry PHI: only admins get them (`with_bodies`).
    """
    view = views.case_view(conn, org_id, case_id)
    case = repo.case_row(conn, case_id, org_id)
    if case is None:  # pragma: no cover - case_view raised already
        raise NotFound("case")
    order = repo.order_row(conn, case["order_id"], org_id)
    view["needs_attention"] = _attention(case, view["overdue"])
    view.update(
        external_id=order["external_id"] if order else None,
        level_of_care=case["level_of_care"], reason=case["reason"],
        update_pending=bool(case["update_pending"]),
        submitted_at=clock.isoformat(case["submitted_at"]),
        created_at=clock.isoformat(case["created_at"]),
        updated_at=clock.isoformat(case["updated_at"]),
        notes=[{"id": n["id"], "author": n["author"], "text": n["text"],
                "created_at": clock.isoformat(n["created_at"])}
               for n in rc.case_notes(conn, case_id)],
        attachments=[{
            "id": a["id"], "filename": a["filename"], "content_type": a["content_type"],
            "size": a["size"], "sha256": a["sha256"], "loinc": a["loinc"],
            "created_by": a["created_by"], "created_at": clock.isoformat(a["created_at"]),
            "sent_at": clock.isoformat(a["sent_at"]),
            "links": {"content": f"/v1/cases/{case_id}/attachments/{a['id']}"},
        } for a in rc.attachments_of_case(conn, case_id)],
        info_requests=[{
            "id": r["id"], "codes": r["codes"], "text": r["text"],
            "requested_at": clock.isoformat(r["requested_at"]),
            "answered_at": clock.isoformat(r["answered_at"]),
        } for r in rc.info_requests(conn, case_id)],
        timeline=[{
            "at": clock.isoformat(e["at"]), "event": e["event"], "actor": e["actor"],
            "detail": e["detail"],
        } for e in rc.case_timeline(conn, case_id)],
        links={"self": f"/v1/cases/{case_id}", "order": f"/v1/orders/{case['order_id']}"},
    )
    if with_bodies:
        bodies = rc.exchange_bodies(conn, case_id)
        for x in view["payer_exchanges"]:
            b = bodies.get(x["id"], {})
            x.update(url=b.get("url"), request_body=b.get("request_body"),
                     response_body=b.get("response_body"))
    return view
