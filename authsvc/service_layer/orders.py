"""Order use cases: intake, eligibility results, opening cases, cancellation.

Each public function owns one transaction: state, timeline, outcomes and the outbox rows for
the work it causes commit together, so a crash can delay work but never lose it.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import sqlalchemy as sa

from authsvc.adapters.db import repo
from authsvc.bootstrap import Services
from authsvc.domain import cases as cs
from authsvc.domain import clock, ids
from authsvc.domain.determination import (
    NOT_SENT_PA,
    REDETERMINING,
    SENT_PA,
    Determination,
    after_eligibility,
)
from authsvc.domain.errors import NotFound, StateConflict
from authsvc.domain.orders import DECIDED, LineFacts, OrderFacts, needs_eligibility
from authsvc.service_layer import outcomes, timeline
from authsvc.service_layer.context import Actor

log = logging.getLogger(__name__)


def order_facts(order: dict, lines: list[dict], patient: dict | None) -> OrderFacts:
    """What the rules may see of an order: codes, dates, age and sex, never names or ids."""
    return OrderFacts(
        payer_id=order["payer_id"] if "payer_id" in order else order["coverage"]["payer_id"],
        lines=tuple(
            LineFacts(
                sequence=line["sequence"], code_system=line["code_system"], code=line["code"],
                quantity=line["quantity"], service_start=line["service_start"],
                service_end=line.get("service_end"),
            ) for line in lines
        ),
        diagnoses=tuple(order.get("diagnoses") or ()),
        place_of_service=order.get("place_of_service"),
        requester_npi=order.get("requester_npi") or (order.get("requester") or {}).get("npi"),
        performer_npi=order.get("performer_npi") or (order.get("performer") or {}).get("npi"),
        patient_birth_date=(patient or {}).get("birth_date"),
        patient_sex=(patient or {}).get("sex"),
    )


def determine(services: Services, body: dict) -> tuple[str, list[Determination]]:
    """The rules' answer for a validated order body, with coverage presumed active."""
    engine = services.rules.current()
    facts = order_facts(body, body["lines"], body["patient"])
    return engine.version(facts.payer_id), engine.determine(facts)


def submit_order(services: Services, actor: Actor, body: dict, conn: sa.Connection,
                 subscriptions: list[dict] | None = None,
                 patient_id: str | None = None) -> tuple[str, dict | None]:
    """Store a validated order with its determinations and the work it causes.

    Runs inside the caller's transaction (the API's idempotency record shares it). Returns
    the order id and, when no case was opened yet (the usual path: eligibility pending),
    the order's API view built from the values in hand, saving a re-read on intake.
    `subscriptions`: the organization's live webhook subscriptions when the caller has just
    read them (`webhooks_out.subscriptions`). `patient_id`: the patient's row when the caller
    has already upserted it in this transaction (intake does, with its Idempotency-Key claim).
    """
    now = clock.now()
    version, determinations = determine(services, body)
    order_id = ids.new_id("ord")
    from authsvc.service_layer import crd  # CDS Hooks continuity: reuse coverage assertions

    determinations = crd.reuse_assertions(conn, actor.org_id, body, version, determinations,
                                          order_id=order_id, at=now, actor=actor.label)
    # Reads first, then writes: the rows below are queued (`repo.insert_order` and friends) and
    # leave in one round trip at commit unless a read in between sends them early.
    from authsvc.service_layer import webhooks_out

    webhooks_out.subscriptions(conn, actor.org_id, subscriptions)
    if patient_id is None:
        patient_id = repo.upsert_patient(conn, actor.org_id, body["patient"], now)
    eligibility = "pending" if needs_eligibility(determinations) else "not_required"
    coverage = body["coverage"]
    repo.insert_order(conn, {
        "id": order_id, "org_id": actor.org_id, "external_id": body.get("external_id"),
        "patient_id": patient_id, "payer_id": coverage["payer_id"],
        "member_id": coverage["member_id"], "group_number": coverage.get("group_number"),
        "requester_npi": body["requester"]["npi"], "requester_name": body["requester"].get("name"),
        "performer_npi": (body.get("performer") or {}).get("npi"),
        "performer_name": (body.get("performer") or {}).get("name"),
        "place_of_service": body.get("place_of_service"), "diagnoses": body["diagnoses"],
        "urgency": body["urgency"],
        "status": "checking_eligibility" if eligibility == "pending" else "received",
        "eligibility_status": eligibility, "ruleset_version": version,
        "notes": body.get("notes"), "created_at": now, "updated_at": now,
    }, [{
        "sequence": line["sequence"], "code_system": line["code_system"], "code": line["code"],
        "quantity": line["quantity"], "modifiers": line.get("modifiers") or None,
        "service_start": line["service_start"], "service_end": line.get("service_end"),
        "coverage_assertion_id": line.get("coverage_assertion_id"),
        "determination": det.to_record(),
    } for line, det in zip(body["lines"], determinations, strict=True)])
    received = {"ruleset_version": version, "lines": len(determinations)}
    timeline.record(conn, org_id=actor.org_id, order_id=order_id, at=now,
                    event="order_received", actor=actor.label, detail=received,
                    contacts=body["patient"].get("contacts") or [])
    if eligibility == "pending":
        check_id = ids.new_id("elg")
        repo.insert_eligibility(conn, {
            "id": check_id, "org_id": actor.org_id, "order_id": order_id, "status": "pending",
            "date_of_service": min(line["service_start"] for line in body["lines"]),
            "requested_at": now,
        })
        repo.add_outbox(conn, "run_eligibility", check_id, now)
    else:
        order = repo.order_row(conn, order_id)
        assert order is not None
        open_cases(services, conn, order, now, actor)
    repo.add_audit(conn, at=now, org_id=actor.org_id, token_id=actor.token_id, role=actor.role,
                   action="create", entity_type="order", entity_id=order_id,
                   patient_id=patient_id, outcome="success", request_id=actor.request_id,
                   source_ip=actor.source_ip)
    if eligibility != "pending":
        return order_id, None
    from authsvc.service_layer.views import new_order_view

    return order_id, new_order_view(
        order_id=order_id, body=body, status="checking_eligibility", version=version,
        determinations=determinations, at=now, actor=actor.label, received=received)


