"""Coordinator actions on a case (api.md › Cases), one transaction each.

Every action locks the case, checks the caller's organization (another organization's case
is "not found") and the case state (409 with the current state), writes the timeline and an
audit event, and refreshes the order's status after a state change. Concurrent actions are
serialized by the row lock and the state checks; there is no If-Match.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import logging
import unicodedata
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from authsvc.adapters.db import repo
from authsvc.adapters.db import repo_cases as rc
from authsvc.bootstrap import Services
from authsvc.domain import cases as cs
from authsvc.domain import clock, ids
from authsvc.domain.determination import SENT_PA, Determination
from authsvc.domain.errors import NotFound, StateConflict
from authsvc.domain.payer import DenialReason, LineDecision, PayerAnswer
from authsvc.service_layer import outcomes, payer_work, timeline
from authsvc.service_layer.context import Actor
from authsvc.service_layer.orders import refresh_order_status

log = logging.getLogger(__name__)

MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024
DECISION_STATES = frozenset({cs.SUBMITTED, cs.PENDED, cs.INFO_REQUESTED, cs.CONTACT_PAYER,
                             cs.ERROR})
APPEALABLE = frozenset({cs.DENIED, cs.PARTIALLY_APPROVED, cs.MODIFIED})
RESUBMITTABLE = frozenset({cs.REJECTED, cs.ERROR})
NO_RESUBMIT_FOLLOWUPS = frozenset({"N", "S", "Y"})
APPROVED_ACTIONS = frozenset({"A1", "A2", "A6"})
ACTION_BY_OUTCOME = {"approved": "A1", "denied": "A3", "modified": "A6"}
APPEAL_KINDS = {"standard": ("appeal_standard", "2"), "immediate": ("appeal_immediate", "1")}

#: magic bytes → content type; anything else is refused (415).
MAGIC = (
    (b"%PDF-", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


class Invalid(ValueError):
    """A well-formed request that does not fit this case (HTTP 422 naming the fields)."""

    def __init__(self, message: str, errors: list[dict]):
        super().__init__(message)
        self.errors = errors


class UnsupportedMedia(ValueError):
    """The uploaded bytes are none of the accepted document types (HTTP 415)."""


def sniff(data: bytes) -> str:
    """The content type from the file's first bytes; the client's claim is not trusted."""
    for magic, ctype in MAGIC:
        if data.startswith(magic):
            return ctype
    raise UnsupportedMedia("only PDF, PNG, JPEG and TIFF documents are accepted")


def _locked(conn: sa.Connection, actor: Actor, case_id: str) -> dict:
    case = repo.lock_case(conn, case_id)
    if case is None or case["org_id"] != actor.org_id:
        raise NotFound("case")
    return case


def _audit(conn: sa.Connection, actor: Actor, case: dict, now: dt.datetime, action: str,
           reason: str) -> None:
    order = repo.order_row(conn, case["order_id"])
    repo.add_audit(conn, at=now, org_id=actor.org_id, token_id=actor.token_id, role=actor.role,
                   action=action, entity_type="case", entity_id=case["id"],
                   patient_id=order["patient_id"] if order else None, outcome="success",
                   request_id=actor.request_id, source_ip=actor.source_ip, reason=reason)


def _timeline(conn: sa.Connection, case: dict, now: dt.datetime, event: str, actor: Actor,
              detail: dict | None = None) -> None:
    """Through timeline.record, so a coordinator's action notifies and announces (webhooks)
    exactly as the same event raised by a worker would."""
    timeline.record(conn, org_id=case["org_id"], order_id=case["order_id"], case_id=case["id"],
                    at=now, event=event, actor=actor.label, detail=detail)


def _who(actor: Actor) -> str:
    return actor.name or actor.label


# ------------------------------------------------------------------ assign, notes, resolve


def assign(actor: Actor, conn: sa.Connection, case_id: str, assignee: str | None) -> None:
    """Set or clear the free-text assignee (any state: closed cases may need follow-up)."""
    now = clock.now()
    case = _locked(conn, actor, case_id)
    repo.update_case(conn, case_id, assignee=assignee, updated_at=now)
    _timeline(conn, case, now, "case_assigned" if assignee else "case_unassigned", actor,
              {"assignee": assignee})
    _audit(conn, actor, case, now, "update", "assign")


def add_note(actor: Actor, conn: sa.Connection, case_id: str, text: str) -> str:
    now = clock.now()
    case = _locked(conn, actor, case_id)
    note_id = ids.new_id("note")
    rc.add_note(conn, {"id": note_id, "org_id": case["org_id"], "case_id": case_id,
                       "author": _who(actor), "text": text, "created_at": now})
    _timeline(conn, case, now, "note_added", actor, {"note_id": note_id})
    _audit(conn, actor, case, now, "update", "note")
    return note_id


def resolve(actor: Actor, conn: sa.Connection, case_id: str, note: str | None) -> None:
    """Clear needs_attention; the note goes to the timeline. A no-op when nothing is set."""
    now = clock.now()
    case = _locked(conn, actor, case_id)
    reason = case["attention_reason"]
    if reason is not None:
        repo.update_case(conn, case_id, attention_reason=None, attention_since=None,
                         updated_at=now)
    _timeline(conn, case, now, "attention_resolved", actor, {"reason": reason, "note": note})
    _audit(conn, actor, case, now, "update", "resolve")


# ------------------------------------------------------------------ attachments

from pathlib import Path  # noqa: E402 - attachment storage only (keeps this edit local)


def _lock_content(conn: sa.Connection, org_name: str, sha256: str) -> None:
    """Serialize everything that writes or deletes one stored file: held from the write to
    the commit of the row that refers to it (SQLite: every write transaction already is).
    Keyed by the organization's directory name (`attachment_files.org_dir`) and the content
    hash, which the sweep knows even for an organization it has no row of."""
    if conn.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"{org_name}/{sha256}".encode()).digest()[:4],
                             "big", signed=True)
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7204313, :k)"), {"k": key})


def add_attachment(actor: Actor, conn: sa.Connection, case_id: str, *, filename: str,
                   data: bytes, loinc: str | None = None, folder: Path | None = None) -> str:
    """Store a document and move the case on (needs_input → ready, info_requested → update).

    With `folder` (AUTHSVC_ATTACHMENTS_DIR) the bytes go to a content-addressed file there
    (`data` NULL, `storage_path` set), written after every check and under the content's
    lock; a transaction that then fails leaves a file no row refers to, which the caller
    removes with `discard_unreferenced` (the API does) or `sweep_attachment_files` finds.
    """
    from authsvc.adapters import attachment_files

    now = clock.now()
    content_type = sniff(data)
    case = _locked(conn, actor, case_id)
    if cs.is_final(case["state"]):
        raise StateConflict("documents cannot be added to a final case",
                            current_state=case["state"])
    info_request_id = None
    state = case["state"]
    if state == cs.INFO_REQUESTED:
        info_request_id = rc.answer_info_requests(conn, case_id, now)
    attachment_id = ids.new_id("att")
    sha256 = hashlib.sha256(data).hexdigest()
    stored: dict[str, Any] = {"data": data, "storage_path": None}
    if folder is not None:
        _lock_content(conn, attachment_files.org_dir(case["org_id"]), sha256)
        attachment_files.put(folder, case["org_id"], data)
        # relative to the attachments root: hosts may mount the folder at other paths
        stored = {"data": None,
                  "storage_path": str(attachment_files.relative_path(case["org_id"], sha256))}
    rc.insert_attachment(conn, {
        "id": attachment_id, "org_id": case["org_id"], "case_id": case_id,
        "info_request_id": info_request_id, "filename": filename[:255] or "document",
        "content_type": content_type, "size": len(data),
        "sha256": sha256, "loinc": loinc, **stored,
        "created_by": actor.label, "created_at": now,
    })
    effect = "kept_for_next_send"
    if state == cs.NEEDS_INPUT:
        repo.update_case(conn, case_id, state=cs.transition(state, cs.READY_TO_SUBMIT),
                         updated_at=now)
        repo.add_outbox(conn, "submit_case", case_id, now)
        effect = "ready_to_submit"
    elif state == cs.INFO_REQUESTED:
        values: dict[str, Any] = {
            "state": cs.transition(state, cs.SUBMITTING), "update_pending": True,
            "next_attempt_at": None, "claimed_until": None, "updated_at": now}
        if case["attention_reason"] == "info_requested":
            values.update(attention_reason=None, attention_since=None)
        repo.update_case(conn, case_id, **values)
        repo.add_outbox(conn, "submit_case", case_id, now)
        effect = "update_sent"
    _timeline(conn, case, now, "attachment_added", actor,
              {"attachment_id": attachment_id, "content_type": content_type,
               "size": len(data), "effect": effect})
    _audit(conn, actor, case, now, "update", "attachment")
    if effect != "kept_for_next_send":
        refresh_order_status(conn, case["order_id"], now)
    return attachment_id


def attachment_bytes(row: dict, folder: Path | None = None) -> bytes:
    """A stored document's bytes, from the database or its file (checked against the row's
    SHA-256: `attachment_files.Unreadable` when missing or altered). An absolute
    `storage_path` is read as is; a relative one under `folder` (AUTHSVC_ATTACHMENTS_DIR)."""
    from authsvc.adapters import attachment_files

    if row["data"] is not None or not row["storage_path"]:
        return bytes(row["data"] or b"")
    try:
        path = attachment_files.stored_path(folder, row["storage_path"])
    except ValueError:
        raise attachment_files.Unreadable("no attachments folder configured") from None
    return attachment_files.read(str(path), row["sha256"])


def _referenced(conn: sa.Connection, org_name: str, sha256: str) -> bool:
    """Does an attachment row of the organization stored in directory `org_name` refer to
    this content? Decided by (organization, SHA-256), never by comparing path strings (the
    same file has many names: a symlink, another mount, a relative root). Call it under the
    content's lock; it reads the organizations then, so one whose first upload committed a
    moment ago counts."""
    from authsvc.adapters import attachment_files

    a = rc.t.attachments
    orgs = [org_name]  # a plainly safe id is its own directory name
    if org_name.startswith("h-"):  # or a hash of an unusual id: which one, only rows tell
        orgs += [o for o in conn.execute(sa.select(a.c.org_id).distinct()).scalars()
                 if attachment_files.org_dir(o) == org_name]
    return conn.execute(sa.select(a.c.id).where(
        a.c.org_id.in_(orgs), a.c.sha256 == sha256, a.c.storage_path.is_not(None)).limit(1)
    ).first() is not None


def _discard(engine: sa.Engine, root: Path, org_name: str, sha256: str) -> bool:
    path = root / org_name / sha256[:2] / sha256
    with engine.begin() as conn:
        _lock_content(conn, org_name, sha256)
        if not path.exists() or _referenced(conn, org_name, sha256):
            return False
        path.unlink(missing_ok=True)
        return True


def clean_filename(raw: str | None) -> str:
    """The name a document is stored under: the last path part, without control or
    formatting characters (Unicode Cc and Cf: e.g. U+202E, which shows "fdp.exe" as
    "exe.pdf"), nor line or paragraph separators; "document" when nothing is left."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name
                   if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp")).strip()
    return name[:255].strip() or "document"


