"""Read models: what the API shows of orders, cases and outcomes (api.md shapes)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from typing import Any

import sqlalchemy as sa

from authsvc.adapters.db import repo
from authsvc.domain import cases as cs
from authsvc.domain import clock, deadlines
from authsvc.domain.determination import Determination
from authsvc.domain.errors import NotFound


class BadCursor(ValueError):
    """A cursor that this service did not issue (HTTP 400)."""


def encode_cursor(value: Any) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


MAX_CURSOR_CHARS = 512  # every cursor this service issues is far shorter


def decode_cursor(cursor: str) -> Any:
    if len(cursor) > MAX_CURSOR_CHARS:
        raise BadCursor("unreadable cursor")
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError, RecursionError) as exc:
        # RecursionError: deeply nested JSON ("[[[[…") is a forged cursor, not a 500
        raise BadCursor("unreadable cursor") from exc


def _date(value: dt.date | None) -> str | None:
    return value.isoformat() if value is not None else None


def _attention(row: dict) -> dict | None:
    if not row.get("attention_reason"):
        return None
    return {"reason": row["attention_reason"], "since": clock.isoformat(row["attention_since"])}


def case_summary(case: dict) -> dict:
    return {"id": case["id"], "state": case["state"], "kind": case["kind"],
            "payer_id": case["payer_id"], "urgency": case["urgency"],
            "decision_due_at": clock.isoformat(case["decision_due_at"])}


def order_view(conn: sa.Connection, org_id: str, order_id: str, *,
               with_timeline: bool = True) -> dict:
    order = repo.order_row(conn, order_id, org_id)
    if order is None:
        raise NotFound("order")
    lines = repo.order_lines(conn, order_id)
    cases = repo.cases_of_order(conn, order_id)
    check = repo.latest_eligibility(conn, order_id)
    eligibility: dict[str, Any] = {"status": order["eligibility_status"]}
    if check is not None:
        eligibility.update(checked_at=clock.isoformat(check["answered_at"]),
                           date_of_service=_date(check["date_of_service"]),
                           plan_name=check["plan_name"])
    attention = _attention(order)
    if attention is None:
        for case in reversed(cases):
            if case["state"] != cs.SUPERSEDED and case["attention_reason"]:
                attention = _attention(case)
                break
    view = {
        "id": order["id"], "external_id": order["external_id"], "status": order["status"],
        "urgency": order["urgency"], "payer_id": order["payer_id"],
        "created_at": clock.isoformat(order["created_at"]),
        "updated_at": clock.isoformat(order["updated_at"]),
        "ruleset_version": order["ruleset_version"],
        "lines": [{
            "sequence": line["sequence"], "code_system": line["code_system"],
            "code": line["code"], "quantity": line["quantity"],
            "service_start": _date(line["service_start"]),
            "service_end": _date(line["service_end"]),
            "determination": Determination.from_record(line["determination"]).to_dict(),
        } for line in lines],
        "eligibility": eligibility,
        "needs_attention": attention,
        "cases": [case_summary(c) for c in cases],
        "links": {"self": f"/v1/orders/{order['id']}"},
    }
    if with_timeline:
        view["timeline"] = [{
            "at": clock.isoformat(e["at"]), "event": e["event"], "actor": e["actor"],
            "case_id": e["case_id"], "detail": e["detail"],
        } for e in repo.timeline(conn, order_id)]
    return view


def new_order_view(*, order_id: str, body: dict, status: str, version: str,
                   determinations: list[Determination], at: dt.datetime, actor: str,
                   received: dict) -> dict:
    """`order_view` of an order just stored and still waiting for eligibility, built from
    the values in hand (same shape; the intake test compares the two)."""
    stamp = clock.isoformat(at)
    return {
        "id": order_id, "external_id": body.get("external_id"), "status": status,
        "urgency": body["urgency"], "payer_id": body["coverage"]["payer_id"],
        "created_at": stamp, "updated_at": stamp, "ruleset_version": version,
        "lines": [{
            "sequence": line["sequence"], "code_system": line["code_system"],
            "code": line["code"], "quantity": line["quantity"],
            "service_start": _date(line["service_start"]),
            "service_end": _date(line.get("service_end")),
            "determination": det.to_dict(),
        } for line, det in sorted(zip(body["lines"], determinations, strict=True),
                                  key=lambda pair: pair[0]["sequence"])],
        "eligibility": {"status": "pending", "checked_at": None,
                        "date_of_service": _date(min(li["service_start"] for li in body["lines"])),
                        "plan_name": None},
        "needs_attention": None,
        "cases": [],
        "links": {"self": f"/v1/orders/{order_id}"},
        "timeline": [{"at": stamp, "event": "order_received", "actor": actor, "case_id": None,
                      "detail": received}],
    }


def order_list(conn: sa.Connection, org_id: str, *, status: str | None, mrn: str | None,
               cursor: str | None, limit: int) -> dict:
    after = None
    if cursor:
        data = decode_cursor(cursor)
        try:
            after = (dt.datetime.fromisoformat(data["t"]), str(data["id"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadCursor("unreadable cursor") from exc
    rows = repo.list_orders(conn, org_id, status=status, mrn=mrn, after=after, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    items = [order_view(conn, org_id, r["id"], with_timeline=False) for r in rows]
    next_cursor = None
    if more and rows:
        last = rows[-1]
        next_cursor = encode_cursor({"t": last["created_at"].isoformat(), "id": last["id"]})
    return {"items": items, "next_cursor": next_cursor}


def case_view(conn: sa.Connection, org_id: str, case_id: str) -> dict:
    case = repo.case_row(conn, case_id, org_id)
    if case is None:
        raise NotFound("case")
    status = deadlines.deadline_status(case["decision_due_at"], case["urgency"], clock.now(),
                                       cs.is_final(case["state"]))
    return {
        **case_summary(case),
        "order_id": case["order_id"], "related_case_id": case["related_case_id"],
        "needs_attention": _attention(case), "assignee": case["assignee"],
        "submission_unknown": bool(case["submission_unknown"]),
        "payer_received_at": clock.isoformat(case["payer_received_at"]),
        "decided_at": clock.isoformat(case["decided_at"]),
        "overdue": status.overdue, "at_risk": status.at_risk,
        "last_error": case["last_error"],
        "lines": [{
            "sequence": line["sequence"], "code_system": line["code_system"],
            "code": line["code"], "quantity": line["quantity"],
            "decision": None if not line["review_action"] else {
                "review_action": line["review_action"],
                "outcome": {"A1": "approved", "A2": "approved", "A3": "denied", "A4": "pended",
                            "A6": "modified", "NA": "not_required", "CT": "contact_payer",
                            "C": "cancelled"}.get(line["review_action"], "other"),
                "auth_number": line["auth_number"],
                "authorized_quantity": line["authorized_quantity"],
                "valid_from": _date(line["valid_from"]), "valid_to": _date(line["valid_to"]),
                "denial_reason": ({"code": line["denial_code"], "text": line["denial_text"]}
                                  if line["denial_code"] or line["denial_text"] else None),
            },
        } for line in repo.case_lines(conn, case_id)],
        "payer_exchanges": [{
            "id": x["id"], "kind": x["kind"], "direction": x["direction"],
            "http_status": x["http_status"], "started_at": clock.isoformat(x["started_at"]),
            "finished_at": clock.isoformat(x["finished_at"]),
        } for x in repo.exchanges_of_case(conn, case_id)],
    }


def outcome_item(row: dict) -> dict:
    return {
        "id": row["id"], "cursor": encode_cursor({"p": row["position"]}),
        "order_id": row["order_id"], "case_id": row["case_id"], "sequence": row["sequence"],
        "code": row["code"], "outcome": row["outcome"], "auth_number": row["auth_number"],
        "authorized_quantity": row["authorized_quantity"],
        "valid_from": _date(row["valid_from"]), "valid_to": _date(row["valid_to"]),
        "denial_reason": ({"code": row["denial_code"], "text": row["denial_text"]}
                          if row["denial_code"] or row["denial_text"] else None),
        "payer_id": row["payer_id"], "decided_at": clock.isoformat(row["decided_at"]),
        "version": row["version"],
    }


