"""Coordinator actions on an order: extensions, coverage fixes, resolving attention."""

from __future__ import annotations

import sqlalchemy as sa

from authsvc.adapters.db import repo
from authsvc.bootstrap import Services
from authsvc.domain import cases as cs
from authsvc.domain import clock, ids
from authsvc.domain.errors import NotFound, StateConflict
from authsvc.service_layer import timeline
from authsvc.service_layer.context import Actor
from authsvc.service_layer.orders import order_facts, refresh_order_status

AUTHORIZING_ACTIONS = ("A1", "A2", "A6")


def _own_order(conn: sa.Connection, actor: Actor, order_id: str) -> dict:
    order = repo.lock_order(conn, order_id)
    if order is None or order["org_id"] != actor.org_id:
        raise NotFound("order")
    return order


def _audit(conn: sa.Connection, actor: Actor, order: dict, action: str) -> None:
    repo.add_audit(conn, at=clock.now(), org_id=actor.org_id, token_id=actor.token_id,
                   role=actor.role, action=action, entity_type="order", entity_id=order["id"],
                   patient_id=order["patient_id"], outcome="success",
                   request_id=actor.request_id, source_ip=actor.source_ip)


def request_extension(services: Services, actor: Actor, order_id: str, body: dict,
                      conn: sa.Connection) -> str:
    """Ask the payer for more on approved lines: a new `extension` case linked to the
    authorization it extends (scenario 13). `quantity` is the new total."""
    now = clock.now()
    order = _own_order(conn, actor, order_id)
    standing: dict[int, tuple[dict, dict]] = {}
    for case in repo.cases_of_order(conn, order_id):
        if case["state"] not in cs.AUTHORIZED:
            continue
        for line in repo.case_lines(conn, case["id"]):
            if line["review_action"] in AUTHORIZING_ACTIONS:
                standing[line["sequence"]] = (case, line)  # newest case wins
    wanted = {line["sequence"]: line for line in body["lines"]}
    missing = sorted(seq for seq in wanted if seq not in standing)
    if missing:
        raise StateConflict(f"line(s) {missing} have no approval to extend",
                            current_state=order["status"])
    base_cases = {standing[seq][0]["id"] for seq in wanted}
    if len(base_cases) != 1:
        raise StateConflict("extend lines of one authorization at a time",
                            current_state=order["status"])
    base = standing[next(iter(wanted))][0]
    case_id = ids.new_id("case")
    repo.insert_case(conn, {
        "id": case_id, "org_id": order["org_id"], "order_id": order_id,
        "payer_id": order["payer_id"], "kind": "extension", "related_case_id": base["id"],
        "certification_type": "4", "urgency": order["urgency"], "state": cs.READY_TO_SUBMIT,
        "created_at": now, "updated_at": now,
    }, [{
        "sequence": seq, "code_system": standing[seq][1]["code_system"],
        "code": standing[seq][1]["code"], "quantity": req["quantity"],
        "service_start": standing[seq][1]["service_start"], "service_end": req["service_end"],
    } for seq, req in sorted(wanted.items())])
    repo.add_outbox(conn, "submit_case", case_id, now)
    timeline.record(conn, org_id=order["org_id"], order_id=order_id, case_id=case_id, at=now,
                      event="extension_requested", actor=actor.label,
                      detail={"extends": base["id"], "sequences": sorted(wanted)})
    refresh_order_status(conn, order_id, now)
    _audit(conn, actor, order, "update")
    return case_id


def fix_coverage(services: Services, actor: Actor, order_id: str, body: dict,
                 conn: sa.Connection) -> None:
    """Correct the member id after a coverage problem and check eligibility again."""
    now = clock.now()
    order = _own_order(conn, actor, order_id)
    if order["status"] not in ("coverage_problem", "needs_attention") or \
            order["eligibility_status"] not in ("inactive", "member_not_found", "error"):
        raise StateConflict("coverage can be fixed only after a coverage problem or an "
                            "eligibility error", current_state=order["status"])
    lines = repo.order_lines(conn, order_id)
    patient = repo.patient_row(conn, order["patient_id"])
    engine = services.rules.current()
    determinations = engine.determine(order_facts(order, lines, patient))
    for line, det in zip(lines, determinations, strict=True):
        repo.set_line_determination(conn, order_id, line["sequence"], det.to_record())
    check_id = ids.new_id("elg")
    repo.insert_eligibility(conn, {
        "id": check_id, "org_id": order["org_id"], "order_id": order_id, "status": "pending",
        "date_of_service": min(line["service_start"] for line in lines), "requested_at": now,
    })
    repo.add_outbox(conn, "run_eligibility", check_id, now)
    repo.update_order(conn, order_id, member_id=body["member_id"],
                      group_number=body.get("group_number") or order["group_number"],
                      status="checking_eligibility", eligibility_status="pending",
                      attention_reason=None, attention_since=None,
                      ruleset_version=engine.version(order["payer_id"]), updated_at=now)
    timeline.record(conn, org_id=order["org_id"], order_id=order_id, at=now,
                      event="coverage_updated", actor=actor.label)
    _audit(conn, actor, order, "update")


def resolve_order(services: Services, actor: Actor, order_id: str, body: dict,
                  conn: sa.Connection) -> None:
    """Clear the order's own needs_attention; the note goes to the timeline."""
    now = clock.now()
    order = _own_order(conn, actor, order_id)
    if not order["attention_reason"]:
        raise StateConflict("the order has nothing needing attention of its own",
                            current_state=order["status"])
    repo.update_order(conn, order_id, attention_reason=None, attention_since=None,
                      updated_at=now)
    timeline.record(conn, org_id=order["org_id"], order_id=order_id, at=now,
                      event="attention_resolved", actor=actor.label,
                      detail={"reason": order["attention_reason"], "note": body["note"]})
    _audit(conn, actor, order, "update")
