"""Work with payers: eligibility, submission, polling, cancellation and payer callbacks.

Pattern for every step (reliability.md §4.3): claim the step with a conditional update that
sets a lease and commit; talk to the payer with no transaction open; then store the exchange,
the answer and the next work in one new transaction. Steps are idempotent: a redelivered or
duplicated message finds nothing to claim and returns.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import random
from collections.abc import Iterable
from pathlib import Path

import sqlalchemy as sa

from authsvc.adapters import attachment_files
from authsvc.adapters.db import repo
from authsvc.adapters.db import tables as t
from authsvc.bootstrap import Services
from authsvc.domain import cases as cs
from authsvc.domain import clock, deadlines, ids
from authsvc.domain.payer import (
    Attachment,
    ClaimLine,
    ClaimRequest,
    CoverageInfo,
    EligibilityRequest,
    ExchangeRecord,
    Party,
    PatientInfo,
    PayerAnswer,
    PayerFailure,
    PayerRejected,
    PayerUnavailable,
)
from authsvc.service_layer import failpoints, outcomes, timeline
from authsvc.service_layer.context import Actor
from authsvc.service_layer.orders import apply_eligibility, refresh_order_status

log = logging.getLogger(__name__)

CERTIFICATION_BY_KIND = {"initial": "I", "extension": "4", "appeal_standard": "2",
                         "appeal_immediate": "1", "resubmission": "I"}
#: New requests that follow an earlier one and carry its documents along: a resubmission
#: (the payer rejected the first for missing data, attached to it since) and an appeal.
CARRIES_RELATED_DOCUMENTS = frozenset({"resubmission", "appeal_standard", "appeal_immediate"})
APPEALS = frozenset({"appeal_standard", "appeal_immediate"})


db_now = repo.db_now  # the database's clock (reliability.md F16); see repo.db_now


def _lease(services: Services) -> dt.timedelta:
    return dt.timedelta(seconds=services.settings.lease_seconds)


def backoff_seconds(services: Services, attempt: int, retry_after: float | None) -> float:
    """Exponential backoff with full jitter, never sooner than the payer's Retry-After."""
    s = services.settings
    ceiling = min(s.retry_cap_seconds, s.retry_base_seconds * (2 ** max(attempt - 1, 0)))
    delay = random.uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


# ------------------------------------------------------------------ request building


def _patient_info(patient: dict) -> PatientInfo:
    return PatientInfo(mrn=patient["mrn"], given_name=patient["given_name"],
                       family_name=patient["family_name"], birth_date=patient["birth_date"],
                       sex=patient["sex"])


def _coverage(order: dict) -> CoverageInfo:
    return CoverageInfo(payer_id=order["payer_id"], member_id=order["member_id"],
                        group_number=order["group_number"])


def _parties(order: dict) -> tuple[Party, Party | None]:
    requester = Party(npi=order["requester_npi"], name=order["requester_name"])
    performer = (Party(npi=order["performer_npi"], name=order["performer_name"])
                 if order["performer_npi"] else None)
    return requester, performer


def _attachments(conn: sa.Connection, case_ids: str | list[str], unsent_only: bool,
                 folder: Path | None, with_data: bool = True) -> tuple[Attachment, ...]:
    """Documents attached to the case(s), from the database or the attachments folder,
    checked against their SHA-256 (`attachment_files.Unreadable` when a file is missing or
    altered: never send the payer other bytes than the ones the coordinator uploaded).
    Without `with_data` only their identities (an $inquire names them, never sends them)."""
    from authsvc.service_layer.case_actions import attachment_bytes

    a = t.attachments
    wanted = [case_ids] if isinstance(case_ids, str) else case_ids
    q = sa.select(a).where(a.c.case_id.in_(wanted)).order_by(a.c.created_at, a.c.id)
    if unsent_only:
        q = q.where(a.c.sent_at.is_(None))
    out = []
    for row in conn.execute(q).mappings():
        out.append(Attachment(attachment_id=row["id"], content_type=row["content_type"],
                              title=row["filename"],
                              data=attachment_bytes(dict(row), folder) if with_data else b"",
                              loinc=row["loinc"]))
    return tuple(out)


