"""Da Vinci PAS 2.2.1 / FHIR R4 payer adapter (prior auth) plus FHIR R4 CoverageEligibility.

The one module that maps `authsvc.domain.payer` value objects to and from PAS Bundles and
speaks HTTP to a PAS payer. Requests are built as plain dicts shaped like the guide's examples
(`../shared/fixtures/pas-2.2.1/Bundle-*AuthorizationBundleExample.json`), validated with the
`fhir.resources` R4B models and serialized by them, so nothing unvalidated leaves. Responses
are read leniently from JSON (a payer's extra elements never fail a parse), but a body that
is not a usable PAS response is a typed failure, never a guess.

Transport rules (reliability.md §4.3): connect 3 s, read `timeout_seconds`, a total deadline of
`timeout_seconds` while streaming the body, a 2 MiB body cap, no redirects, TLS verified.
Every HTTP exchange, success or failure, goes to the `recorder`; bodies are never logged.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import email.utils
import http.client
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import requests
import urllib3.exceptions
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.coverageeligibilityrequest import CoverageEligibilityRequest
from fhir.resources.R4B.subscription import Subscription
from prometheus_client import Counter

from authsvc.adapters.payers.registry import PayerConfig
from authsvc.domain import clock
from authsvc.domain.payer import (
    Attachment,
    ClaimLine,
    ClaimRequest,
    DenialReason,
    EligibilityAnswer,
    EligibilityRequest,
    ExchangeRecord,
    InfoRequest,
    LineDecision,
    Party,
    PayerAnswer,
    PayerError,
    PayerOutcomeUnknown,
    PayerRejected,
    PayerUnavailable,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
TLS_ALERTS = Counter("authsvc_payer_tls_errors", "Payer calls refused because the payer's "
                     "TLS certificate did not verify (an alert: possible interception)",
                     ["payer"])

# ---------------------------------------------------------------- vocabulary

PAS = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/"
PAS_TEMP_CODES = "http://hl7.org/fhir/us/davinci-pas/CodeSystem/PASTempCodes"
PAS_TOPIC = "http://hl7.org/fhir/us/davinci-pas/SubscriptionTopic/PASSubscriptionTopic"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"

EXT_LEVEL_OF_SERVICE = PAS + "extension-levelOfServiceCode"
EXT_CERTIFICATION_TYPE = PAS + "extension-certificationType"
EXT_REQUEST_TYPE = PAS + "extension-serviceItemRequestType"
EXT_INFO_CHANGED = PAS + "extension-infoChanged"
EXT_INFO_CANCELLED = PAS + "modifierextension-infoCancelled"
EXT_CARE_TEAM_SCOPE = PAS + "extension-careTeamClaimScope"
EXT_DOCUMENT_INFO = PAS + "extension-documentInformation"
EXT_REVIEW_ACTION = PAS + "extension-reviewAction"
EXT_REVIEW_ACTION_CODE = PAS + "extension-reviewActionCode"
EXT_PREAUTH_PERIOD = PAS + "extension-itemPreAuthPeriod"
EXT_PREAUTH_ISSUE_DATE = PAS + "extension-itemPreAuthIssueDate"
EXT_AUTHORIZED_DETAIL = PAS + "extension-itemAuthorizedDetail"
EXT_AUTHORIZATION_NUMBER = PAS + "extension-authorizationNumber"
EXT_ADMIN_REF = PAS + "extension-administrationReferenceNumber"
EXT_REQUESTED_SERVICE_DATE = PAS + "extension-itemRequestedServiceDate"
EXT_ERROR_ELEMENT = PAS + "extension-errorElement"
EXT_ERROR_PATH = PAS + "extension-errorPath"
EXT_ERROR_FOLLOWUP = PAS + "extension-errorFollowupAction"
EXT_REVIEWER = PAS + "extension-claimResponseReviewer"

PROFILE_REQUEST_BUNDLE = PAS + "profile-pas-request-bundle"
PROFILE_RESPONSE_BUNDLE = PAS + "profile-pas-response-bundle"
PROFILE_INQUIRY_REQUEST_BUNDLE = PAS + "profile-pas-inquiry-request-bundle"
PROFILE_INQUIRY_RESPONSE_BUNDLE = PAS + "profile-pas-inquiry-response-bundle"
PROFILE_CLAIM = PAS + "profile-claim"
PROFILE_CLAIM_UPDATE = PAS + "profile-claim-update"
PROFILE_CLAIM_INQUIRY = PAS + "profile-claim-inquiry"
PROFILE_CLAIM_RESPONSE = PAS + "profile-claimresponse"
PROFILE_BENEFICIARY = PAS + "profile-beneficiary"
PROFILE_COVERAGE = PAS + "profile-coverage"
PROFILE_INSURER = PAS + "profile-insurer"
PROFILE_PRACTITIONER = PAS + "profile-practitioner"
PROFILE_ORGANIZATION = PAS + "profile-organization"
PROFILE_DOCUMENT_REFERENCE = PAS + "profile-documentreference"
PROFILE_BACKPORT_SUBSCRIPTION = BACKPORT + "backport-subscription"

X12 = "https://codesystem.x12.org/005010/"
X12_REVIEW_ACTION = X12 + "306"  # HCR01
X12_REVIEW_REASON = X12 + "886"  # HCR03
X12_REJECT_REASON = X12 + "901"  # AAA03
X12_FOLLOWUP = X12 + "889"  # AAA04
X12_CERTIFICATION_TYPE = X12 + "1322"  # UM02
X12_LEVEL_OF_SERVICE = X12 + "1338"  # UM06
X12_REQUEST_CATEGORY = X12 + "1525"  # UM01
X12_SERVICE_TYPE = X12 + "1365"  # UM03
X12_ENTITY = X12 + "98"  # NM101

CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = "https://bluebutton.cms.gov/resources/codesystem/hcpcs"
CODE_SYSTEMS = {"CPT": CPT, "HCPCS": HCPCS}
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
NPI = "http://hl7.org/fhir/sid/us-npi"
POS = "https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

#: Our identifier systems. `CLAIM_ID_SYSTEM` carries the case id, the payer's idempotency key.
CLAIM_ID_SYSTEM = "urn:authsvc:claim"
BUNDLE_ID_SYSTEM = "urn:authsvc:bundle"
ELIGIBILITY_ID_SYSTEM = "urn:authsvc:eligibility"
MRN_SYSTEM = "urn:authsvc:mrn"
PAYER_ID_SYSTEM = "urn:authsvc:payer"

CERTIFICATION_TYPES = {
    "I": "Initial", "1": "Appeal - Immediate", "2": "Appeal - Standard", "3": "Cancel",
    "4": "Extension", "N": "Reconsideration", "R": "Renewal", "S": "Revised",
}
LEVEL_OF_SERVICE = {"expedited": ("U", "Urgent"), "standard": ("E", "Elective")}
#: Review actions that grant something: only they carry an authorization number.
GRANTING_ACTIONS = frozenset({"A1", "A2", "A6"})
#: X12 901 "Subscriber/Insured Not Found".
AAA_SUBSCRIBER_NOT_FOUND = "75"

FHIR_JSON = "application/fhir+json"
_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
MAX_BODY_BYTES = 2 * 1024 * 1024
CONNECT_TIMEOUT = 3.0
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:authsvc:pas-fhir")
_LOINC_CODE = re.compile(r"^\d{1,7}-\d$")


class PasParseError(ValueError):
    """A payer document that is not a usable PAS / FHIR answer (no PHI in the message)."""


class NoClaimResponse(PasParseError):
    """A well-formed document without any ClaimResponse (an inquiry that found nothing)."""


# ---------------------------------------------------------------- small helpers


def _uid(*parts: str) -> str:
    """A GUID derived from non-PHI parts, so a retry rebuilds byte-identical resources."""
    return str(uuid.uuid5(_NAMESPACE, "|".join(parts)))


def _instant(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _cc(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    return {"coding": [_coding(system, code, display)]}


def _ref(full_url: str) -> dict[str, str]:
    return {"reference": full_url}


def _urn(resource_id: str) -> str:
    return f"urn:uuid:{resource_id}"


# ---------------------------------------------------------------- request building


@dataclasses.dataclass(frozen=True)
class _Parts:
    """Ids of the resources of one request Bundle."""

    patient: str
    coverage: str
    insurer: str
    requester: str
    performer: str | None


def _fingerprint(kind: str, claim: ClaimRequest) -> str:
    """What makes two requests the same request: never names, birth dates or member ids."""
    lines = ";".join(
        f"{ln.sequence},{ln.code_system},{ln.code},{ln.quantity},{ln.service_start},"
        f"{ln.service_end},{ln.change_flag},{ln.cancelled}" for ln in claim.lines
    )
    attachments = ",".join(a.attachment_id for a in claim.attachments)
    return "|".join([
        kind, claim.claim_identifier, claim.certification_type, claim.urgency,
        claim.related_claim_identifier or "", lines, attachments, claim.level_of_care or "",
        claim.note or "",
    ])


def _patient(pid: str, claim: ClaimRequest) -> dict[str, Any]:
    p = claim.patient
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"profile": [PROFILE_BENEFICIARY]},
        "identifier": [
            {"type": _cc(V2_0203, "MR"), "system": MRN_SYSTEM, "value": p.mrn},
            {"type": _cc(V2_0203, "MB"), "value": claim.coverage.member_id},
        ],
        "name": [{"family": p.family_name, "given": [p.given_name]}],
        "gender": p.sex if p.sex in ("female", "male", "other", "unknown") else "unknown",
        "birthDate": p.birth_date.isoformat(),
    }


def _coverage(parts: _Parts, claim: ClaimRequest) -> dict[str, Any]:
    cov = claim.coverage
    out: dict[str, Any] = {
        "resourceType": "Coverage",
        "id": parts.coverage,
        "meta": {"profile": [PROFILE_COVERAGE]},
        "identifier": [{"type": _cc(V2_0203, "MB"), "value": cov.member_id}],
        "status": "active",
        "subscriberId": cov.member_id,
        "beneficiary": _ref(_urn(parts.patient)),
        "relationship": _cc("http://terminology.hl7.org/CodeSystem/subscriber-relationship",
                            "self"),
        "payor": [_ref(_urn(parts.insurer))],
    }
    if cov.group_number:
        out["class"] = [{
            "type": _cc("http://terminology.hl7.org/CodeSystem/coverage-class", "group"),
            "value": cov.group_number,
        }]
    return out


def _insurer(oid: str, config: PayerConfig) -> dict[str, Any]:
    return {
        "resourceType": "Organization",
        "id": oid,
        "meta": {"profile": [PROFILE_INSURER]},
        "identifier": [{"system": PAYER_ID_SYSTEM, "value": config.id}],
        "active": True,
        "type": [_cc(X12_ENTITY, "PR", "Payer")],
        "name": config.name,
    }


def _practitioner(pid: str, party: Party) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Practitioner",
        "id": pid,
        "meta": {"profile": [PROFILE_PRACTITIONER]},
        "identifier": [{"system": NPI, "value": party.npi}],
    }
    if party.name:
        out["name"] = [{"text": party.name}]
    return out


def _organization(oid: str, party: Party) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Organization",
        "id": oid,
        "meta": {"profile": [PROFILE_ORGANIZATION]},
        "identifier": [{"system": NPI, "value": party.npi}],
        "active": True,
    }
    if party.name:
        out["name"] = party.name
    return out


def _document_reference(did: str, patient_id: str, att: Attachment) -> dict[str, Any]:
    doc_type = (_cc(LOINC, att.loinc) if att.loinc else {"text": "Clinical documentation"})
    return {
        "resourceType": "DocumentReference",
        "id": did,
        "meta": {"profile": [PROFILE_DOCUMENT_REFERENCE]},
        "status": "current",
        "type": doc_type,
        "subject": _ref(_urn(patient_id)),
        "content": [{"attachment": {
            "contentType": att.content_type,
            "data": base64.b64encode(att.data).decode("ascii"),
            "title": att.title,
        }}],
    }


def _item(line: ClaimLine, claim: ClaimRequest, kind: str, has_performer: bool) -> dict[str, Any]:
    cert = "3" if line.cancelled else claim.certification_type
    ext: list[dict[str, Any]] = [
        {"url": EXT_REQUEST_TYPE,
         "valueCodeableConcept": _cc(X12_REQUEST_CATEGORY, "HS", "Health Services Review")},
        {"url": EXT_CERTIFICATION_TYPE,
         "valueCodeableConcept": _cc(X12_CERTIFICATION_TYPE, cert, CERTIFICATION_TYPES.get(cert))},
    ]
    if kind == "update" and line.change_flag:
        ext.append({"url": EXT_INFO_CHANGED, "valueCode": line.change_flag})
    system = CODE_SYSTEMS.get(line.code_system)
    if system is None:
        raise ValueError(f"line {line.sequence}: code_system must be CPT or HCPCS")
    item: dict[str, Any] = {"extension": ext}
    if line.cancelled:
        item["modifierExtension"] = [{"url": EXT_INFO_CANCELLED, "valueBoolean": True}]
    item["sequence"] = line.sequence
    if has_performer:
        item["careTeamSequence"] = [1]
    if claim.diagnoses:
        item["diagnosisSequence"] = list(range(1, len(claim.diagnoses) + 1))
    item["category"] = _cc(X12_SERVICE_TYPE, "1", "Medical Care")
    item["productOrService"] = _cc(system, line.code)
    if line.service_end is not None:
        item["servicedPeriod"] = {"start": line.service_start.isoformat(),
                                  "end": line.service_end.isoformat()}
    else:
        item["servicedDate"] = line.service_start.isoformat()
    if claim.place_of_service:
        item["locationCodeableConcept"] = _cc(POS, claim.place_of_service)
    item["quantity"] = {"value": line.quantity}
    return item


def build_claim_bundle(claim: ClaimRequest, config: PayerConfig, kind: str = "submit",
                       now: dt.datetime | None = None) -> dict[str, Any]:
    """The PAS request Bundle for `kind` in submit|update|cancel|inquire, as validated JSON.

    Claim.identifier is always `claim.claim_identifier` (our case id). `related.claim` is the
    case's own first claim for an update or cancel, and `related_claim_identifier` (the case
    an extension, appeal or resubmission follows) for a submit.

    Every id and the Bundle identifier derive from the request (uuid5), and both timestamps are
    `claim.created_at`, so a retry resends the very same Bundle. `now` is used only when
    `created_at` is missing (then retries are not byte-identical; the service sets it).
    """
    if kind not in ("submit", "update", "cancel", "inquire"):
        raise ValueError(f"unknown PAS request kind {kind!r}")
    fp = _fingerprint(kind, claim)
    key = claim.claim_identifier
    parts = _Parts(
        patient=_uid(key, "patient"), coverage=_uid(key, "coverage"),
        insurer=_uid(key, "insurer", config.id), requester=_uid(key, "requester"),
        performer=_uid(key, "performer") if claim.performer else None,
    )
    created = _instant(claim.created_at or now or clock.now())
    claim_id = _uid(fp, "claim")

    header_ext: list[dict[str, Any]] = []
    code, display = LEVEL_OF_SERVICE.get(claim.urgency, LEVEL_OF_SERVICE["standard"])
    header_ext.append({"url": EXT_LEVEL_OF_SERVICE,
                       "valueCodeableConcept": _cc(X12_LEVEL_OF_SERVICE, code, display)})
    if kind in ("cancel", "inquire"):
        cert = "3" if kind == "cancel" else claim.certification_type
        header_ext.append({"url": EXT_CERTIFICATION_TYPE, "valueCodeableConcept":
                           _cc(X12_CERTIFICATION_TYPE, cert, CERTIFICATION_TYPES.get(cert))})

    profile = {"submit": PROFILE_CLAIM, "update": PROFILE_CLAIM_UPDATE,
               "cancel": PROFILE_CLAIM_UPDATE, "inquire": PROFILE_CLAIM_INQUIRY}[kind]
    resource: dict[str, Any] = {
        "resourceType": "Claim",
        "id": claim_id,
        "meta": {"profile": [profile]},
        "extension": header_ext,
        "identifier": [{"system": CLAIM_ID_SYSTEM, "value": claim.claim_identifier}],
        "status": "active",
        "type": _cc("http://terminology.hl7.org/CodeSystem/claim-type", "professional"),
        "use": "preauthorization",
        "patient": _ref(_urn(parts.patient)),
        "created": created,
        "insurer": _ref(_urn(parts.insurer)),
        "provider": _ref(_urn(parts.requester)),
        "priority": _cc("http://terminology.hl7.org/CodeSystem/processpriority",
                        "stat" if claim.urgency == "expedited" else "normal"),
    }
    if claim.performer and kind != "cancel":
        resource["careTeam"] = [{
            "extension": [{"url": EXT_CARE_TEAM_SCOPE, "valueBoolean": True}],
            "sequence": 1,
            "provider": _ref(_urn(parts.performer or "")),
            "role": _cc(X12_ENTITY, "SJ", "Service Provider"),
        }]

    docs: list[dict[str, Any]] = []
    supporting: list[dict[str, Any]] = []
    if kind in ("submit", "update"):
        for att in claim.attachments:
            did = _uid(key, "attachment", att.attachment_id)
            docs.append(_document_reference(did, parts.patient, att))
            info: dict[str, Any] = {}
            if kind == "update":
                info["extension"] = [{"url": EXT_INFO_CHANGED, "valueCode": "added"}]
            info.update({
                "sequence": len(supporting) + 1,
                "category": _cc(PAS_TEMP_CODES, "additionalInformation"),
                "valueReference": _ref(_urn(did)),
            })
            supporting.append(info)
        if claim.level_of_care:
            supporting.append({
                "sequence": len(supporting) + 1,
                "category": _cc(PAS_TEMP_CODES, "freeFormMessage"),
                "valueString": f"Level of care: {claim.level_of_care}",
            })
        if claim.note and kind == "submit":
            supporting.append({
                "sequence": len(supporting) + 1,
                "category": _cc(PAS_TEMP_CODES, "freeFormMessage"),
                "valueString": claim.note[:1000],
            })
    if supporting:
        resource["supportingInfo"] = supporting
    if claim.diagnoses and kind != "cancel":
        resource["diagnosis"] = [
            {"sequence": i, "diagnosisCodeableConcept": _cc(ICD10CM, code)}
            for i, code in enumerate(claim.diagnoses, start=1)
        ]
    resource["insurance"] = [{"sequence": 1, "focal": True,
                              "coverage": _ref(_urn(parts.coverage))}]
    # An update or cancel keeps our case id and points at that case's first claim (itself);
    # a new request (extension, appeal, resubmission) points at the case it follows.
    related = claim.claim_identifier if kind in ("update", "cancel") else (
        claim.related_claim_identifier if kind == "submit" else None)
    if related:
        resource["related"] = [{
            "claim": {"identifier": {"system": CLAIM_ID_SYSTEM, "value": related}},
            "relationship": _cc("http://terminology.hl7.org/CodeSystem/ex-relatedclaimrelationship",
                                "prior"),
        }]
    if kind != "cancel":
        if not claim.lines:
            raise ValueError("a PAS request needs at least one line")
        resource["item"] = [_item(ln, claim, kind, claim.performer is not None)
                            for ln in claim.lines]

    entries = [resource, _patient(parts.patient, claim), _coverage(parts, claim),
               _insurer(parts.insurer, config), _practitioner(parts.requester, claim.requester)]
    if claim.performer and parts.performer:
        entries.append(_organization(parts.performer, claim.performer))
    entries.extend(docs)
    bundle_id = _uid(fp, "bundle")
    doc = {
        "resourceType": "Bundle",
        "id": bundle_id,
        "meta": {"profile": [PROFILE_INQUIRY_REQUEST_BUNDLE if kind == "inquire"
                             else PROFILE_REQUEST_BUNDLE]},
        "identifier": {"system": BUNDLE_ID_SYSTEM, "value": bundle_id},
        "type": "collection",
        "timestamp": created,
        "entry": [{"fullUrl": _urn(r["id"]), "resource": r} for r in entries],
    }
    return _validated(Bundle, doc)


def build_eligibility_request(request: EligibilityRequest, config: PayerConfig,
                              now: dt.datetime | None = None) -> dict[str, Any]:
    """A FHIR R4 CoverageEligibilityRequest, its Patient/Coverage/payer/provider contained."""
    p, cov = request.patient, request.coverage
    coverage: dict[str, Any] = {
        "resourceType": "Coverage", "id": "coverage", "status": "active",
        "identifier": [{"type": _cc(V2_0203, "MB"), "value": cov.member_id}],
        "subscriberId": cov.member_id,
        "beneficiary": {"reference": "#patient"},
        "relationship": _cc("http://terminology.hl7.org/CodeSystem/subscriber-relationship",
                            "self"),
        "payor": [{"reference": "#insurer"}],
    }
    if cov.group_number:
        coverage["class"] = [{
            "type": _cc("http://terminology.hl7.org/CodeSystem/coverage-class", "group"),
            "value": cov.group_number,
        }]
    contained = [
        {"resourceType": "Patient", "id": "patient",
         "identifier": [{"type": _cc(V2_0203, "MR"), "system": MRN_SYSTEM, "value": p.mrn}],
         "name": [{"family": p.family_name, "given": [p.given_name]}],
         "gender": p.sex if p.sex in ("female", "male", "other", "unknown") else "unknown",
         "birthDate": p.birth_date.isoformat()},
        coverage,
        {"resourceType": "Organization", "id": "insurer",
         "identifier": [{"system": PAYER_ID_SYSTEM, "value": config.id}], "name": config.name},
        {"resourceType": "Practitioner", "id": "provider",
         "identifier": [{"system": NPI, "value": request.requester.npi}]},
    ]
    doc: dict[str, Any] = {
        "resourceType": "CoverageEligibilityRequest",
        "id": _uid("eligibility", request.request_id),
        "contained": contained,
        "identifier": [{"system": ELIGIBILITY_ID_SYSTEM, "value": request.request_id}],
        "status": "active",
        "purpose": ["validation", "benefits"],
        "patient": {"reference": "#patient"},
        "servicedDate": request.date_of_service.isoformat(),
        "created": _instant(now or clock.now()),
        "provider": {"reference": "#provider"},
        "insurer": {"reference": "#insurer"},
        "insurance": [{"focal": True, "coverage": {"reference": "#coverage"}}],
    }
    items = [{"productOrService": _cc(CODE_SYSTEMS[system], code)}
             for system, code in request.codes if system in CODE_SYSTEMS]
    if items:
        doc["item"] = items
    return _validated(CoverageEligibilityRequest, doc)


def build_subscription(callback_url: str, config: PayerConfig) -> dict[str, Any]:
    """The R4 backport PAS Subscription (rest-hook, full-resource payload)."""
    doc = {
        "resourceType": "Subscription",
        "meta": {"profile": [PROFILE_BACKPORT_SUBSCRIPTION]},
        "status": "requested",
        "reason": "Prior authorization decisions for authsvc",
        "criteria": PAS_TOPIC,
        "_criteria": {"extension": [{
            "url": BACKPORT + "backport-filter-criteria",
            "valueString": f"orgIdentifier={config.org_identifier or 'authsvc'}",
        }]},
        "channel": {
            "type": "rest-hook",
            "endpoint": callback_url,
            "payload": FHIR_JSON,
            "_payload": {"extension": [{
                "url": BACKPORT + "backport-payload-content", "valueCode": "full-resource",
            }]},
        },
    }
    return _validated(Subscription, doc)


def _validated(model: Any, doc: dict[str, Any]) -> dict[str, Any]:
    """With AUTHSVC_FHIR_VALIDATE=1 (the test suite), validate with the R4B model and send its
    serialization. Validation costs ~30 ms of CPU per Bundle, so production sends the built
    document as is: the builders are deterministic and the tests validate every shape."""
    if os.environ.get("AUTHSVC_FHIR_VALIDATE") != "1":
        return doc
    try:
        parsed = model.model_validate(doc)
    except Exception as exc:  # pydantic's message echoes input values (PHI): drop it
        raise ValueError(f"built {doc.get('resourceType')} does not validate as FHIR R4B "
                         f"({type(exc).__name__})") from None
    out: dict[str, Any] = json.loads(parsed.model_dump_json())
    return out


# ---------------------------------------------------------------- response parsing


def _exts(obj: Any, *names: str) -> Iterator[dict[str, Any]]:
    """Extensions of `obj` whose url is one of `names` or ends with `/name`."""
    if not isinstance(obj, dict):
        return
    for ext in obj.get("extension") or ():
        if not isinstance(ext, dict):
            continue
        url = ext.get("url")
        if isinstance(url, str) and any(url == n or url.endswith("/" + n) for n in names):
            yield ext


def _ext(obj: Any, *names: str) -> dict[str, Any] | None:
    return next(_exts(obj, *names), None)


def _code(cc: Any, system: str | None = None) -> tuple[str | None, str | None]:
    """(code, display) of the first coding (of `system`, if given) of a CodeableConcept."""
    if not isinstance(cc, dict):
        return None, None
    codings = [c for c in cc.get("coding") or () if isinstance(c, dict)]
    preferred = [c for c in codings if system and c.get("system") == system] or codings
    for c in preferred:
        if isinstance(c.get("code"), str):
            display = c.get("display") if isinstance(c.get("display"), str) else None
            return c["code"], display or (cc.get("text") if isinstance(cc.get("text"), str)
                                          else None)
    return None, cc.get("text") if isinstance(cc.get("text"), str) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _date(value: Any) -> dt.date | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        return None


def _datetime(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        if len(value) == 10:
            return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _flatten(resource: dict[str, Any]) -> tuple[list[dict[str, Any]], int | None]:
    """Every resource in a Bundle/Parameters tree, plus the notification event number."""
    found: list[dict[str, Any]] = []
    event: list[int] = []
    since: list[int] = []

    def walk(res: Any, depth: int) -> None:
        if not isinstance(res, dict) or depth > 8:
            return
        found.append(res)
        rt = res.get("resourceType")
        if rt == "Bundle":
            for entry in res.get("entry") or ():
                if isinstance(entry, dict):
                    walk(entry.get("resource"), depth + 1)
        elif rt == "Parameters":
            for param in res.get("parameter") or ():
                if not isinstance(param, dict):
                    continue
                if param.get("name") == "notification-event":
                    for part in param.get("part") or ():
                        if isinstance(part, dict) and part.get("name") == "event-number":
                            n = _int(part.get("valueString", part.get("valueInteger",
                                                                      part.get("valueInteger64"))))
                            if n is not None:
                                event.append(n)
                elif param.get("name") == "events-since-subscription-start":
                    n = _int(param.get("valueString", param.get("valueInteger")))
                    if n is not None:
                        since.append(n)
                walk(param.get("resource"), depth + 1)
        for contained in res.get("contained") or ():
            walk(contained, depth + 1)

    walk(resource, 0)
    if event:
        return found, max(event)
    return found, (max(since) if since else None)


def _errors(items: Any) -> tuple[PayerError, ...]:
    out = []
    for err in items or ():
        if not isinstance(err, dict):
            continue
        code, display = _code(err.get("code"), X12_REJECT_REASON)
        followup_ext = _ext(err, "extension-errorFollowupAction")
        followup = _code(followup_ext.get("valueCodeableConcept"), X12_FOLLOWUP)[0] \
            if followup_ext else None
        element_ext = _ext(err, "extension-errorElement")
        element = None
        if element_ext:
            element = _str(element_ext.get("valueString")) or _str(
                (_ext(element_ext, "error") or {}).get("valueString"))
        path_ext = _ext(err, "extension-errorPath")
        path = _str(path_ext.get("valueString")) if path_ext else None
        out.append(PayerError(code=code, followup=followup, element=element, path=path,
                              message=display))
    return tuple(out)


def _review(adjudications: Any) -> dict[str, Any]:
    """code, number and reason of the PAS reviewAction extension of an item or addItem."""
    for adj in adjudications or ():
        review = _ext(adj, "extension-reviewAction")
        if not review:
            continue
        code_ext = _ext(review, "extension-reviewActionCode", "code")
        number_ext = _ext(review, "number")
        reason_ext = _ext(review, "reasonCode")
        code = _code(code_ext.get("valueCodeableConcept"), X12_REVIEW_ACTION)[0] \
            if code_ext else None
        reason = _code(reason_ext.get("valueCodeableConcept"), X12_REVIEW_REASON) \
            if reason_ext else (None, None)
        return {"code": code, "number": _str(number_ext.get("valueString")) if number_ext
                else None, "reason": reason}
    return {"code": None, "number": None, "reason": (None, None)}


def _period(obj: Any) -> tuple[dt.date | None, dt.date | None]:
    ext = _ext(obj, "extension-itemPreAuthPeriod")
    period = ext.get("valuePeriod") if ext else None
    if not isinstance(period, dict):
        return None, None
    return _date(period.get("start")), _date(period.get("end"))


def _line(item: dict[str, Any], notes: dict[int, str], cr: dict[str, Any]) -> LineDecision:
    seq = item.get("itemSequence")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise PasParseError("ClaimResponse.item without a positive itemSequence")
    review = _review(item.get("adjudication"))
    action = review["code"]
    if action is None:  # the inquiry style: reviewActionCode directly on the item
        direct = _ext(item, "extension-reviewActionCode")
        action = _code(direct.get("valueCodeableConcept"), X12_REVIEW_ACTION)[0] \
            if direct else None
    auth_ext = _ext(item, "extension-authorizationNumber")
    auth = (_str(auth_ext.get("valueString")) if auth_ext else None) or review["number"]
    if auth is None and action in GRANTING_ACTIONS:
        auth = _str(cr.get("preAuthRef"))
    if action is not None and action not in GRANTING_ACTIONS:
        auth = None
    valid_from, valid_to = _period(item)
    if valid_from is None and valid_to is None and action in GRANTING_ACTIONS:
        period = cr.get("preAuthPeriod")
        if isinstance(period, dict):
            valid_from, valid_to = _date(period.get("start")), _date(period.get("end"))
    quantity = code = None
    detail = _ext(item, "extension-itemAuthorizedDetail")
    if detail:
        q = _ext(detail, "quantity")
        if q and isinstance(q.get("valueQuantity"), dict):
            quantity = _quantity(q["valueQuantity"].get("value"))
        c = _ext(detail, "productOrServiceCode")
        if c:
            code = _code(c.get("valueCodeableConcept"))[0]
    reason_code, reason_display = review["reason"]
    linked = [notes[k] for k in map(_int, item.get("noteNumber") or ()) if k in notes]
    text: str | None = " ".join(linked) if linked else None
    if text is None and (reason_code or action == "A3") and notes:
        text = " ".join(notes.values())
    text = text or reason_display
    denial = DenialReason(reason_code, text) if (reason_code or (text and action == "A3")) \
        else None
    admin_ext = _ext(item, "extension-administrationReferenceNumber")
    return LineDecision(
        sequence=seq, review_action=action, auth_number=auth, authorized_quantity=quantity,
        authorized_code=code, valid_from=valid_from, valid_to=valid_to, denial_reason=denial,
        administration_ref=_str(admin_ext.get("valueString")) if admin_ext else None,
    )


def _quantity(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number >= 0 else None


def _apply_add_items(lines: dict[int, LineDecision], cr: dict[str, Any]) -> None:
    """Payer modifications: an A6 item is granted as the addItem with the same itemSequence."""
    for add in cr.get("addItem") or ():
        if not isinstance(add, dict):
            continue
        review = _review(add.get("adjudication"))
        quantity = _quantity((add.get("quantity") or {}).get("value")) \
            if isinstance(add.get("quantity"), dict) else None
        code = _code(add.get("productOrService"))[0]
        auth_ext = _ext(add, "extension-authorizationNumber")
        auth = (_str(auth_ext.get("valueString")) if auth_ext else None) or review["number"]
        valid_from, valid_to = _period(add)
        for seq in add.get("itemSequence") or ():
            seq = _int(seq)
            if seq is None:
                continue
            line = lines.get(seq)
            if line is None:  # a service the payer added on its own
                lines[seq] = LineDecision(
                    sequence=seq, review_action=review["code"],
                    auth_number=auth if review["code"] in GRANTING_ACTIONS
                    or review["code"] is None else None,
                    authorized_quantity=quantity, authorized_code=code,
                    valid_from=valid_from, valid_to=valid_to,
                )
            elif line.review_action in ("A6", None):
                lines[seq] = dataclasses.replace(
                    line,
                    review_action=line.review_action or review["code"],
                    authorized_quantity=quantity if quantity is not None
                    else line.authorized_quantity,
                    authorized_code=code or line.authorized_code,
                    auth_number=line.auth_number or auth,
                    valid_from=line.valid_from or valid_from,
                    valid_to=line.valid_to or valid_to,
                )


def _info_request(resources: Iterable[dict[str, Any]]) -> InfoRequest | None:
    """LOINC codes the payer asks for through PAS Tasks or CommunicationRequests."""
    codes: list[str] = []
    texts: list[str] = []
    found = False
    for res in resources:
        rt = res.get("resourceType")
        if rt == "Task" and res.get("status") not in (
                "completed", "cancelled", "rejected", "failed", "entered-in-error"):
            found = True
            for inp in res.get("input") or ():
                if not isinstance(inp, dict):
                    continue
                code, _ = _code(inp.get("valueCodeableConcept"), LOINC)
                if code and _LOINC_CODE.match(code):
                    codes.append(code)
                elif _str(inp.get("valueString")) and _LOINC_CODE.match(inp["valueString"]):
                    codes.append(inp["valueString"])
            if _str(res.get("description")):
                texts.append(res["description"])
        elif rt == "CommunicationRequest" and res.get("status") not in (
                "completed", "revoked", "entered-in-error"):
            found = True
            for payload in res.get("payload") or ():
                if not isinstance(payload, dict):
                    continue
                content = _str(payload.get("contentString"))
                if content and _LOINC_CODE.match(content.strip()):
                    codes.append(content.strip())
                elif content:
                    texts.append(content)
                code, _ = _code(payload.get("contentCodeableConcept"), LOINC)
                if code and _LOINC_CODE.match(code):
                    codes.append(code)
            for note in res.get("note") or ():
                if isinstance(note, dict) and _str(note.get("text")):
                    texts.append(note["text"])
    if not found or (not codes and not texts):
        return None
    return InfoRequest(codes=tuple(dict.fromkeys(codes)), text=" ".join(texts) or None)


def _claim_identifier(cr: dict[str, Any], resources: list[dict[str, Any]]) -> str | None:
    def pick(identifiers: Any) -> str | None:
        ids = [i for i in identifiers or () if isinstance(i, dict) and _str(i.get("value"))]
        ours = [i for i in ids if i.get("system") == CLAIM_ID_SYSTEM]
        return (ours or ids)[0]["value"] if (ours or ids) else None

    found = pick(cr.get("identifier"))
    if found is None:
        request = cr.get("request")
        if isinstance(request, dict) and isinstance(request.get("identifier"), dict):
            found = _str(request["identifier"].get("value"))
    if found is None:
        claims = [r for r in resources if r.get("resourceType") == "Claim"]
        found = pick(claims[0].get("identifier")) if claims else None
    return found


def parse_response(resource: dict[str, Any]) -> PayerAnswer:
    """A PAS answer from a response Bundle, a bare ClaimResponse, an `$inquire` Parameters or
    a subscription notification Bundle. Raises `PasParseError` (`NoClaimResponse` when the
    document is fine but holds no ClaimResponse). `queued` (not PAS) reads as `complete`."""
    try:
        return _parse_response(resource)
    except (TypeError, AttributeError, KeyError, OverflowError):
        raise PasParseError("malformed ClaimResponse") from None


def _parse_response(resource: dict[str, Any]) -> PayerAnswer:
    if not isinstance(resource, dict) or resource.get("resourceType") not in (
            "Bundle", "ClaimResponse", "Parameters"):
        raise PasParseError("expected a Bundle, ClaimResponse or Parameters resource")
    resources, event_number = _flatten(resource)
    responses = [r for r in resources if r.get("resourceType") == "ClaimResponse"]
    if not responses:
        raise NoClaimResponse("no ClaimResponse in the payer's answer")
    cr = responses[0]
    outcome = cr.get("outcome")
    if outcome not in ("complete", "partial", "error", "queued"):
        raise PasParseError("ClaimResponse.outcome missing or unknown")
    items = cr.get("item") or []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise PasParseError("ClaimResponse.item is not a list of objects")
    notes: dict[int, str] = {}
    for note in cr.get("processNote") or ():
        if isinstance(note, dict) and _str(note.get("text")):
            notes[_int(note.get("number")) or len(notes) + 1] = note["text"]
    lines: dict[int, LineDecision] = {}
    for item in items:
        line = _line(item, notes, cr)
        lines[line.sequence] = line
    _apply_add_items(lines, cr)
    meta = cr.get("meta") if isinstance(cr.get("meta"), dict) else {}
    return PayerAnswer(
        outcome="complete" if outcome == "queued" else outcome,
        lines=tuple(lines[k] for k in sorted(lines)),
        errors=_errors(cr.get("error")),
        info_request=_info_request(resources),
        claim_identifier=_claim_identifier(cr, resources),
        payer_ref=_str(cr.get("preAuthRef")) or _str(cr.get("id")),
        event_number=event_number,
        last_updated=_datetime(meta.get("lastUpdated")) or _datetime(cr.get("created")),
    )


def parse_eligibility_response(resource: dict[str, Any]) -> EligibilityAnswer:
    """An EligibilityAnswer from a CoverageEligibilityResponse (bare or in a Bundle):
    inforce true → active, all false → inactive, AAA 75 → member_not_found, else error."""
    try:
        return _parse_eligibility(resource)
    except (TypeError, AttributeError, KeyError):
        raise PasParseError("malformed CoverageEligibilityResponse") from None


def _parse_eligibility(resource: dict[str, Any]) -> EligibilityAnswer:
    if not isinstance(resource, dict):
        raise PasParseError("expected a CoverageEligibilityResponse")
    resources, _ = _flatten(resource)
    found = [r for r in resources if r.get("resourceType") == "CoverageEligibilityResponse"]
    if not found:
        raise PasParseError("no CoverageEligibilityResponse in the payer's answer")
    resp = found[0]
    errors = _errors(resp.get("error"))
    insurance = [i for i in resp.get("insurance") or () if isinstance(i, dict)]
    inforce = [i.get("inforce") for i in insurance if isinstance(i.get("inforce"), bool)]
    if any(e.code == AAA_SUBSCRIBER_NOT_FOUND for e in errors):
        status = "member_not_found"
    elif any(inforce):
        status = "active"
    elif inforce:
        status = "inactive"
    else:
        status = "error"
    plan_name = None
    auth_flags: list[bool] = []
    for ins in insurance:
        coverage = ins.get("coverage")
        if plan_name is None and isinstance(coverage, dict):
            plan_name = _str(coverage.get("display"))
        for item in ins.get("item") or ():
            if isinstance(item, dict) and isinstance(item.get("authorizationRequired"), bool):
                auth_flags.append(item["authorizationRequired"])
    return EligibilityAnswer(
        status=status, plan_name=plan_name,
        auth_required=(any(auth_flags) if auth_flags else None), errors=errors,
    )


def parse_operation_outcome(resource: Any) -> tuple[PayerError, ...]:
    """OperationOutcome issues as PayerErrors (code = details code, else the issue type)."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "OperationOutcome":
        return ()
    out = []
    issues = resource.get("issue")
    for issue in issues if isinstance(issues, list) else ():
        if not isinstance(issue, dict):
            continue
        code, display = _code(issue.get("details"))
        where = issue.get("expression") or issue.get("location")
        where = [w for w in where if isinstance(w, str)] if isinstance(where, list) else []
        out.append(PayerError(
            code=code or _str(issue.get("code")), path=where[0] if where else None,
            message=display or _str(issue.get("diagnostics")),
        ))
    return tuple(out)