class StorageFull(Exception):
    """The attachments folder's disk (or quota) is full: nothing was saved."""


@contextlib.contextmanager
def upload_guard(engine: sa.Engine, folder: Path | None, org_id: str,
                 data: bytes) -> Iterator[None]:
    """Around an upload's transaction: when it does not commit, the file it may have written
    is removed (unless another row refers to the same content), and a full disk becomes
    `StorageFull`. The API and the dashboard upload through it alike."""
    try:
        yield
    except BaseException as exc:
        if folder is not None:
            try:
                discard_unreferenced(engine, folder, org_id, hashlib.sha256(data).hexdigest())
            except Exception:  # noqa: BLE001 - the sweep gets it; answer the first error
                log.warning("attachment cleanup deferred to the sweep")
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("attachment storage full (%s)", errno.errorcode.get(exc.errno or 0, "?"))
            raise StorageFull from None
        raise


def discard_unreferenced(engine: sa.Engine, folder: Path, org_id: str, sha256: str) -> bool:
    """Delete the stored file of this content unless an attachment row refers to it (after a
    failed upload transaction); True when a file was deleted. Takes the content's lock, so a
    concurrent upload of the same bytes either commits its row first or writes the file
    again after."""
    from authsvc.adapters import attachment_files

    attachment_files.relative_path(org_id, sha256)  # ValueError for a malformed digest
    return _discard(engine, Path(folder).absolute(), attachment_files.org_dir(org_id), sha256)