def _unreadable_document(conn: sa.Connection, case: dict, now: dt.datetime) -> None:
    """A document of the case can no longer be read as uploaded (its file is missing or was
    altered): nothing goes to the payer; the case waits for a coordinator (`error`,
    needs_attention `attachment_unreadable`) to re-upload it and resubmit."""
    # the claim just moved it to submitting (`case` is the row read before the claim)
    repo.update_case(conn, case["id"], state=cs.transition(cs.SUBMITTING, cs.ERROR),
                     claimed_until=None, last_error={"message": "attachment_unreadable"},
                     attention_reason="attachment_unreadable", attention_since=now,
                     updated_at=now)
    timeline.record(conn, org_id=case["org_id"], order_id=case["order_id"], case_id=case["id"],
                    at=now, event="case_error", actor="system",
                    detail={"reason": "attachment_unreadable"})
    refresh_order_status(conn, case["order_id"], now)


def _order_and_patient(conn: sa.Connection, order_id: str) -> tuple[dict, dict]:
    """The order and its patient, which every payer request is built from."""
    order = repo.order_row(conn, order_id)
    assert order is not None
    patient = repo.patient_row(conn, order["patient_id"])
    assert patient is not None
    return order, patient


def build_claim(conn: sa.Connection, case: dict, *, certification_type: str | None = None,
                with_lines: bool = True, unsent_attachments_only: bool = False,
                attachments_dir: Path | None = None, document_bytes: bool = True) -> ClaimRequest:
    order, patient = _order_and_patient(conn, case["order_id"])
    requester, performer = _parties(order)
    lines = tuple(
        ClaimLine(sequence=line["sequence"], code_system=line["code_system"], code=line["code"],
                  quantity=line["quantity"], service_start=line["service_start"],
                  service_end=line["service_end"])
        for line in repo.case_lines(conn, case["id"])
    ) if with_lines else ()
    documents_of = [case["id"]]
    if case["kind"] in CARRIES_RELATED_DOCUMENTS and case["related_case_id"] \
            and not unsent_attachments_only:
        documents_of.append(case["related_case_id"])
    return ClaimRequest(
        claim_identifier=case["id"],
        certification_type=certification_type or case["certification_type"],
        urgency=case["urgency"], patient=_patient_info(patient), coverage=_coverage(order),
        requester=requester, performer=performer, diagnoses=tuple(order["diagnoses"]),
        place_of_service=order["place_of_service"], lines=lines,
        attachments=_attachments(conn, documents_of, unsent_attachments_only, attachments_dir,
                                 document_bytes) if with_lines else (),
        related_claim_identifier=case["related_case_id"], created_at=case["created_at"],
        level_of_care=case["level_of_care"],
        note=case["reason"] if case["kind"] in APPEALS else None,
    )


# ------------------------------------------------------------------ eligibility


def run_eligibility(services: Services, check_id: str) -> None:
    """Ask the payer whether coverage is active on the date of service (scenario 4)."""
    with services.engine.begin() as conn:
        now = db_now(conn)
        if not repo.claim_eligibility(conn, check_id, now, _lease(services)):
            return
        check = repo.eligibility_row(conn, check_id)
        assert check is not None
        order, patient = _order_and_patient(conn, check["order_id"])
        requester, _ = _parties(order)
        request = EligibilityRequest(
            request_id=check_id, patient=_patient_info(patient), coverage=_coverage(order),
            requester=requester, date_of_service=check["date_of_service"],
            codes=tuple((line["code_system"], line["code"])
                        for line in repo.order_lines(conn, order["id"])))
    records: list[ExchangeRecord] = []
    answer = failure = None
    try:
        answer = services.adapter(order["payer_id"], records.append).check_eligibility(request)
    except PayerFailure as exc:
        failure = exc
    with services.engine.begin() as conn:
        now = db_now(conn)
        repo.record_exchanges(conn, records, payer_id=order["payer_id"], org_id=order["org_id"],
                              order_id=order["id"], case_id=None)
        if answer is not None and answer.status != "error":
            errors = [dataclasses.asdict(e) for e in answer.errors] or None
            apply_eligibility(services, conn, check, answer.status, now,
                              plan_name=answer.plan_name, auth_required=answer.auth_required,
                              errors=errors)
            return
        attempts = check["attempts"] + 1
        if attempts < services.settings.submit_max_attempts and (
                failure is None or failure.retryable):
            retry_after = getattr(failure, "retry_after", None)
            at = now + dt.timedelta(seconds=backoff_seconds(services, attempts, retry_after))
            repo.update_eligibility(conn, check_id, claimed_until=None, next_attempt_at=at)
            repo.add_outbox(conn, "run_eligibility", check_id, now, available_at=at)
            return
        apply_eligibility(services, conn, check, "error", now,
                          errors=[{"message": type(failure).__name__ if failure else "error"}])


