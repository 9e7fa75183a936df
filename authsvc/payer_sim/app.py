"""The `demo` payer: a small but faithful Da Vinci PAS 2.2.1 / FHIR R4 payer for dev and tests.

It keeps its own in-memory state (thread-safe; served by a threaded server) and picks its
behaviour from the member id's prefix (api.md › Payer simulator). Endpoints, under `/fhir`:

- `POST /fhir/CoverageEligibilityRequest/$submit` → CoverageEligibilityResponse
- `POST /fhir/Claim/$submit` → PAS response Bundle. The same endpoint takes updates (a PAS
  Claim Update: profile `profile-claim-update` or infoChanged/infoCancelled flags, with
  `related.claim` → the first claim) and cancels (header certificationType `3`, no items).
  Its idempotency key is the Claim.identifier (an update or cancel: its Bundle.identifier).
- `POST /fhir/Claim/$inquire` → PAS inquiry response Bundle, or HTTP 404 with an
  OperationOutcome issue `not-found` when no claim has that Claim.identifier.
- `POST /fhir/Subscription` (R4 backport rest-hook) → 201 with the Subscription and its id
  (the same endpoint registered again → 200 with the existing one); `GET`/`DELETE
  /fhir/Subscription/<id>`. Decisions reached later (`SIM-PEND`) are POSTed to every endpoint
  as a notification Bundle signed with Standard Webhooks headers (key: see
  `registry.webhook_key_from_secret`).
- `GET /sim/submissions?member_id=&claim_id=&kind=` → the ledger; `GET /healthz`.
- `GET /sim/notifications?claim_id=` → every notification attempt with the receiver's HTTP
  status; `GET`/`POST /sim/clock` (`{"offset_seconds": N}`) reads / skews the payer's clock
  (reliability.md F16; also `AUTHSVC_SIM_CLOCK_OFFSET_SECONDS` at start).

Beyond api.md's table: `SIM-OVERTURN` denies like `SIM-DENY` but certifies an appeal (UM02
1/2, Claim.related → the denied request), while `SIM-DENY` upholds its denial on appeal;
`SIM-CONTACT` answers `CT` (contact payer, reason `0V`, a note with the number to call);
`SIM-NORESUBMIT` rejects with AAA `41`, follow-up `N`. A resubmission (a new Claim whose
Claim.related names a request rejected with AAA 15) is certified once it carries a document.
An update of a denied request is refused (HTTP 422, OperationOutcome `business-rule`).

Settings come from the `settings` mapping, else the environment, at start:
`AUTHSVC_SIM_PEND_SECONDS` (5), `AUTHSVC_SIM_LATENCY_MS` (0), `AUTHSVC_SIM_FAULT`
(`MODE[@PERCENT]`; applies to `Claim/$submit` and `Claim/$inquire` only, so eligibility and
subscriptions keep working; a faulted call is never processed and is listed `accepted: false`),
`AUTHSVC_SIM_SLOW_SECONDS` (10, the `SIM-SLOW` delay) and `AUTHSVC_PAYER_DEMO_SECRET`.
Logs carry method, path and status only: never a query string, a body or a member id.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.claimresponse import ClaimResponse
from fhir.resources.R4B.coverageeligibilityrequest import CoverageEligibilityRequest
from fhir.resources.R4B.coverageeligibilityresponse import CoverageEligibilityResponse
from fhir.resources.R4B.subscription import Subscription
from flask import Flask, Response, request
from standardwebhooks import Webhook
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from authsvc.adapters.payers import pas_fhir as pas
from authsvc.adapters.payers.registry import DEMO_DEV_SECRET, webhook_key_from_secret

log = logging.getLogger(__name__)

FAULT_MODES = ("500", "502", "503", "504", "429", "hang", "slowdrip", "html", "truncated",
               "huge", "redirect")
PREFIXES = ("SIM-APPROVE", "SIM-PEND", "SIM-SILENT", "SIM-INFO", "SIM-DENY", "SIM-PARTIAL",
            "SIM-MODIFY", "SIM-INACTIVE", "SIM-NOTFOUND", "SIM-FLAKY", "SIM-REJECT", "SIM-SLOW",
            "SIM-OVERTURN", "SIM-CONTACT", "SIM-NORESUBMIT")
#: UM02 certification types of an appeal (1 immediate, 2 standard).
APPEAL_CERTIFICATIONS = frozenset({"1", "2"})
CONTACT = ("0V", "Requires Medical Review")
CONTACT_NOTE = ("Contact the plan's utilization management line at 1-800-555-0199 for a "
                "peer-to-peer review before a decision can be made.")
APPEAL_UPHELD_NOTE = ("Appeal reviewed: the original determination is upheld; the "
                      "documentation does not establish medical necessity.")
INFO_LOINC = ("18748-4", "Diagnostic imaging study")
DENIAL = ("0F", "Not Medically Necessary")
DENIAL_NOTE = ("Not Medically Necessary: the documentation submitted does not establish "
               "medical necessity for the requested service under the plan's policy.")
FLAKY_FAILURES = 2
HUGE_BYTES = 50 * 1024 * 1024
ACTION_DISPLAY = {"A1": "Certified in total", "A3": "Not Certified", "A4": "Pending",
                  "A6": "Modified", "C": "Cancelled", "CT": "Contact Payer"}


# ---------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Fault:
    mode: str
    percent: float = 100.0
    target: str | None = None  # redirect URL


@dataclasses.dataclass(frozen=True)
class SimSettings:
    pend_seconds: float = 5.0
    latency_ms: int = 0
    fault: Fault | None = None
    slow_seconds: float = 10.0
    secret: str = DEMO_DEV_SECRET
    clock_offset_seconds: float = 0.0  # the payer's clock is this far ahead (F16)


def parse_fault(value: str | None) -> Fault | None:
    """`MODE[@PERCENT]`, e.g. `503@80`, `redirect=http://127.0.0.1:9999/steal`."""
    if not value or not value.strip():
        return None
    value = value.strip()
    percent = 100.0
    head, sep, tail = value.rpartition("@")
    if sep and tail.replace(".", "", 1).isdigit():
        value, percent = head, float(tail)
    mode, _, target = value.partition("=")
    if mode not in FAULT_MODES or (mode == "redirect") != bool(target):
        raise ValueError(f"AUTHSVC_SIM_FAULT: unknown mode {value!r}")
    return Fault(mode=mode, percent=min(100.0, percent), target=target or None)


def load_settings(settings: Mapping[str, Any] | None = None,
                  env: Mapping[str, str] | None = None) -> SimSettings:
    """Settings from the mapping (env-style or short keys), else the environment."""
    settings = settings or {}
    env = os.environ if env is None else env

    def get(name: str, short: str) -> Any:
        for key in (name, short):
            if key in settings and settings[key] is not None:
                return settings[key]
        return env.get(name) or None

    fault = get("AUTHSVC_SIM_FAULT", "fault")
    return SimSettings(
        pend_seconds=float(get("AUTHSVC_SIM_PEND_SECONDS", "pend_seconds") or 5),
        latency_ms=int(float(get("AUTHSVC_SIM_LATENCY_MS", "latency_ms") or 0)),
        fault=fault if isinstance(fault, Fault) else parse_fault(fault),
        slow_seconds=float(get("AUTHSVC_SIM_SLOW_SECONDS", "slow_seconds") or 10),
        secret=str(get("AUTHSVC_PAYER_DEMO_SECRET", "secret") or DEMO_DEV_SECRET),
        clock_offset_seconds=float(get("AUTHSVC_SIM_CLOCK_OFFSET_SECONDS",
                                       "clock_offset_seconds") or 0),
    )


# ---------------------------------------------------------------- state


#: How far the payer's clock is off ours, in seconds (reliability.md F16). It shifts every
#: time the payer states (ClaimResponse.created, meta.lastUpdated, Bundle timestamps,
#: preAuthIssueDate, the `webhook-timestamp` of notifications). The simulator's clock is one
#: per process: set at start and by `POST /sim/clock`.
_CLOCK_OFFSET = [0.0]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=_CLOCK_OFFSET[0])


def _instant(value: dt.datetime | None = None) -> str:
    value = value or _now()
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def behaviour(member_id: str | None) -> str:
    """The scenario of a member id: its `SIM-…` prefix, else `SIM-APPROVE`."""
    upper = (member_id or "").upper()
    for prefix in PREFIXES:
        if upper.startswith(prefix):
            return prefix
    return "SIM-APPROVE"


@dataclasses.dataclass
class Line:
    sequence: int
    system: str
    code: str
    quantity: int
    start: dt.date | None
    end: dt.date | None


@dataclasses.dataclass
class Decision:
    action: str
    auth_number: str | None = None
    period: tuple[dt.date, dt.date] | None = None
    quantity: int | None = None
    reason: tuple[str, str] | None = None
    note: str | None = None
    admin_ref: str | None = None
    add_quantity: int | None = None  # A6: the authorized quantity, sent as addItem


@dataclasses.dataclass
class SimClaim:
    identifier: str
    system: str
    member_id: str | None
    scenario: str
    lines: dict[int, Line]
    decisions: dict[int, Decision]
    context: dict[str, Any]  # Patient / insurer / requester resources, for the answers
    response_id: str
    first_response: bytes = b""
    pend_until: float | None = None  # SIM-PEND: monotonic time of the A1 decision
    notified: bool = False
    info_pending: bool = False
    cancelled: bool = False
    updated_at: dt.datetime = dataclasses.field(default_factory=_now)


@dataclasses.dataclass
class Parsed:
    """What the simulator reads from a PAS request Bundle."""

    bundle_key: str
    claim_identifier: str | None
    claim_system: str
    member_id: str | None
    kind: str  # submit|update|cancel|inquire
    related: str | None
    lines: list[Line]
    cancelled_lines: set[int]
    changed_lines: set[int]
    has_attachment: bool
    context: dict[str, Any]
    appeal: bool = False  # item certificationType 1 or 2 (UM02 appeal)


class SimState:
    """Everything the simulator remembers; one lock guards it all."""

    def __init__(self, settings: SimSettings):
        self.settings = settings
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.claims: dict[str, SimClaim] = {}
        self.aliases: dict[str, str] = {}  # update/cancel identifiers → first claim
        self.replays: dict[str, bytes] = {}  # update/cancel Bundle key → first answer
        self.flaky: dict[str, int] = {}
        self.ledger: list[dict[str, Any]] = []
        self.notifications: list[dict[str, Any]] = []
        #: rejected Claim.identifier → (AAA 901 code, follow-up 889)
        self.rejected: dict[str, tuple[str, str]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.timers: list[threading.Timer] = []
        self._seq = itertools.count(1)
        self.random = random.Random()

    def record(self, kind: str, member_id: str | None, claim_id: str | None, accepted: bool,
               http_status: int | None) -> None:
        with self.lock:
            self.ledger.append({
                "id": f"simrx_{next(self._seq):06d}", "received_at": _instant(), "kind": kind,
                "member_id": member_id, "claim_id": claim_id, "accepted": accepted,
                "http_status": http_status,
            })

    def record_notification(self, webhook_id: str, claim_id: str | None, timestamp: int,
                            http_status: int | None) -> None:
        with self.lock:
            self.notifications.append({
                "webhook_id": webhook_id, "claim_id": claim_id, "sent_at": _instant(),
                "webhook_timestamp": timestamp, "http_status": http_status})

    def find(self, identifier: str | None) -> SimClaim | None:
        if not identifier:
            return None
        with self.lock:
            return self.claims.get(self.aliases.get(identifier, identifier))

    def shutdown(self) -> None:
        """Wake hanging answers and drop pending notifications (server stop, tests)."""
        self.stop.set()
        with self.lock:
            for timer in self.timers:
                timer.cancel()
            self.timers.clear()


# ---------------------------------------------------------------- FHIR helpers


def _cc(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def _ext(obj: Any, name: str) -> dict[str, Any] | None:
    """The first extension whose url is `name` or ends with `/name`."""
    for ext in (obj.get("extension") or ()) if isinstance(obj, dict) else ():
        url = ext.get("url") if isinstance(ext, dict) else None
        if isinstance(url, str) and (url == name or url.endswith("/" + name)):
            return ext
    return None


def _code(cc: Any) -> str | None:
    for coding in (cc.get("coding") or ()) if isinstance(cc, dict) else ():
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            return coding["code"]
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


# ---------------------------------------------------------------- reading requests


class BadRequest(Exception):
    """The request is not a usable PAS request (message safe to return: no input echoed)."""


def _json_body(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("The request body is not valid JSON.") from None


def _validate(model: Any, doc: Any) -> None:
    """Refuse what is not valid FHIR, as a payer would (AUTHSVC_SIM_VALIDATE=0 skips it for
    throughput benchmarks, where the simulator stands in for another machine)."""
    if os.environ.get("AUTHSVC_SIM_VALIDATE", "1") == "0":
        return
    try:
        model.model_validate(doc)
    except Exception:  # pydantic echoes input values: never pass its message on
        raise BadRequest("The input request is not of the desired format.") from None


def _resolver(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Bundle entries by fullUrl and by `Type/id`."""
    index: dict[str, dict[str, Any]] = {}
    for entry in bundle.get("entry") or ():
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict):
            continue
        full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        if res.get("id"):
            full_url = full_url or f"{res.get('resourceType')}/{res['id']}"
            index[f"{res.get('resourceType')}/{res['id']}"] = {"fullUrl": full_url,
                                                              "resource": res}
        if full_url:
            index[full_url] = {"fullUrl": full_url, "resource": res}
    return index