def sweep_attachment_files(engine: sa.Engine, folder: Path, *,
                           temporaries_after_s: float = 3600) -> dict[str, int]:
    """Remove what a crash between a file write and its commit can leave in the folder:
    files no attachment row refers to, and temporary files older than the grace period.
    Every file is judged under its content lock by (organization directory, SHA-256), also
    for an organization with no row yet, so it is safe while uploads run (see
    `discard_unreferenced`) and whatever name the folder is reached by."""
    from authsvc.adapters import attachment_files

    root = Path(folder).absolute()  # once: every path below is built from it
    removed = {"files": 0, "temporaries": 0}
    for org_name, sha256, _path in attachment_files.stored_files(root):
        removed["files"] += _discard(engine, root, org_name, sha256)
    for tmp in attachment_files.stale_temporaries(root, temporaries_after_s):
        tmp.unlink(missing_ok=True)
        removed["temporaries"] += 1
    return removed


# ------------------------------------------------------------------ decisions by phone/fax


def record_decision(services: Services, actor: Actor, conn: sa.Connection, case_id: str,
                    body: dict) -> None:
    """A decision received outside the API, applied exactly like a payer's answer."""
    now = clock.now()
    case = _locked(conn, actor, case_id)
    if case["state"] not in DECISION_STATES:
        raise StateConflict("a decision can be recorded only while the payer is deciding",
                            current_state=case["state"])
    sequences = {line["sequence"] for line in repo.case_lines(conn, case_id)}
    unknown = [i for i, d in enumerate(body["lines"]) if d["sequence"] not in sequences]
    if unknown:
        raise Invalid("a line is not on this case", [
            {"field": f"lines[{i}].sequence", "code": "unknown_code",
             "message": "no line with this sequence on the case"} for i in unknown])
    decisions = []
    for d in body["lines"]:
        reason = d.get("denial_reason")
        decisions.append(LineDecision(
            sequence=d["sequence"], review_action=ACTION_BY_OUTCOME[d["outcome"]],
            auth_number=d.get("auth_number"), authorized_quantity=d.get("authorized_quantity"),
            valid_from=d.get("valid_from"), valid_to=d.get("valid_to"),
            denial_reason=DenialReason(reason.get("code"), reason.get("text")) if reason else None,
        ))
    answer = PayerAnswer(outcome="complete", lines=tuple(decisions), claim_identifier=case_id)
    result = payer_work.apply_answer(services, conn, case, answer, now, source="manual")
    fresh = repo.case_row(conn, case_id)
    assert fresh is not None
    _timeline(conn, case, now, "decision_recorded", actor, {
        "reference": body.get("reference"), "received_via": body["received_via"],
        "who": _who(actor), "result": result, "state": fresh["state"]})
    _audit(conn, actor, case, now, "decide", "manual_decision")
    refresh_order_status(conn, case["order_id"], now)