def _is_not_found(resource: Any) -> bool:
    return isinstance(resource, dict) and resource.get("resourceType") == "OperationOutcome" \
        and any(isinstance(i, dict) and i.get("code") == "not-found"
                for i in resource.get("issue") or ())


# ---------------------------------------------------------------- transport


@dataclasses.dataclass
class _Reply:
    status: int
    document: Any  # parsed JSON (dict) or None when the body is not JSON
    headers: Any


class _BodyFailure(Exception):
    """Reading the response body failed; the reason is safe to record."""


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


class PasFhirAdapter:
    """PayerAdapter over Da Vinci PAS 2.2.1 (FHIR R4) with `requests`.

    Without an injected `session`, each call uses its own short-lived Session, closed at once:
    adapters are built per use and shared across threads, and no pooled socket outlives a
    call. Inject a session to reuse connections (it must then not be shared across threads).
    """

    def __init__(self, config: PayerConfig, recorder: Callable[[ExchangeRecord], None],
                 session: requests.Session | None = None):
        self.config = config
        self.recorder = recorder
        self.session = session

    # -- PayerAdapter -------------------------------------------------------------------

    def check_eligibility(self, request: EligibilityRequest) -> EligibilityAnswer:
        """Coverage on the date of service; transport failures raise (all are retryable)."""
        body = build_eligibility_request(request, self.config)
        return self._call("eligibility", self.config.url(self.config.eligibility_path), body,
                          lambda reply: parse_eligibility_response(reply.document))

    def submit(self, claim: ClaimRequest) -> PayerAnswer:
        """POST Claim/$submit; an HTTP 200 rejection comes back as an answer (`.rejected`)."""
        return self._claim_call("submit", claim)

    def update(self, claim: ClaimRequest) -> PayerAnswer:
        """An update Claim (attachments, changed or cancelled lines) related to the first."""
        return self._claim_call("update", claim)

    def cancel(self, claim: ClaimRequest) -> PayerAnswer:
        """Cancel the whole request: certificationType 3 on the header, no items."""
        return self._claim_call("cancel", claim)

    def inquire(self, claim: ClaimRequest) -> PayerAnswer | None:
        """The payer's current answer for our Claim.identifier, None when it has no such claim.

        "No such claim" is HTTP 404 with an OperationOutcome issue `not-found` (what the
        simulator sends), or a well-formed answer without a ClaimResponse.
        """

        def interpret(reply: _Reply) -> PayerAnswer | None:
            if reply.status == 404 or _is_not_found(reply.document):
                return None
            try:
                return parse_response(reply.document)
            except NoClaimResponse:
                return None

        body = build_claim_bundle(claim, self.config, "inquire")
        return self._call("inquire", self.config.url("Claim/$inquire"), body, interpret,
                          not_found_ok=True)

    def register_subscription(self, callback_url: str) -> str:
        """Register the PAS rest-hook Subscription; returns the payer's subscription id."""

        def interpret(reply: _Reply) -> str:
            doc = reply.document
            if isinstance(doc, dict) and doc.get("resourceType") == "Subscription" \
                    and _str(doc.get("id")):
                return str(doc["id"])
            location = reply.headers.get("Location") or ""
            m = re.search(r"Subscription/([A-Za-z0-9\-.]{1,64})", location)
            if m:
                return m.group(1)
            raise PasParseError("subscription answer has no id")

        body = build_subscription(callback_url, self.config)
        return self._call("subscription", self.config.url("Subscription"), body, interpret)

    def parse_notification(self, body: bytes) -> PayerAnswer:
        """A PAS answer from a notification Bundle (signature checks belong to the caller)."""
        doc = _json(body)
        if not isinstance(doc, dict):
            raise PasParseError("notification body is not a JSON object")
        return parse_response(doc)

    # -- internals ----------------------------------------------------------------------

    def _claim_call(self, kind: str, claim: ClaimRequest) -> PayerAnswer:
        body = build_claim_bundle(claim, self.config, kind)
        return self._call(kind, self.config.url("Claim/$submit"), body,
                          lambda reply: parse_response(reply.document))

    def _call(self, kind: str, url: str, body: dict[str, Any],
              interpret: Callable[[_Reply], T], *, not_found_ok: bool = False) -> T:
        """One POST under the transport rules, its answer interpreted, the exchange recorded.

        Every failure becomes a PayerFailure; an answer `interpret` cannot read (PasParseError)
        is PayerOutcomeUnknown, since the payer may have acted on the request.
        """
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        record = ExchangeRecord(
            kind=kind, direction="out", url=url, http_status=None, started_at=clock.now(),
            finished_at=None, request_body=payload.decode("utf-8"), response_body=None,
        )
        started = time.monotonic()
        try:
            reply = self._classify(kind, self._send(url, payload, record, started), record,
                                   not_found_ok)
            try:
                return interpret(reply)
            except PasParseError as exc:
                record.error = f"unusable answer: {exc}"
                raise PayerOutcomeUnknown(f"payer {self.config.id}: {kind} answer is not "
                                          "usable FHIR", reply.status) from None
        finally:
            record.finished_at = clock.now()
            log.info("payer %s %s -> %s%s (%.0f ms)", self.config.id, kind,
                     record.http_status if record.http_status is not None else "-",
                     f" [{record.error}]" if record.error else "",
                     (time.monotonic() - started) * 1000)
            try:
                self.recorder(record)
            except Exception as exc:  # the answer matters more than its log row
                log.warning("payer %s %s: recording the exchange failed (%s)",
                            self.config.id, kind, type(exc).__name__)

    def _send(self, url: str, payload: bytes, record: ExchangeRecord,
              started: float) -> _Reply:
        timeout = self.config.timeout_seconds
        deadline = started + timeout
        headers = {
            "Content-Type": FHIR_JSON, "Accept": FHIR_JSON, "Accept-Encoding": "identity",
            "User-Agent": "authsvc-pas/1",
        }
        session = self.session or requests.Session()
        try:
            try:
                resp = session.post(
                    url, data=payload, headers=headers,
                    timeout=(min(CONNECT_TIMEOUT, timeout), timeout),
                    allow_redirects=False, stream=True, verify=True,
                )
            except requests.exceptions.ConnectTimeout:
                record.error = "connect timeout"
                raise PayerUnavailable(f"payer {self.config.id}: connect timeout") from None
            except requests.exceptions.SSLError:
                record.error = "TLS error"
                # S13: a payer whose certificate does not verify may be an interception; it is
                # retried like an outage, and it raises an alert (metric + log, no PHI)
                TLS_ALERTS.labels(self.config.id).inc()
                log.warning("ALERT payer %s: TLS certificate verification failed",
                            self.config.id, extra={"event": "alert:payer_tls_error"})
                raise PayerUnavailable(f"payer {self.config.id}: TLS error") from None
            except requests.exceptions.ReadTimeout:
                record.error = "read timeout"
                raise PayerOutcomeUnknown(f"payer {self.config.id}: no answer in time") from None
            except requests.exceptions.ConnectionError as exc:
                if _before_sending(exc):
                    record.error = "connection refused"
                    raise PayerUnavailable(
                        f"payer {self.config.id}: cannot connect") from None
                record.error = "connection lost"
                raise PayerOutcomeUnknown(
                    f"payer {self.config.id}: connection lost before the answer") from None
            except requests.exceptions.RequestException as exc:
                record.error = type(exc).__name__
                raise PayerOutcomeUnknown(
                    f"payer {self.config.id}: request failed ({type(exc).__name__})") from None
            try:
                record.http_status = resp.status_code
                try:
                    raw = _read_capped(resp, deadline)
                except _BodyFailure as exc:
                    record.error = str(exc)
                    raise PayerOutcomeUnknown(f"payer {self.config.id}: {exc}",
                                              resp.status_code) from None
                record.response_body = raw.decode("utf-8", errors="replace")
                content_type = resp.headers.get("Content-Type", "")
                is_json = content_type.split(";")[0].strip().lower() in _JSON_TYPES
                if 200 <= resp.status_code < 300 and not is_json:
                    record.error = "unexpected content type"
                    raise PayerOutcomeUnknown(f"payer {self.config.id}: answer is not FHIR JSON",
                                              resp.status_code)
                looks_json = is_json or raw.lstrip()[:1] == b"{"
                return _Reply(resp.status_code, _json(raw) if looks_json else None, resp.headers)
            finally:
                resp.close()
        finally:
            if self.session is None:
                session.close()

    def _classify(self, kind: str, reply: _Reply, record: ExchangeRecord,
                  not_found_ok: bool) -> _Reply:
        status, pid = reply.status, self.config.id
        if 200 <= status < 300:
            if not isinstance(reply.document, dict):
                record.error = "unparseable body"
                raise PayerOutcomeUnknown(f"payer {pid}: {kind} answer is not a JSON object",
                                          status)
            return reply
        if 300 <= status < 400:
            record.error = f"redirect {status} not followed"
            raise PayerOutcomeUnknown(f"payer {pid}: redirect {status} not followed", status)
        if status == 429 or status == 408 or 500 <= status < 600:
            record.error = f"http {status}"
            raise PayerUnavailable(f"payer {pid}: HTTP {status}", status,
                                   retry_after=_retry_after(reply.headers.get("Retry-After")))
        if status == 404 and not_found_ok and _is_not_found(reply.document):
            return reply
        if 400 <= status < 500:
            record.error = f"http {status}"
            raise PayerRejected(f"payer {pid}: {kind} refused with HTTP {status}", status,
                                errors=parse_operation_outcome(reply.document))
        record.error = f"http {status}"
        raise PayerOutcomeUnknown(f"payer {pid}: unexpected HTTP {status}", status)