def _resolve_entry(index: dict[str, dict[str, Any]], ref: Any) -> dict[str, Any] | None:
    if not isinstance(ref, dict) or not isinstance(ref.get("reference"), str):
        return None
    target = ref["reference"]
    return index.get(target) or next(
        (e for k, e in index.items() if k.endswith("/" + target)), None)


def _resolve(index: dict[str, dict[str, Any]], ref: Any) -> dict[str, Any] | None:
    entry = _resolve_entry(index, ref)
    return entry["resource"] if entry else None


def _date(value: Any) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value[:10]) if isinstance(value, str) else None
    except ValueError:
        return None


def parse_pas_request(bundle: dict[str, Any], raw: bytes, inquiry: bool = False) -> Parsed:
    """Read a PAS request (or inquiry) Bundle the way a payer would."""
    if bundle.get("resourceType") != "Bundle":
        raise BadRequest("The request must be a PAS request Bundle.")
    _validate(Bundle, bundle)
    index = _resolver(bundle)
    claims = [e["resource"] for e in index.values()
              if e["resource"].get("resourceType") == "Claim"]
    if not claims:
        raise BadRequest("The Bundle has no Claim.")
    claim = claims[0]
    ids = [i for i in claim.get("identifier") or () if isinstance(i, dict) and i.get("value")]
    ours = [i for i in ids if i.get("system") == pas.CLAIM_ID_SYSTEM] or ids
    identifier = ours[0]["value"] if ours else None
    system = ours[0].get("system", pas.CLAIM_ID_SYSTEM) if ours else pas.CLAIM_ID_SYSTEM
    member_id = None
    for ins in claim.get("insurance") or ():
        coverage = _resolve(index, ins.get("coverage") if isinstance(ins, dict) else None)
        if coverage and coverage.get("subscriberId"):
            member_id = str(coverage["subscriberId"])
            break
    header_cert = _code((_ext(claim, "extension-certificationType") or {})
                        .get("valueCodeableConcept"))
    related = None
    for rel in claim.get("related") or ():
        ref = rel.get("claim") if isinstance(rel, dict) else None
        if isinstance(ref, dict) and isinstance(ref.get("identifier"), dict):
            related = ref["identifier"].get("value")
        elif isinstance(ref, dict):
            target = _resolve(index, ref)
            related = next((i.get("value") for i in (target or {}).get("identifier") or ()), None)
    lines: list[Line] = []
    cancelled: set[int] = set()
    changed: set[int] = set()
    item_certs: set[str] = set()
    for item in claim.get("item") or ():
        seq = item.get("sequence")
        coding = ((item.get("productOrService") or {}).get("coding") or [{}])[0]
        period = item.get("servicedPeriod") or {}
        start = _date(item.get("servicedDate")) or _date(period.get("start"))
        value = (item.get("quantity") or {}).get("value")
        quantity = max(1, int(value)) if isinstance(value, int | float) else 1
        lines.append(Line(seq, coding.get("system", ""), coding.get("code", ""), quantity,
                          start, _date(period.get("end"))))
        cert = _code((_ext(item, "extension-certificationType") or {})
                     .get("valueCodeableConcept"))
        if cert:
            item_certs.add(cert)
        if any(e.get("valueBoolean") for e in item.get("modifierExtension") or ()
               if isinstance(e, dict) and str(e.get("url", "")).endswith("infoCancelled")):
            cancelled.add(seq)
        if _ext(item, "extension-infoChanged"):
            changed.add(seq)
    has_attachment = any(
        isinstance(s, dict) and (s.get("valueAttachment") or (
            (_resolve(index, s.get("valueReference")) or {}).get("resourceType")
            == "DocumentReference"))
        for s in claim.get("supportingInfo") or ())
    profiles = (claim.get("meta") or {}).get("profile") or []
    flagged = bool(changed or cancelled) or any(
        _ext(s, "extension-infoChanged") for s in claim.get("supportingInfo") or ())
    # An update is a PAS Claim Update (profile or change flags) related to the first claim;
    # a new request that merely relates to an earlier one (extension, appeal,
    # resubmission) is a submit with its own Claim.identifier.
    if inquiry:
        kind = "inquire"
    elif header_cert == "3" and not lines:
        kind = "cancel"
    elif (pas.PROFILE_CLAIM_UPDATE in profiles or flagged) \
            and not item_certs & {"1", "2", "4"}:
        kind = "update"
    else:
        kind = "submit"
    if not identifier:
        raise BadRequest("The Claim has no identifier.")
    if kind in ("submit", "update") and not lines:
        raise BadRequest("The Claim has no items.")
    bundle_ident = bundle.get("identifier") if isinstance(bundle.get("identifier"), dict) else {}
    bundle_key = bundle_ident.get("value") or hashlib.sha256(raw).hexdigest()
    context = {  # entries the answers reference (PAS answers carry them too)
        "patient": _resolve_entry(index, claim.get("patient")),
        "insurer": _resolve_entry(index, claim.get("insurer")),
        "requestor": _resolve_entry(index, claim.get("provider")),
    }
    return Parsed(f"{kind}:{bundle_key}", identifier, system, member_id, kind, related, lines,
                  cancelled, changed, has_attachment, context,
                  appeal=bool(item_certs & APPEAL_CERTIFICATIONS))