# ------------------------------------------------------------------ linked cases


def _open_linked(conn: sa.Connection, order: dict, case: dict, now: dt.datetime, *, kind: str,
                 certification_type: str, lines: list[dict], actor: Actor,
                 **extra: Any) -> str:
    new_id = ids.new_id("case")
    repo.insert_case(conn, {
        "id": new_id, "org_id": case["org_id"], "order_id": case["order_id"],
        "payer_id": case["payer_id"], "kind": kind, "related_case_id": case["id"],
        "certification_type": certification_type, "urgency": extra.pop("urgency",
                                                                      case["urgency"]),
        "state": cs.READY_TO_SUBMIT, "created_at": now, "updated_at": now, **extra,
    }, [{
        "sequence": line["sequence"], "code_system": line["code_system"], "code": line["code"],
        "quantity": line["quantity"], "service_start": line["service_start"],
        "service_end": line["service_end"],
    } for line in lines])
    repo.add_outbox(conn, "submit_case", new_id, now)
    timeline.record(conn, org_id=case["org_id"], order_id=order["id"], case_id=new_id, at=now,
                    event="case_opened", actor=actor.label,
                    detail={"state": cs.READY_TO_SUBMIT, "kind": kind,
                            "related_case_id": case["id"],
                            "sequences": [line["sequence"] for line in lines]})
    return new_id