# ------------------------------------------------------------------ submission


def submit_case(services: Services, case_id: str) -> None:
    """Send a ready case to the payer exactly once, whatever crashes in between."""
    with services.engine.begin() as conn:
        now = db_now(conn)
        before = repo.lock_case(conn, case_id)
        if before is None or not repo.claim_case(
                conn, case_id, (cs.READY_TO_SUBMIT, cs.SUBMITTING), cs.SUBMITTING, now,
                _lease(services), due_column="next_attempt_at"):
            return
        case = before  # the claim changed only state, lease and counters: nothing read below
        update = bool(case["update_pending"])
        try:
            claim = build_claim(conn, case, unsent_attachments_only=update,
                                attachments_dir=services.settings.attachments_dir)
        except attachment_files.Unreadable:
            _unreadable_document(conn, case, now)
            return
        # A lease left behind means the previous attempt died mid-call: it may have reached
        # the payer. Like a lost answer, that is settled by asking before resending.
        ask_first = bool(before["submission_unknown"]) or (
            before["state"] == cs.SUBMITTING and before["claimed_until"] is not None)
    breaker = services.breaker(case["payer_id"])
    wait_until = breaker.allow(clock.now())
    if wait_until is not None:
        _wait_for_breaker(services, case_id, wait_until, keep_unknown=ask_first)
        return
    failpoints.hit("BEFORE_SUBMIT")
    records: list[ExchangeRecord] = []
    adapter = services.adapter(case["payer_id"], records.append)
    answer: PayerAnswer | None = None
    failure: PayerFailure | None = None
    try:
        if update:
            # An update answering an info request; resending the same Bundle is harmless.
            answer = adapter.update(claim)
        else:
            if ask_first:
                answer = adapter.inquire(claim)
            if answer is None:
                answer = adapter.submit(claim)
    except PayerFailure as exc:
        failure = exc
    if failure is not None and failure.retryable:
        breaker.failure(clock.now())
    else:
        breaker.success()
    failpoints.hit("AFTER_PAYER_BEFORE_COMMIT")
    with services.engine.begin() as conn:
        now = db_now(conn)
        case = repo.lock_case(conn, case_id)
        assert case is not None
        repo.record_exchanges(conn, records, payer_id=case["payer_id"], org_id=case["org_id"],
                              order_id=case["order_id"], case_id=case_id)
        if case["state"] != cs.SUBMITTING:
            return  # cancelled meanwhile, or another worker already stored the answer
        if answer is not None:
            if update and not answer.rejected:
                _mark_update_sent(conn, case, claim, now)
            apply_answer(services, conn, case, answer, now,
                         source="update" if update else "submit")
        elif isinstance(failure, PayerRejected):
            _reject(conn, case, now, http_status=failure.http_status,
                    errors=[dataclasses.asdict(e) for e in failure.errors])
        else:
            assert failure is not None
            _retry_or_error(services, conn, case, failure, now)
    failpoints.hit("AFTER_COMMIT")