# ---------------------------------------------------------------- deciding


def _auth_number(identifier: str, seq: int) -> str:
    return f"DA{hashlib.sha256(identifier.encode()).hexdigest()[:8].upper()}{seq:02d}"


def _approval(identifier: str, line: Line, quantity: int | None = None) -> Decision:
    start = line.start or _now().date()
    end = line.end or start + dt.timedelta(days=90)
    return Decision("A1", auth_number=_auth_number(identifier, line.sequence),
                    period=(start, end), quantity=quantity or line.quantity)


def _denial() -> Decision:
    return Decision("A3", reason=DENIAL, note=DENIAL_NOTE)


def _pended(identifier: str, line: Line, info: bool = False) -> Decision:
    ref = f"PEND{hashlib.sha256(identifier.encode()).hexdigest()[:6].upper()}{line.sequence:02d}"
    return Decision("A4", admin_ref=ref,
                    reason=("OS", "Open, Waiting for Supplier Feedback") if info else None)


def decide(scenario: str, identifier: str, lines: list[Line]) -> dict[int, Decision]:
    """The first decision of each line for a scenario (api.md table)."""
    ordered = sorted(lines, key=lambda ln: ln.sequence)
    out: dict[int, Decision] = {}
    for index, line in enumerate(ordered):
        if scenario in ("SIM-DENY", "SIM-OVERTURN") or (scenario == "SIM-PARTIAL"
                                                         and index > 0):
            out[line.sequence] = _denial()
        elif scenario == "SIM-CONTACT":
            out[line.sequence] = Decision("CT", reason=CONTACT, note=CONTACT_NOTE)
        elif scenario in ("SIM-PEND", "SIM-SILENT"):
            out[line.sequence] = _pended(identifier, line)
        elif scenario == "SIM-INFO":
            out[line.sequence] = _pended(identifier, line, info=True)
        elif scenario == "SIM-MODIFY":
            approved = _approval(identifier, line)
            out[line.sequence] = dataclasses.replace(
                approved, action="A6", quantity=None, add_quantity=max(1, line.quantity // 2))
        else:
            out[line.sequence] = _approval(identifier, line)
    return out


# ---------------------------------------------------------------- writing answers


def _review_adjudication(action: str, number: str | None,
                         reason: tuple[str, str] | None) -> list[dict[str, Any]]:
    sub: list[dict[str, Any]] = [{
        "url": pas.EXT_REVIEW_ACTION_CODE,
        "valueCodeableConcept": _cc(pas.X12_REVIEW_ACTION, action, ACTION_DISPLAY.get(action)),
    }]
    if number:
        sub.append({"url": "number", "valueString": number})
    if reason:
        sub.append({"url": "reasonCode",
                    "valueCodeableConcept": _cc(pas.X12_REVIEW_REASON, *reason)})
    return [{
        "extension": [{"url": pas.EXT_REVIEW_ACTION, "extension": sub}],
        "category": _cc("http://terminology.hl7.org/CodeSystem/adjudication", "submitted"),
    }]


def _period(period: tuple[dt.date, dt.date]) -> dict[str, Any]:
    return {"url": pas.EXT_PREAUTH_PERIOD,
            "valuePeriod": {"start": period[0].isoformat(), "end": period[1].isoformat()}}


def _items(claim: SimClaim) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    items, add_items, notes = [], [], []
    for seq in sorted(claim.decisions):
        d = claim.decisions[seq]
        line = claim.lines.get(seq)
        ext: list[dict[str, Any]] = []
        if d.period:
            ext.append({"url": pas.EXT_PREAUTH_ISSUE_DATE, "valueDate": _now().date().isoformat()})
            ext.append(_period(d.period))
        if d.admin_ref:
            ext.append({"url": pas.EXT_ADMIN_REF, "valueString": d.admin_ref})
        if d.quantity is not None and d.action == "A1":
            detail = [{"url": "quantity", "valueQuantity": {"value": d.quantity}}]
            if line and line.code:
                detail.insert(0, {"url": "productOrServiceCode",
                                  "valueCodeableConcept": _cc(line.system, line.code)})
            ext.append({"url": pas.EXT_AUTHORIZED_DETAIL, "extension": detail})
        item: dict[str, Any] = {}
        if ext:
            item["extension"] = ext
        item["itemSequence"] = seq
        if d.note:
            notes.append(d.note)
            item["noteNumber"] = [len(notes)]
        item["adjudication"] = _review_adjudication(d.action, d.auth_number, d.reason)
        items.append(item)
        if d.action == "A6" and d.add_quantity is not None and line is not None:
            add: dict[str, Any] = {}
            if d.period:
                add["extension"] = [_period(d.period)]
            add.update({
                "itemSequence": [seq],
                "productOrService": _cc(line.system, line.code),
                "quantity": {"value": d.add_quantity},
                "adjudication": _review_adjudication("A1", d.auth_number, None),
            })
            add_items.append(add)
    return items, add_items, notes


def _entry(resource: dict[str, Any]) -> dict[str, Any]:
    return {"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource}


def _context_entries(context: dict[str, Any]) -> tuple[dict[str, dict[str, Any]],
                                                      list[dict[str, Any]]]:
    refs: dict[str, dict[str, Any]] = {}
    entries: list[dict[str, Any]] = []
    for role in ("patient", "insurer", "requestor"):
        entry = context.get(role)
        if isinstance(entry, dict) and entry["fullUrl"] not in [e["fullUrl"] for e in entries]:
            entries.append({"fullUrl": entry["fullUrl"], "resource": entry["resource"]})
        if isinstance(entry, dict):
            refs[role] = {"reference": entry["fullUrl"]}
    refs.setdefault("patient", {"display": "Beneficiary"})
    refs.setdefault("insurer", {"display": "Demo Health Plan"})
    return refs, entries


def response_bundle(claim: SimClaim | None, identifier: str, system: str, *,
                    context: dict[str, Any], outcome: str = "complete",
                    errors: list[dict[str, Any]] | None = None, inquiry: bool = False,
                    response_id: str | None = None) -> dict[str, Any]:
    """A PAS response Bundle: the ClaimResponse first, then the resources it references."""
    refs, context_entries = _context_entries(context)
    cr: dict[str, Any] = {
        "resourceType": "ClaimResponse",
        "id": response_id or (claim.response_id if claim else str(uuid.uuid4())),
        "meta": {"profile": [pas.PROFILE_CLAIM_RESPONSE], "lastUpdated": _instant(
            claim.updated_at if claim else None)},
        "identifier": [{"system": system, "value": identifier}],
        "status": "active",
        "type": _cc("http://terminology.hl7.org/CodeSystem/claim-type", "professional"),
        "use": "preauthorization",
        "patient": refs["patient"],
        "created": _instant(),
        "insurer": refs["insurer"],
    }
    if "requestor" in refs:
        cr["requestor"] = refs["requestor"]
    cr["request"] = {"identifier": {"system": system, "value": identifier}}
    cr["outcome"] = outcome
    extra: list[dict[str, Any]] = []
    if claim is not None and outcome != "error":
        items, add_items, notes = _items(claim)
        if items:
            cr["item"] = items
        if add_items:
            cr["addItem"] = add_items
        if notes:
            cr["processNote"] = [{"number": i, "type": "display", "text": text}
                                 for i, text in enumerate(notes, start=1)]
        if any(d.action == "A3" for d in claim.decisions.values()):
            cr["extension"] = [{"url": pas.EXT_REVIEWER, "extension": [
                {"url": "wasHumanReviewedFlag", "valueBoolean": True}]}]
        if claim.info_pending:
            extra.append(_info_task(claim, refs))
    if errors:
        cr["error"] = errors
    _check(ClaimResponse, cr)
    bundle_id = str(uuid.uuid4())
    return {
        "resourceType": "Bundle",
        "id": bundle_id,
        "meta": {"profile": [pas.PROFILE_INQUIRY_RESPONSE_BUNDLE if inquiry
                             else pas.PROFILE_RESPONSE_BUNDLE]},
        "identifier": {"system": "urn:demo-payer:bundle", "value": bundle_id},
        "type": "collection",
        "timestamp": _instant(),
        "entry": [_entry(cr), *context_entries, *[_entry(r) for r in extra]],
    }


def _info_task(claim: SimClaim, refs: dict[str, Any]) -> dict[str, Any]:
    """The PAS Task asking for documentation (LOINC 18748-4), as the guide's Task example."""
    task: dict[str, Any] = {
        "resourceType": "Task",
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"demo-payer:task:{claim.identifier}")),
        "status": "requested",
        "intent": "order",
        "code": _cc(pas.PAS_TEMP_CODES, "attachment-request-code"),
        "description": "Please send the diagnostic imaging study supporting this request.",
        "authoredOn": _instant(),
        "reasonCode": _cc(pas.PAS_TEMP_CODES, "priorAuthorization"),
        "reasonReference": {"identifier": {"system": claim.system, "value": claim.identifier}},
        "input": [{"type": {"text": "attachments-needed"},
                   "valueCodeableConcept": _cc(pas.LOINC, *INFO_LOINC)}],
    }
    if "reference" in refs["patient"]:
        task["for"] = refs["patient"]
    return task


FOLLOWUP_DISPLAY = {"C": "Please Correct and Resubmit", "N": "Resubmission Not Allowed"}


def decide_appeal(scenario: str, identifier: str, lines: list[Line]) -> dict[int, Decision]:
    """An appeal of lines the payer denied or modified: `SIM-DENY` upholds the denial, every
    other scenario (`SIM-OVERTURN`, `SIM-PARTIAL`, `SIM-MODIFY`, …) overturns it and
    certifies the requested quantity."""
    if scenario == "SIM-DENY":
        return {ln.sequence: Decision("A3", reason=DENIAL, note=APPEAL_UPHELD_NOTE)
                for ln in lines}
    return {ln.sequence: _approval(identifier, ln) for ln in lines}


def _error(code: str, display: str, followup: str = "C") -> dict[str, Any]:
    return {
        "extension": [{"url": pas.EXT_ERROR_FOLLOWUP, "valueCodeableConcept": _cc(
            pas.X12_FOLLOWUP, followup, FOLLOWUP_DISPLAY.get(followup))}],
        "code": _cc(pas.X12_REJECT_REASON, code, display),
    }


def _check(model: Any, doc: dict[str, Any]) -> None:
    """The simulator's answers must be valid FHIR too (a failure is a simulator bug); checked
    when AUTHSVC_FHIR_VALIDATE=1, as in the test suite."""
    if os.environ.get("AUTHSVC_FHIR_VALIDATE") != "1":
        return
    try:
        model.model_validate(doc)
    except Exception:
        raise RuntimeError(f"simulator built an invalid {doc.get('resourceType')}") from None


def operation_outcome(code: str, text: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "details": {"text": text}}]}


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