def _before_sending(exc: requests.exceptions.ConnectionError) -> bool:
    """True when the connection was never established (refused, DNS), so nothing was sent."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, urllib3.exceptions.NewConnectionError | ConnectionRefusedError
                      | urllib3.exceptions.NameResolutionError):
            return True
        if isinstance(cur, urllib3.exceptions.ProtocolError | ConnectionResetError
                      | http.client.RemoteDisconnected):
            return False
        stack.extend([getattr(cur, "reason", None), cur.__cause__, cur.__context__,
                      *[a for a in getattr(cur, "args", ()) if isinstance(a, BaseException)]])
    return False


def _read_capped(resp: requests.Response, deadline: float) -> bytes:
    """Read the body in chunks under the total deadline and the size cap."""
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise _BodyFailure("answer larger than 2 MiB")
    raw = resp.raw
    buf = bytearray()
    try:
        while True:
            if time.monotonic() > deadline:
                raise _BodyFailure("total deadline exceeded while reading the answer")
            chunk = raw.read1(65536, decode_content=True)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_BODY_BYTES:
                raise _BodyFailure("answer larger than 2 MiB")
    except _BodyFailure:
        raise
    except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
        raise _BodyFailure("read timeout while reading the answer") from None
    except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException,
            http.client.HTTPException, OSError) as exc:
        raise _BodyFailure(f"answer cut off ({type(exc).__name__})") from None
    return bytes(buf)