def _wait_for_breaker(services: Services, case_id: str, until: dt.datetime,
                      keep_unknown: bool) -> None:
    """The payer looks down: put the claimed step back without spending an attempt."""
    wait = max(until - clock.now(), dt.timedelta(0))  # the breaker keeps this process's time
    with services.engine.begin() as conn:
        now = db_now(conn)
        until = now + wait
        case = repo.lock_case(conn, case_id)
        if case is None or case["state"] != cs.SUBMITTING:
            return
        # A previous attempt that may have reached the payer must still be asked about.
        repo.update_case(conn, case_id, claimed_until=None, next_attempt_at=until,
                         attempts=max(case["attempts"] - 1, 0), updated_at=now,
                         submission_unknown=bool(case["submission_unknown"]) or keep_unknown)
        repo.add_outbox(conn, "submit_case", case_id, now, available_at=until)


def _mark_update_sent(conn: sa.Connection, case: dict, claim: ClaimRequest,
                      now: dt.datetime) -> None:
    """The payer has the documents: mark them sent and the info request answered."""
    sent = [a.attachment_id for a in claim.attachments]
    if sent:
        conn.execute(t.attachments.update().where(t.attachments.c.id.in_(sent))
                     .values(sent_at=now))
    conn.execute(t.info_requests.update().where(
        t.info_requests.c.case_id == case["id"], t.info_requests.c.answered_at.is_(None),
    ).values(answered_at=now))
    repo.update_case(conn, case["id"], update_pending=False)
    timeline.record(conn, org_id=case["org_id"], order_id=case["order_id"],
                      case_id=case["id"], at=now, event="update_sent", actor="system",
                      detail={"attachments": len(sent)})


def _retry_or_error(services: Services, conn: sa.Connection, case: dict,
                    failure: PayerFailure, now: dt.datetime) -> None:
    unknown = not isinstance(failure, PayerUnavailable)
    last_error = {"http_status": failure.http_status, "message": type(failure).__name__}
    if case["attempts"] >= services.settings.submit_max_attempts:
        repo.update_case(conn, case["id"], state=cs.transition(case["state"], cs.ERROR),
                         claimed_until=None, submission_unknown=unknown or bool(
                             case["submission_unknown"]), last_error=last_error,
                         attention_reason="error", attention_since=now, updated_at=now)
        timeline.record(conn, org_id=case["org_id"], order_id=case["order_id"],
                          case_id=case["id"], at=now, event="case_error", actor="system",
                          detail={"attempts": case["attempts"]})
        refresh_order_status(conn, case["order_id"], now)
        return
    retry_after = getattr(failure, "retry_after", None)
    at = now + dt.timedelta(seconds=backoff_seconds(services, case["attempts"], retry_after))
    repo.update_case(conn, case["id"], claimed_until=None, next_attempt_at=at,
                     submission_unknown=unknown or bool(case["submission_unknown"]),
                     last_error=last_error, updated_at=now)
    repo.add_outbox(conn, "submit_case", case["id"], now, available_at=at)
    timeline.record(conn, org_id=case["org_id"], order_id=case["order_id"], case_id=case["id"],
                      at=now, event="submission_retry_scheduled", actor="system",
                      detail={"attempt": case["attempts"], "http_status": failure.http_status})


def _reject(conn: sa.Connection, case: dict, now: dt.datetime, *, http_status: int | None,
            errors: list[dict]) -> None:
    first = errors[0] if errors else {}
    repo.update_case(conn, case["id"], state=cs.transition(case["state"], cs.REJECTED),
                     claimed_until=None, next_poll_at=None, attention_reason="rejected",
                     attention_since=now, updated_at=now, submission_unknown=False,
                     last_error={"http_status": http_status, "aaa_code": first.get("code"),
                                 "followup": first.get("followup"),
                                 "element": first.get("element"), "path": first.get("path"),
                                 "message": first.get("message")})
    timeline.record(conn, org_id=case["org_id"], order_id=case["order_id"], case_id=case["id"],
                      at=now, event="case_rejected", actor="payer",
                      detail={"aaa_code": first.get("code"), "followup": first.get("followup")})
    refresh_order_status(conn, case["order_id"], now)


# ------------------------------------------------------------------ applying answers