# ---------------------------------------------------------------- notifications


def notification_bundle(sub: dict[str, Any], event_number: int,
                        response: dict[str, Any]) -> dict[str, Any]:
    """An R4 backport event notification carrying the full PAS response Bundle."""
    focus = f"urn:uuid:{response['id']}"
    params = {
        "resourceType": "Parameters",
        "id": str(uuid.uuid4()),
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": f"Subscription/{sub['id']}"}},
            {"name": "topic", "valueCanonical": pas.PAS_TOPIC},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": str(event_number)},
            {"name": "notification-event", "part": [
                {"name": "event-number", "valueString": str(event_number)},
                {"name": "timestamp", "valueInstant": _instant()},
                {"name": "focus", "valueReference": {"reference": focus}},
            ]},
        ],
    }
    doc = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "history",
        "timestamp": _instant(),
        "entry": [
            {"fullUrl": f"urn:uuid:{params['id']}", "resource": params,
             "request": {"method": "GET", "url": f"Subscription/{sub['id']}/$status"},
             "response": {"status": "200"}},
            {"fullUrl": focus, "resource": response,
             "request": {"method": "GET", "url": f"Bundle/{response['id']}"},
             "response": {"status": "200"}},
        ],
    }
    _check(Bundle, doc)
    return doc


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks `webhook-signature` header value (v1, HMAC-SHA256)."""
    hook = Webhook(webhook_key_from_secret(secret))
    return hook.sign(msg_id, dt.datetime.fromtimestamp(timestamp, dt.UTC), body.decode("utf-8"))


def _deliver(state: SimState, endpoint: str, body: bytes, claim_id: str | None = None) -> None:
    """POST one signed notification, retrying a little; its webhook-id never changes. Each
    attempt is listed by `GET /sim/notifications` with the receiver's HTTP status."""
    msg_id = f"msg_{uuid.uuid4().hex}"
    for attempt in range(3):
        if state.stop.is_set():
            return
        timestamp = int(_now().timestamp())
        status: int | None = None
        headers = {
            "Content-Type": pas.FHIR_JSON,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(state.settings.secret, msg_id, timestamp, body),
        }
        try:
            with requests.post(endpoint, data=body, headers=headers, timeout=(3, 10),
                               allow_redirects=False) as resp:
                status = resp.status_code
                state.record_notification(msg_id, claim_id, timestamp, status)
                if 200 <= resp.status_code < 300:
                    log.info("notification delivered (%s)", resp.status_code)
                    return
                log.warning("notification refused (%s)", resp.status_code)
        except requests.RequestException as exc:
            if status is None:
                state.record_notification(msg_id, claim_id, timestamp, None)
            log.warning("notification failed (%s)", type(exc).__name__)
        if state.stop.wait(0.5 * 4 ** attempt):
            return