def open_cases(services: Services, conn: sa.Connection, order: dict, now: dt.datetime,
               actor: Actor) -> None:
    """Once eligibility allows: open a case for lines to send, emit no-auth outcomes."""
    lines = repo.order_lines(conn, order["id"])
    dets = {line["sequence"]: Determination.from_record(line["determination"]) for line in lines}
    sent = [line for line in lines if dets[line["sequence"]].pa_needed in SENT_PA]
    not_sent = [line for line in lines if dets[line["sequence"]].pa_needed in NOT_SENT_PA]
    no_auth = [line for line in lines if dets[line["sequence"]].needs_no_auth]

    if no_auth:
        repo.lock_outcome_feed(conn)
    for line in no_auth:
        det = dets[line["sequence"]]
        outcomes.emit(conn, order=order, case_id=None, sequence=line["sequence"],
                      code=line["code"], outcome="no_auth_required",
                      auth_number=det.satisfied_pa_id, decided_at=now)

    attention: dict[str, Any] = {}
    if not_sent:
        attention = {"attention_reason": "not_sent", "attention_since": now}
        timeline.record(conn, org_id=order["org_id"], order_id=order["id"], at=now,
                          event="lines_not_sent", actor="system",
                          detail={"sequences": [line["sequence"] for line in not_sent]})
    if not sent:
        status = "needs_attention" if not_sent else "no_auth_required"
        repo.update_order(conn, order["id"], status=status, updated_at=now, **attention)
        timeline.record(conn, org_id=order["org_id"], order_id=order["id"], at=now,
                          event="no_auth_required" if not not_sent else "needs_attention",
                          actor="system")
        return

    hold = any(dets[line["sequence"]].hold_for_documentation for line in sent)
    case_id = ids.new_id("case")
    state = cs.NEEDS_INPUT if hold else cs.READY_TO_SUBMIT
    repo.insert_case(conn, {
        "id": case_id, "org_id": order["org_id"], "order_id": order["id"],
        "payer_id": order["payer_id"], "kind": "initial", "certification_type": "I",
        "urgency": order["urgency"], "state": state, "created_at": now, "updated_at": now,
    }, [{
        "sequence": line["sequence"], "code_system": line["code_system"], "code": line["code"],
        "quantity": line["quantity"], "service_start": line["service_start"],
        "service_end": line["service_end"],
    } for line in sent])
    if state == cs.READY_TO_SUBMIT:
        repo.add_outbox(conn, "submit_case", case_id, now)
    timeline.record(conn, org_id=order["org_id"], order_id=order["id"], case_id=case_id, at=now,
                      event="case_opened", actor=actor.label,
                      detail={"state": state, "sequences": [line["sequence"] for line in sent]})
    refresh_order_status(conn, order["id"], now, **attention)