def apply_answer(services: Services, conn: sa.Connection, case: dict, answer: PayerAnswer,
                 now: dt.datetime, *, source: str) -> str:
    """Store the payer's answer on a (locked) case and fan out to the next state.

    Returns what happened: `applied`, `ignored_final`, `ignored_stale` or `rejected`.
    """
    if cs.is_final(case["state"]):
        timeline.record(conn, org_id=case["org_id"], order_id=case["order_id"],
                          case_id=case["id"], at=now, event="payer_update_ignored",
                          actor="payer", detail={"source": source, "state": case["state"]})
        return "ignored_final"
    if (answer.event_number is not None and case["last_event_number"] is not None
            and answer.event_number <= case["last_event_number"]):
        timeline.record(conn, org_id=case["org_id"], order_id=case["order_id"],
                          case_id=case["id"], at=now, event="payer_update_ignored",
                          actor="payer", detail={"source": source, "reason": "older event"})
        return "ignored_stale"
    first_receipt = case["payer_received_at"] is None
    payer_received_at = case["payer_received_at"] or now
    cfg = services.payers.get(case["payer_id"])
    due = deadlines.decision_due_at(payer_received_at, case["urgency"],
                                    cfg.cms0057_impacted if cfg else True)
    common = {"payer_received_at": payer_received_at, "decision_due_at": due,
              "submitted_at": case["submitted_at"] or now, "claimed_until": None,
              "submission_unknown": False, "updated_at": now}
    if answer.event_number is not None:
        common["last_event_number"] = answer.event_number
    if answer.rejected:
        errors = [dataclasses.asdict(e) for e in answer.errors]
        if first_receipt:
            repo.update_case(conn, case["id"], submitted_at=now)
        _reject(conn, {**case}, now, http_status=200, errors=errors)
        return "rejected"

    by_seq = {d.sequence: d for d in answer.lines}
    lines = repo.case_lines(conn, case["id"])
    for line in lines:
        d = by_seq.get(line["sequence"])
        if d is None:
            continue
        values = {
            "review_action": d.review_action, "auth_number": d.auth_number,
            "authorized_quantity": d.authorized_quantity, "valid_from": d.valid_from,
            "valid_to": d.valid_to, "administration_ref": d.administration_ref,
            "denial_code": d.denial_reason.code if d.denial_reason else None,
            "denial_text": (d.denial_reason.text or "")[:500] if d.denial_reason else None,
            "decided_at": now if d.review_action in outcomes.OUTCOME_BY_ACTION else None,
        }
        repo.update_case_line(conn, case["id"], line["sequence"], **values)
        line.update(values)
    if answer.info_request is not None:
        _record_info_request(conn, case, answer, now)
    new_state = cs.aggregate([line["review_action"] for line in lines],
                             info_request_open=answer.info_request is not None)
    if new_state == case["state"]:
        repo.update_case(conn, case["id"], **common, **_poll_fields(services, case, now))
        return "applied"
    if not cs.can_transition(case["state"], new_state):
        timeline.record(conn, org_id=case["org_id"], order_id=case["order_id"],
                          case_id=case["id"], at=now, event="payer_update_ignored",
                          actor="payer", detail={"source": source, "proposed": new_state})
        return "ignored_stale"
    attention = cs.attention_for(new_state, [line["review_action"] for line in lines])
    values = {**common, "state": new_state,
              "attention_reason": attention, "attention_since": now if attention else None}
    if cs.is_final(new_state):
        values.update(decided_at=now, next_poll_at=None)
    else:
        values.update(_poll_fields(services, {**case, "poll_attempts": 0}, now))
    repo.update_case(conn, case["id"], **values)
    detail: dict = {"source": source, "review_actions":
                    {str(line["sequence"]): line["review_action"] for line in lines}}
    if new_state == cs.CONTACT_PAYER:  # what the payer wants discussed on the phone
        detail["payer_reasons"] = {
            str(line["sequence"]): {"code": line["denial_code"], "text": line["denial_text"]}
            for line in lines if line["review_action"] == "CT"}
    timeline.record(conn, org_id=case["org_id"], order_id=case["order_id"], case_id=case["id"],
                    at=now, event=f"case_{new_state}", actor="payer", detail=detail)
    if cs.is_final(new_state):
        order = repo.order_row(conn, case["order_id"])
        assert order is not None
        outcomes.emit_case_decision(conn, order, case, lines, now)
    if new_state in cs.AUTHORIZED and case["related_case_id"]:
        _supersede(conn, case, now)
    refresh_order_status(conn, case["order_id"], now)
    return "applied"