def _notify(state: SimState, claim: SimClaim) -> None:
    """Send the claim's decision to every subscription (runs in a timer thread)."""
    try:
        with state.lock:
            _refresh(claim, force=True)
            if claim.notified or claim.cancelled or any(
                    d.action == "A4" for d in claim.decisions.values()):
                return
            claim.notified = True
            deliveries = []
            for sub in state.subscriptions.values():
                sub["events"] += 1
                response = response_bundle(claim, claim.identifier, claim.system,
                                           context=claim.context)
                body = _dumps(notification_bundle(sub, sub["events"], response))
                deliveries.append((sub["endpoint"], body))
        for endpoint, body in deliveries:
            _deliver(state, endpoint, body, claim.identifier)
    except Exception as exc:  # a timer thread must never die loudly
        log.error("notification thread failed (%s)", type(exc).__name__)


def _refresh(claim: SimClaim, force: bool = False) -> None:
    """Apply a due SIM-PEND decision (lazily, so `$inquire` sees it even before the timer)."""
    if claim.pend_until is None or claim.cancelled:
        return
    if force or time.monotonic() >= claim.pend_until:
        claim.pend_until = None
        for seq, line in claim.lines.items():
            if claim.decisions.get(seq, Decision("A4")).action == "A4":
                claim.decisions[seq] = _approval(claim.identifier, line)
        claim.updated_at = _now()