def refresh_order_status(conn: sa.Connection, order_id: str, now: dt.datetime,
                         **extra: Any) -> str:
    """Derive the order's status from its cases (api.md table under Cases)."""
    order = repo.order_row(conn, order_id)
    assert order is not None
    rows = repo.cases_of_order(conn, order_id)
    status = cs.order_status_from_cases(
        [(c["kind"], c["state"], None) for c in rows], order["status"])
    if status != order["status"] or extra:
        repo.update_order(conn, order_id, status=status, updated_at=now, **extra)
    return status


def apply_eligibility(services: Services, conn: sa.Connection, check: dict, status: str,
                      now: dt.datetime, *, plan_name: str | None = None,
                      auth_required: bool | None = None, errors: list | None = None) -> None:
    """Store an eligibility answer and move the order on (scenarios 1–4)."""
    repo.update_eligibility(conn, check["id"], status=status, answered_at=now,
                            plan_name=plan_name, auth_required=auth_required, errors=errors,
                            claimed_until=None)
    order = repo.lock_order(conn, check["order_id"])
    assert order is not None
    if order["status"] == "cancelled":
        return
    repo.update_order(conn, order["id"], eligibility_status=status, updated_at=now)
    timeline.record(conn, org_id=order["org_id"], order_id=order["id"], at=now,
                      event=f"eligibility_{status}", actor="system")
    if status == "active":
        open_cases(services, conn, {**order, "eligibility_status": status}, now,
                   Actor(org_id=order["org_id"], role="system"))
        return
    if status in REDETERMINING:
        for line in repo.order_lines(conn, order["id"]):
            det = after_eligibility(Determination.from_record(line["determination"]), status)
            repo.set_line_determination(conn, order["id"], line["sequence"], det.to_record())
        repo.update_order(conn, order["id"], status="coverage_problem",
                          attention_reason="coverage_problem", attention_since=now)
        return
    repo.update_order(conn, order["id"], status="needs_attention",
                      attention_reason="eligibility_error", attention_since=now)


def cancel_order(services: Services, actor: Actor, order_id: str, conn: sa.Connection) -> None:
    """Cancel an undecided order and its open case; the payer is told when it was sent."""
    now = clock.now()
    if True:
        order = repo.lock_order(conn, order_id)
        if order is None or order["org_id"] != actor.org_id:
            raise NotFound("order")
        if order["status"] == "cancelled":
            return
        if order["status"] in DECIDED:
            raise StateConflict("a decided order cannot be cancelled; withdraw the "
                                "authorization with POST /v1/cases/{id}/cancel",
                                current_state=order["status"])
        for case in repo.cases_of_order(conn, order_id):
            if not cs.is_open(case["state"]):
                continue
            was_sent = case["state"] not in (cs.NEEDS_INPUT, cs.READY_TO_SUBMIT)
            repo.update_case(conn, case["id"], state=cs.transition(case["state"], cs.CANCELLED),
                             next_poll_at=None, claimed_until=None, attention_reason=None,
                             attention_since=None, updated_at=now, decided_at=now)
            if was_sent:
                repo.add_outbox(conn, "cancel_case", case["id"], now)
            timeline.record(conn, org_id=order["org_id"], order_id=order_id,
                              case_id=case["id"], at=now, event="case_cancelled",
                              actor=actor.label, detail={"sent_to_payer": was_sent})
        repo.update_order(conn, order_id, status="cancelled", updated_at=now,
                          attention_reason=None, attention_since=None)
        timeline.record(conn, org_id=order["org_id"], order_id=order_id, at=now,
                          event="order_cancelled", actor=actor.label)
        repo.add_audit(conn, at=now, org_id=actor.org_id, token_id=actor.token_id,
                       role=actor.role, action="cancel", entity_type="order",
                       entity_id=order_id, patient_id=order["patient_id"], outcome="success",
                       request_id=actor.request_id, source_ip=actor.source_ip)