def _record_info_request(conn: sa.Connection, case: dict, answer: PayerAnswer,
                         now: dt.datetime) -> None:
    info = answer.info_request
    assert info is not None
    ir = t.info_requests
    open_one = conn.execute(sa.select(ir.c.id).where(
        ir.c.case_id == case["id"], ir.c.answered_at.is_(None))).first()
    if open_one is None:
        conn.execute(ir.insert().values(id=ids.new_id("info"), case_id=case["id"],
                                        codes=list(info.codes), text=(info.text or "")[:1000],
                                        requested_at=now))


def _supersede(conn: sa.Connection, case: dict, now: dt.datetime) -> None:
    """A linked case (extension, appeal, resubmission) that is granted replaces the older."""
    older = repo.lock_case(conn, case["related_case_id"])
    if older is None or not cs.can_transition(older["state"], cs.SUPERSEDED):
        return
    repo.update_case(conn, older["id"], state=cs.SUPERSEDED, attention_reason=None,
                     attention_since=None, next_poll_at=None, updated_at=now)
    timeline.record(conn, org_id=older["org_id"], order_id=older["order_id"],
                      case_id=older["id"], at=now, event="case_superseded", actor="system",
                      detail={"by": case["id"]})


def _poll_fields(services: Services, case: dict, now: dt.datetime) -> dict:
    cfg = services.payers.get(case["payer_id"])
    schedule = list(getattr(cfg, "poll_schedule_seconds", None) or [60, 300, 900, 3600, 14400])
    step = schedule[min(case["poll_attempts"], len(schedule) - 1)]
    return {"next_poll_at": now + dt.timedelta(seconds=step),
            "poll_attempts": case["poll_attempts"] + 1}


# ------------------------------------------------------------------ polling


def poll_case(services: Services, case_id: str) -> None:
    """The sparse `$inquire` fallback for cases waiting on the payer's notification."""
    with services.engine.begin() as conn:
        now = db_now(conn)
        case = repo.case_row(conn, case_id)
        if case is None or case["state"] not in (cs.SUBMITTED, cs.PENDED):
            return
        if not repo.claim_case(conn, case_id, (case["state"],), case["state"], now,
                               _lease(services), due_column="next_poll_at"):
            return
        claim = build_claim(conn, case, document_bytes=False)  # $inquire sends no documents
    records: list[ExchangeRecord] = []
    answer = None
    try:
        answer = services.adapter(case["payer_id"], records.append).inquire(claim)
    except PayerFailure:
        answer = None
    with services.engine.begin() as conn:
        now = db_now(conn)
        case = repo.lock_case(conn, case_id)
        assert case is not None
        repo.record_exchanges(conn, records, payer_id=case["payer_id"], org_id=case["org_id"],
                              order_id=case["order_id"], case_id=case_id)
        if answer is not None and not cs.is_final(case["state"]):
            result = apply_answer(services, conn, case, answer, now, source="inquire")
            if result == "applied":
                fresh = repo.case_row(conn, case_id)
                if fresh is not None and fresh["state"] in (cs.SUBMITTED, cs.PENDED):
                    repo.update_case(conn, case_id, claimed_until=None,
                                     **_poll_fields(services, case, now))
                return
        if not cs.is_final(case["state"]):
            repo.update_case(conn, case_id, claimed_until=None, **_poll_fields(services, case, now))


# ------------------------------------------------------------------ cancellation