# ---------------------------------------------------------------- app

#: What a Claim/$submit kind answers: (status, body, accepted, extra headers). A `str` body is
#: plain text (5xx carry no OperationOutcome, PAS spec-39).
Answer = tuple[int, dict[str, Any] | bytes | str, bool, dict[str, str] | None]


def _fhir(doc: dict[str, Any] | bytes | str, status: int = 200,
          headers: dict[str, str] | None = None) -> Response:
    if isinstance(doc, str):
        return Response(doc, status=status, headers=headers, mimetype="text/plain")
    body = doc if isinstance(doc, bytes) else _dumps(doc)
    return Response(body, status=status, headers=headers, content_type=pas.FHIR_JSON)


def _fault_response(state: SimState, fault: Fault) -> Response:
    """The answer of a fault mode (nothing was processed)."""
    mode = fault.mode
    if mode in ("500", "502", "503", "504"):
        return _fhir("Service Unavailable\n", int(mode))
    if mode == "429":
        return _fhir("Too Many Requests\n", 429, {"Retry-After": "30"})
    if mode == "redirect":
        return Response("", status=302, headers={"Location": fault.target or "/"})
    if mode == "html":
        return Response("<html><body><h1>Gateway maintenance</h1></body></html>",
                        status=200, mimetype="text/html")
    sample = _dumps(operation_outcome("transient", "Simulated fault body, never complete."))
    if mode == "truncated":
        return _fhir(sample[: len(sample) // 2])
    if mode == "hang":
        state.stop.wait(3600)
        return Response("", status=504)
    if mode == "slowdrip":
        def drip() -> Iterator[bytes]:
            for byte in sample:
                if state.stop.wait(0.1):
                    return
                yield bytes([byte])
        return Response(drip(), status=200, content_type=pas.FHIR_JSON,
                        headers={"Content-Length": str(len(sample))}, direct_passthrough=True)
    head, tail = b'{"resourceType":"Bundle","type":"collection","filler":"', b'"}'

    def huge() -> Iterator[bytes]:
        yield head
        remaining = HUGE_BYTES - len(head) - len(tail)
        chunk = b"x" * 65536
        while remaining > 0 and not state.stop.is_set():
            yield chunk[:remaining]
            remaining -= len(chunk)
        yield tail
    return Response(huge(), status=200, content_type=pas.FHIR_JSON,
                    headers={"Content-Length": str(HUGE_BYTES)}, direct_passthrough=True)


def create_sim_app(settings: Mapping[str, Any] | None = None) -> Flask:
    """The simulator as a Flask app; its state lives in `app.extensions["payer_sim"]`."""
    state = SimState(load_settings(settings))
    _CLOCK_OFFSET[0] = state.settings.clock_offset_seconds
    app = Flask("authsvc.payer_sim")
    app.config["MAX_CONTENT_LENGTH"] = 32 * 1024 * 1024
    app.extensions["payer_sim"] = state

    def delay() -> None:
        if state.settings.latency_ms:
            state.stop.wait(state.settings.latency_ms / 1000)

    def faulted(kind: str, parsed: Parsed) -> Response | None:
        """A PAS call that draws the configured fault: listed, never processed."""
        fault = state.settings.fault
        if fault is None or state.random.random() * 100 >= fault.percent:
            return None
        status = None if fault.mode == "hang" else (
            int(fault.mode) if fault.mode.isdigit() else 302 if fault.mode == "redirect" else 200)
        state.record(kind, parsed.member_id, parsed.claim_identifier, False, status)
        delay()
        return _fault_response(state, fault)

    def bad_request(kind: str, exc: BadRequest) -> Response:
        state.record(kind, None, None, False, 400)
        delay()
        return _fhir(operation_outcome("invalid", str(exc)), 400)

    @app.errorhandler(Exception)
    def on_error(exc: Exception) -> Response:
        code = getattr(exc, "code", None)
        if isinstance(code, int) and 400 <= code < 500:
            return _fhir(operation_outcome("invalid", "The request was not accepted."), code)
        log.error("simulator error (%s)", type(exc).__name__)
        return _fhir(operation_outcome("exception", "Internal simulator error."), 500)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response('{"status":"ok"}', mimetype="application/json")

    @app.get("/sim/submissions")
    def submissions() -> Response:
        filters = {k: request.args.get(k) for k in ("member_id", "claim_id", "kind")}
        with state.lock:
            items = [dict(e) for e in state.ledger
                     if all(v is None or e.get(k) == v for k, v in filters.items())]
        return Response(json.dumps({"items": items}), mimetype="application/json")

    @app.get("/sim/notifications")
    def notifications() -> Response:
        claim_id = request.args.get("claim_id")
        with state.lock:
            items = [dict(n) for n in state.notifications
                     if claim_id is None or n["claim_id"] == claim_id]
        return Response(json.dumps({"items": items}), mimetype="application/json")

    @app.get("/sim/clock")
    def clock_get() -> Response:
        return Response(json.dumps({"now": _instant(), "offset_seconds": _CLOCK_OFFSET[0]}),
                        mimetype="application/json")

    @app.post("/sim/clock")
    def clock_set() -> Response:
        """Skew the payer's clock (F16): `{"offset_seconds": 360}` puts it 6 minutes ahead."""
        doc = request.get_json(silent=True)
        offset = doc.get("offset_seconds") if isinstance(doc, dict) else None
        if isinstance(offset, bool) or not isinstance(offset, int | float) \
                or abs(offset) > 366 * 86400:
            return _fhir(operation_outcome("invalid", "offset_seconds must be a number."), 400)
        _CLOCK_OFFSET[0] = float(offset)
        return clock_get()

    @app.post("/fhir/CoverageEligibilityRequest/$submit")
    def eligibility() -> Response:
        try:
            req, index = _eligibility_request(_json_body(request.get_data()))
        except BadRequest as exc:
            return bad_request("eligibility", exc)
        member_id, answer = _eligibility_answer(req, index)
        state.record("eligibility", member_id, None, True, 200)
        delay()
        return _fhir(answer)

    @app.post("/fhir/Claim/$submit")
    def claim_submit() -> Response:
        raw = request.get_data()
        try:
            parsed = parse_pas_request(_json_body(raw), raw)
        except BadRequest as exc:
            return bad_request("submit", exc)
        answer = faulted(parsed.kind, parsed)
        if answer is not None:
            return answer
        handler = {"submit": _submit, "update": _update, "cancel": _cancel}[parsed.kind]
        status, body, accepted, headers = handler(state, parsed)
        state.record(parsed.kind, parsed.member_id, parsed.claim_identifier, accepted, status)
        if parsed.kind == "submit" and behaviour(parsed.member_id) == "SIM-SLOW":
            state.stop.wait(state.settings.slow_seconds)
        delay()
        return _fhir(body, status, headers)

    @app.post("/fhir/Claim/$inquire")
    def claim_inquire() -> Response:
        raw = request.get_data()
        try:
            parsed = parse_pas_request(_json_body(raw), raw, inquiry=True)
        except BadRequest as exc:
            return bad_request("inquire", exc)
        answer = faulted("inquire", parsed)
        if answer is not None:
            return answer
        claim = state.find(parsed.claim_identifier)
        if claim is None:
            state.record("inquire", parsed.member_id, parsed.claim_identifier, False, 404)
            delay()
            return _fhir(operation_outcome(
                "not-found", "No prior authorization request matches the inquiry."), 404)
        with state.lock:
            _refresh(claim)
            doc = response_bundle(claim, parsed.claim_identifier or claim.identifier,
                                  parsed.claim_system, context=claim.context, inquiry=True)
        state.record("inquire", parsed.member_id, parsed.claim_identifier, True, 200)
        delay()
        return _fhir(doc)

    @app.post("/fhir/Subscription")
    def subscribe() -> Response:
        try:
            doc = _json_body(request.get_data())
            endpoint = _subscription_endpoint(doc)
        except BadRequest as exc:
            return _fhir(operation_outcome("invalid", str(exc)), 400)
        with state.lock:
            for sub in state.subscriptions.values():
                if sub["endpoint"] == endpoint:
                    return _fhir(sub["resource"], 200)
            sub_id = f"sub-{uuid.uuid4().hex[:16]}"
            resource = dict(doc, id=sub_id, status="active")
            state.subscriptions[sub_id] = {"id": sub_id, "endpoint": endpoint, "events": 0,
                                           "resource": resource}
        return _fhir(resource, 201, {"Location": f"{request.url_root}fhir/Subscription/{sub_id}"})

    @app.get("/fhir/Subscription/<sub_id>")
    def subscription_get(sub_id: str) -> Response:
        with state.lock:
            sub = state.subscriptions.get(sub_id)
        if sub is None:
            return _fhir(operation_outcome("not-found", "No such subscription."), 404)
        return _fhir(sub["resource"])

    @app.delete("/fhir/Subscription/<sub_id>")
    def subscription_delete(sub_id: str) -> Response:
        with state.lock:
            state.subscriptions.pop(sub_id, None)
        return Response(status=204)

    return app


def _subscription_endpoint(doc: Any) -> str:
    if not isinstance(doc, dict) or doc.get("resourceType") != "Subscription":
        raise BadRequest("Expected a Subscription resource.")
    _validate(Subscription, doc)
    channel = doc.get("channel") if isinstance(doc.get("channel"), dict) else {}
    endpoint = channel.get("endpoint")
    if channel.get("type", "rest-hook") != "rest-hook" or not isinstance(endpoint, str) \
            or urlsplit(endpoint).scheme not in ("http", "https"):
        raise BadRequest("Only rest-hook subscriptions with an http(s) endpoint are supported.")
    return endpoint


# -- Claim/$submit kinds -------------------------------------------------------------------


def _submit(state: SimState, parsed: Parsed) -> Answer:
    identifier = parsed.claim_identifier or ""
    scenario = behaviour(parsed.member_id)
    with state.lock:
        existing = state.claims.get(identifier)
        if existing is not None:  # the idempotency key is the Claim.identifier
            return 200, existing.first_response, False, None
        if scenario == "SIM-FLAKY":
            count = state.flaky.get(identifier, 0)
            if count < FLAKY_FAILURES:
                state.flaky[identifier] = count + 1
                return 503, "Service Unavailable\n", False, {"Retry-After": "1"}
        decisions = None
        error: tuple[str, str, str] | None = None
        if parsed.appeal:
            # An appeal is a new request (its own Claim.identifier) whose Claim.related names
            # the request it appeals; the payer must know that request.
            if state.find(parsed.related) is None:
                error = ("AA", "Authorization/Access Number Not Found", "C")
            else:
                decisions = decide_appeal(scenario, identifier, parsed.lines)
        elif parsed.related is not None and parsed.related in state.rejected:
            # A resubmission of a request this payer rejected. Not allowed after follow-up
            # N/S/Y; after AAA 15 it must now carry the documentation that was missing;
            # otherwise (e.g. a corrected member id) it is decided like a first request.
            code, followup = state.rejected[parsed.related]
            if followup in ("N", "S", "Y"):
                error = ("41", "Authorization/Access Restrictions", followup)
            elif code == "15":
                decisions = decide("SIM-APPROVE", identifier, parsed.lines) \
                    if parsed.has_attachment else None
                error = None if decisions else ("15", "Required application data missing", "C")
            elif scenario in ("SIM-REJECT", "SIM-NORESUBMIT", "SIM-NOTFOUND"):
                error = (code, "Rejected again", followup)
        elif scenario == "SIM-REJECT":
            error = ("15", "Required application data missing", "C")
        elif scenario == "SIM-NORESUBMIT":
            error = ("41", "Authorization/Access Restrictions", "N")
        elif scenario == "SIM-NOTFOUND":
            error = ("75", "Subscriber/Insured Not Found", "C")
        if error is not None:
            state.rejected[identifier] = (error[0], error[2])
            doc = response_bundle(None, identifier, parsed.claim_system, context=parsed.context,
                                  outcome="error", errors=[_error(*error)])
            return 200, doc, False, None
        claim = SimClaim(
            identifier=identifier, system=parsed.claim_system, member_id=parsed.member_id,
            scenario=scenario, lines={ln.sequence: ln for ln in parsed.lines},
            decisions=decisions or decide(scenario, identifier, parsed.lines),
            context=parsed.context,
            response_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"demo-payer:cr:{identifier}")),
            info_pending=scenario == "SIM-INFO" and decisions is None,
        )
        claim.first_response = _dumps(response_bundle(claim, identifier, parsed.claim_system,
                                                      context=claim.context))
        state.claims[identifier] = claim
        if scenario == "SIM-PEND" and decisions is None:
            claim.pend_until = time.monotonic() + state.settings.pend_seconds
            timer = threading.Timer(state.settings.pend_seconds, _notify, args=(state, claim))
            timer.daemon = True
            state.timers = [t for t in state.timers if t.is_alive()] + [timer]
            timer.start()
        return 200, claim.first_response, True, None