def appeal(actor: Actor, conn: sa.Connection, case_id: str, body: dict) -> str:
    """Open an appeal (UM02 2 standard, 1 immediate) for the denied or modified lines."""
    now = clock.now()
    case = _locked(conn, actor, case_id)
    if case["state"] not in APPEALABLE:
        raise StateConflict("only a denied, partially approved or modified case can be "
                            "appealed", current_state=case["state"])
    if (linked := rc.open_linked_case(conn, case_id)) is not None:
        raise StateConflict(f"case {linked['id']} linked to this one is still open",
                            current_state=case["state"])
    lines = [line for line in repo.case_lines(conn, case_id)
             if line["review_action"] in ("A3", "A6")]
    if not lines:
        raise StateConflict("no denied or modified line to appeal", current_state=case["state"])
    order = repo.order_row(conn, case["order_id"])
    assert order is not None
    kind, cert = APPEAL_KINDS[body["kind"]]
    new_id = _open_linked(conn, order, case, now, kind=kind, certification_type=cert,
                          lines=lines, actor=actor, level_of_care=body.get("level_of_care"),
                          reason=body.get("reason"),
                          urgency="expedited" if body["kind"] == "immediate" else case["urgency"])
    if case["attention_reason"] == "denied_review":  # acted upon: the appeal carries it now
        repo.update_case(conn, case_id, attention_reason=None, attention_since=None,
                         updated_at=now)
    _timeline(conn, case, now, "case_appealed", actor, {"appeal_case_id": new_id, "kind": kind})
    _audit(conn, actor, case, now, "create", "appeal")
    refresh_order_status(conn, case["order_id"], now)
    return new_id


def resubmit(actor: Actor, conn: sa.Connection, case_id: str) -> str:
    """A new request from the order's current data; the rejected case is superseded at once."""
    now = clock.now()
    case = _locked(conn, actor, case_id)
    if case["state"] not in RESUBMITTABLE:
        raise StateConflict("only a rejected or failed case can be resubmitted",
                            current_state=case["state"])
    followup = (case["last_error"] or {}).get("followup")
    if followup in NO_RESUBMIT_FOLLOWUPS:
        raise StateConflict(f"the payer's follow-up action {followup} forbids resubmission",
                            current_state=case["state"])
    order = repo.order_row(conn, case["order_id"])
    assert order is not None
    lines = [line for line in repo.order_lines(conn, order["id"])
             if Determination.from_record(line["determination"]).pa_needed in SENT_PA]
    if not lines:
        raise StateConflict("no line of the order needs authorization any more",
                            current_state=case["state"])
    new_id = _open_linked(conn, order, case, now, kind="resubmission", certification_type="I",
                          lines=lines, actor=actor, urgency=order["urgency"])
    repo.update_case(conn, case_id, state=cs.transition(case["state"], cs.SUPERSEDED),
                     attention_reason=None, attention_since=None, claimed_until=None,
                     next_poll_at=None, next_attempt_at=None, updated_at=now)
    _timeline(conn, case, now, "case_superseded", actor, {"by": new_id})
    _audit(conn, actor, case, now, "submit", "resubmit")
    refresh_order_status(conn, case["order_id"], now)
    return new_id


# ------------------------------------------------------------------ cancel


def cancel(actor: Actor, conn: sa.Connection, case_id: str) -> None:
    """Cancel an open case, or withdraw an authorization (a `cancelled` outcome per line)."""
    now = clock.now()
    case = _locked(conn, actor, case_id)
    state = case["state"]
    if not (cs.is_open(state) or state in cs.AUTHORIZED):
        raise StateConflict("this case is final and cannot be cancelled", current_state=state)
    # `submitting` may already have reached the payer (answer in flight or lost).
    tell_payer = (case["submitted_at"] is not None or state in cs.AUTHORIZED
                  or state == cs.SUBMITTING)
    repo.update_case(conn, case_id, state=cs.transition(state, cs.CANCELLED),
                     next_poll_at=None, claimed_until=None, attention_reason=None,
                     attention_since=None, updated_at=now,
                     decided_at=case["decided_at"] or now)
    withdrawn: list[int] = []
    if state in cs.AUTHORIZED:
        order = repo.order_row(conn, case["order_id"])
        assert order is not None
        lines = [line for line in repo.case_lines(conn, case_id)
                 if line["review_action"] in APPROVED_ACTIONS]
        if lines:
            repo.lock_outcome_feed(conn)
        for line in lines:
            outcomes.emit(conn, order=order, case_id=case_id, sequence=line["sequence"],
                          code=line["code"], outcome="cancelled", decided_at=now,
                          auth_number=line["auth_number"], valid_from=line["valid_from"],
                          valid_to=line["valid_to"])
            withdrawn.append(line["sequence"])
    if tell_payer:
        repo.add_outbox(conn, "cancel_case", case_id, now)
    _timeline(conn, case, now, "case_cancelled", actor,
              {"sent_to_payer": tell_payer, "withdrawn_sequences": withdrawn, "from": state})
    _audit(conn, actor, case, now, "cancel", "cancel")
    refresh_order_status(conn, case["order_id"], now)