def cancel_at_payer(services: Services, case_id: str) -> None:
    """Tell the payer a sent case was cancelled (PAS certificationType 3, no items)."""
    with services.engine.connect() as conn:
        case = repo.case_row(conn, case_id)
        if case is None or case["state"] != cs.CANCELLED:
            return
        if any(x["kind"] == "cancel" and x["http_status"] == 200
               for x in repo.exchanges_of_case(conn, case_id)):
            return
        claim = build_claim(conn, case, certification_type="3", with_lines=False)
    records: list[ExchangeRecord] = []
    failure = None
    try:
        services.adapter(case["payer_id"], records.append).cancel(claim)
    except PayerFailure as exc:
        failure = exc
    with services.engine.begin() as conn:
        now = db_now(conn)
        repo.record_exchanges(conn, records, payer_id=case["payer_id"], org_id=case["org_id"],
                              order_id=case["order_id"], case_id=case_id)
        timeline.record(conn, org_id=case["org_id"], order_id=case["order_id"],
                          case_id=case_id, at=now,
                          event="cancel_sent" if failure is None else "cancel_send_failed",
                          actor="system")
        if failure is not None and failure.retryable:
            repo.add_outbox(conn, "cancel_case", case_id, now,
                            available_at=now + dt.timedelta(seconds=backoff_seconds(
                                services, 1, getattr(failure, "retry_after", None))))


# ------------------------------------------------------------------ payer callbacks


def handle_notification(services: Services, payer_id: str, webhook_id: str,
                        answer: PayerAnswer) -> str:
    """Apply a verified payer notification once; duplicates and stale events are absorbed."""
    from authsvc.adapters.db import tables as t

    with services.engine.begin() as conn:
        now = db_now(conn)
        ce = t.callback_events
        existing = conn.execute(sa.select(ce.c.id).where(
            ce.c.payer_id == payer_id, ce.c.webhook_id == webhook_id)).first()
        if existing is not None:
            conn.execute(ce.update().where(ce.c.id == existing.id)
                         .values(duplicate_count=ce.c.duplicate_count + 1))
            return "duplicate"
        case = repo.lock_case(conn, answer.claim_identifier) if answer.claim_identifier else None
        if case is None or case["payer_id"] != payer_id:
            conn.execute(ce.insert().values(payer_id=payer_id, webhook_id=webhook_id,
                                            received_at=now, duplicate_count=0,
                                            result="unknown_case"))
            return "unknown_case"
        if case["state"] in (cs.SUBMITTING,) and case["payer_received_at"] is None:
            result = "too_early"
        else:
            result = apply_answer(services, conn, case, answer, now, source="notification")
        conn.execute(ce.insert().values(payer_id=payer_id, webhook_id=webhook_id,
                                        case_id=case["id"], received_at=now,
                                        duplicate_count=0, result=result))
        repo.add_audit(conn, at=now, org_id=case["org_id"], role="payer", action="update",
                       entity_type="case", entity_id=case["id"], outcome="success")
        return result


def register_subscriptions(services: Services, payer_ids: Iterable[str]) -> set[str]:
    """One PAS Subscription per payer, pointing at our callback endpoint (rest-hook).

    Returns the payers registered now; the scheduler retries the others later.
    """
    from authsvc.adapters.db import tables as t

    done: set[str] = set()
    for payer_id in payer_ids:
        url = f"{services.settings.public_url}/v1/payer-callbacks/{payer_id}"
        records: list[ExchangeRecord] = []
        try:
            sub_id = services.adapter(payer_id, records.append).register_subscription(url)
        except PayerFailure:
            log.warning("subscription registration failed", extra={"payer_id": payer_id})
            continue
        with services.engine.begin() as conn:
            now = db_now(conn)
            conn.execute(t.payer_subscriptions.delete().where(
                t.payer_subscriptions.c.payer_id == payer_id))
            conn.execute(t.payer_subscriptions.insert().values(
                payer_id=payer_id, subscription_id=sub_id, callback_url=url, registered_at=now))
            repo.record_exchanges(conn, records, payer_id=payer_id, org_id=None, order_id=None,
                                  case_id=None)
        done.add(payer_id)
    return done


def system_actor(org_id: str) -> Actor:
    return Actor(org_id=org_id, role="system")