def _related_claim(state: SimState, parsed: Parsed) -> SimClaim | None:
    return state.find(parsed.claim_identifier) or state.find(parsed.related)


def _update(state: SimState, parsed: Parsed) -> Answer:
    """An update: lines changed, added or cancelled, documentation added (SIM-INFO → A1)."""
    with state.lock:
        if parsed.bundle_key in state.replays:
            return 200, state.replays[parsed.bundle_key], False, None
        claim = _related_claim(state, parsed)
        if claim is None:
            return 404, operation_outcome("not-found", "The related claim is unknown."), \
                False, None
        _refresh(claim)
        if claim.decisions and all(d.action == "A3" for d in claim.decisions.values()):
            # PAS: a denied request cannot be updated; a new request (an appeal) is needed.
            return 422, operation_outcome(
                "business-rule", "A denied request cannot be updated; submit a new request."), \
                False, None
        for line in parsed.lines:
            claim.lines[line.sequence] = line
            if line.sequence in parsed.cancelled_lines:
                claim.decisions[line.sequence] = Decision("C")
            elif line.sequence in parsed.changed_lines or line.sequence not in claim.decisions:
                claim.decisions[line.sequence] = decide(claim.scenario, claim.identifier,
                                                        [line])[line.sequence]
        if claim.info_pending and parsed.has_attachment:
            claim.info_pending = False
            for seq, line in claim.lines.items():
                if claim.decisions[seq].action == "A4":
                    claim.decisions[seq] = _approval(claim.identifier, line)
        claim.updated_at = _now()
        if parsed.claim_identifier and parsed.claim_identifier != claim.identifier:
            state.aliases[parsed.claim_identifier] = claim.identifier
        body = _dumps(response_bundle(claim, parsed.claim_identifier or claim.identifier,
                                      parsed.claim_system, context=claim.context))
        state.replays[parsed.bundle_key] = body
        return 200, body, True, None


def _cancel(state: SimState, parsed: Parsed) -> Answer:
    """Cancel the whole request: every line `C`, no notification afterwards."""
    with state.lock:
        if parsed.bundle_key in state.replays:
            return 200, state.replays[parsed.bundle_key], False, None
        claim = _related_claim(state, parsed)
        if claim is None:
            return 404, operation_outcome("not-found", "The related claim is unknown."), \
                False, None
        claim.cancelled = True
        claim.pend_until = None
        claim.info_pending = False
        claim.decisions = {seq: Decision("C") for seq in claim.lines}
        claim.updated_at = _now()
        if parsed.claim_identifier and parsed.claim_identifier != claim.identifier:
            state.aliases[parsed.claim_identifier] = claim.identifier
        body = _dumps(response_bundle(claim, parsed.claim_identifier or claim.identifier,
                                      parsed.claim_system, context=claim.context))
        state.replays[parsed.bundle_key] = body
        return 200, body, True, None


# -- eligibility ---------------------------------------------------------------------------


def _eligibility_request(doc: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The CoverageEligibilityRequest (bare, or first of a Bundle) and the Bundle's index."""
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
        _validate(Bundle, doc)
        index = _resolver(doc)
        found = [e["resource"] for e in index.values()
                 if e["resource"].get("resourceType") == "CoverageEligibilityRequest"]
        if not found:
            raise BadRequest("The Bundle has no CoverageEligibilityRequest.")
        return found[0], index
    if not isinstance(doc, dict) or doc.get("resourceType") != "CoverageEligibilityRequest":
        raise BadRequest("Expected a CoverageEligibilityRequest.")
    _validate(CoverageEligibilityRequest, doc)
    return doc, {}


def _eligibility_answer(req: dict[str, Any], index: dict[str, dict[str, Any]]
                        ) -> tuple[str | None, dict[str, Any]]:
    contained = {f"#{r.get('id')}": r for r in req.get("contained") or () if isinstance(r, dict)}
    member_id = None
    for ins in req.get("insurance") or ():
        ref = ins.get("coverage") if isinstance(ins, dict) else None
        coverage = contained.get((ref or {}).get("reference") or "") or _resolve(index, ref) or {}
        if coverage.get("subscriberId"):
            member_id = str(coverage["subscriberId"])
            break
    scenario = behaviour(member_id)
    patient = contained.get((req.get("patient") or {}).get("reference") or "")
    answer: dict[str, Any] = {"resourceType": "CoverageEligibilityResponse",
                              "id": str(uuid.uuid4())}
    if patient:
        answer["contained"] = [patient]
    answer.update({
        "status": "active",
        "purpose": req.get("purpose") or ["validation"],
        "patient": {"reference": f"#{patient['id']}"} if patient else {"display": "Beneficiary"},
    })
    if req.get("servicedDate"):
        answer["servicedDate"] = req["servicedDate"]
    answer.update({
        "created": _instant(),
        "request": ({"identifier": req["identifier"][0]} if req.get("identifier")
                    else {"display": "CoverageEligibilityRequest"}),
        "insurer": {"display": "Demo Health Plan"},
    })
    if scenario == "SIM-NOTFOUND":
        answer["outcome"] = "error"
        answer["disposition"] = "Subscriber/Insured Not Found"
        answer["error"] = [_error("75", "Subscriber/Insured Not Found")]
    else:
        active = scenario != "SIM-INACTIVE"
        answer["outcome"] = "complete"
        answer["disposition"] = ("Policy is currently in effect." if active
                                 else "Policy is not in effect on the date of service.")
        insurance: dict[str, Any] = {"coverage": {"display": "Demo Health Plan PPO"},
                                     "inforce": active}
        items = [{"productOrService": i["productOrService"], "authorizationRequired": True}
                 for i in req.get("item") or ()
                 if isinstance(i, dict) and isinstance(i.get("productOrService"), dict)]
        if items and active:
            insurance["item"] = items
        answer["insurance"] = [insurance]
    _check(CoverageEligibilityResponse, answer)
    return member_id, answer


# ---------------------------------------------------------------- serving


class QuietRequestHandler(WSGIRequestHandler):
    """Access log with method, path (no query string: it may hold a member id) and status."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.info("%s %s %s", self.command, urlsplit(self.path).path, getattr(code, "value", code))

    def log_error(self, format: str, *args: Any) -> None:
        log.warning("request error")


class SimServer:
    """A simulator on a thread (tests, `make run`): `SimServer().start()`, `.url`, `.stop()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 settings: Mapping[str, Any] | None = None):
        self.app = create_sim_app(settings)
        self.state: SimState = self.app.extensions["payer_sim"]
        self.server: BaseWSGIServer = make_server(host, port, self.app, threaded=True,
                                                  request_handler=QuietRequestHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="payer-sim",
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def fhir_base(self) -> str:
        return f"{self.url}/fhir"

    def start(self) -> SimServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.state.shutdown()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_sim(host: str = "127.0.0.1", port: int = 8090,
            settings: Mapping[str, Any] | None = None) -> None:
    """Serve the simulator until interrupted (what `authsvc payer-sim` runs)."""
    app = create_sim_app(settings)
    state: SimState = app.extensions["payer_sim"]
    server = make_server(host, port, app, threaded=True, request_handler=QuietRequestHandler)
    log.info("payer simulator listening on http://%s:%s/fhir", host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        state.shutdown()
        server.server_close()
