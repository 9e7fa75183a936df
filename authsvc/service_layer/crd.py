"""CDS Hooks coverage requirements (Da Vinci CRD): an EHR hook call in, CRD answers out.

Why this shape: clinicians never leave the EHR, so the EHR asks while the order is written
and signed. The answer reuses the preview's rules (one truth for the hook, the preview and
intake), is written in CRD's `coverage-information` vocabulary on each draft order (so the EHR
stores it with the order) and in plain-language cards (so the clinician reads it), and every
answer is kept as a coverage assertion: a later `POST /v1/orders` that names the assertion id
gets the same answer unless the payer's ruleset changed (`reuse_assertions`).

EHRs send far more than the service needs: everything not needed here is ignored, never
refused. Nothing clinical is logged.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import sqlalchemy as sa

from authsvc.adapters.db import repo
from authsvc.adapters.db import tables as t
from authsvc.adapters.fhir_fetch import FetchFailed, FhirFetcher
from authsvc.adapters.payers.registry import PayerConfig
from authsvc.bootstrap import Services
from authsvc.domain import clock, ids
from authsvc.domain.determination import Determination, Reason, for_inactive_coverage
from authsvc.domain.orders import LineFacts, OrderFacts

log = logging.getLogger(__name__)

CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = ("https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
         "https://bluebutton.cms.gov/resources/codesystem/hcpcs")
CODE_SYSTEMS = {CPT: "CPT", **{s: "HCPCS" for s in HCPCS}}
SYSTEM_URL = {"CPT": CPT, "HCPCS": HCPCS[0]}
CODE_FORMAT = {"CPT": re.compile(r"\d{4}[0-9A-Z]"), "HCPCS": re.compile(r"[A-Z]\d{4}")}
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10CM_FORMAT = re.compile(r"[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{1,4})?")
NPI = "http://hl7.org/fhir/sid/us-npi"
COVERAGE_INFO = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
BILLING_OPTIONS = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-billing-options"
CRD_TEMP = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"
CARD_TYPES = "http://terminology.hl7.org/CodeSystem/cdshooks-card-type"
REASON_SYSTEM = "urn:authsvc:codesystem:determination-reason"
CRD_REASONS = frozenset({"gold-card", "no-member-found", "no-active-coverage",
                         "coverage-not-found", "auth-out-network", "technical"})
MAX_ORDERS = 50
MAX_CODES_PER_ORDER = 10
DEFAULT_MAX_CARDS = 10

#: The hooks served, with the prefetch templates of the CRD guide's CRDServices.json.
HOOKS: dict[str, dict[str, Any]] = {
    "order-select": {
        "title": "Coverage requirements for orders being selected",
        "description": "Whether the draft orders are covered, need prior authorization or "
                       "documentation, with the payer policy that says so",
        "orders": "context.draftOrders",
    },
    "order-sign": {
        "title": "Coverage requirements for orders being signed",
        "description": "Whether the orders being signed are covered, need prior "
                       "authorization or documentation, with the payer policy that says so",
        "orders": "context.draftOrders",
    },
    "order-dispatch": {
        "title": "Coverage requirements for orders being dispatched",
        "description": "Coverage requirements of orders sent to a performer",
        "orders": "context.dispatchedOrders",
    },
    "appointment-book": {
        "title": "Coverage requirements for appointments being booked",
        "description": "Coverage requirements of the services behind a proposed appointment",
        "orders": "context.appointments",
    },
}
_COMMON_PREFETCH = {
    "patient": "Patient/{{context.patientId}}",
    "coverage": "Coverage?patient={{context.patientId}}&status=active",
}
_PRACTITIONERS = ("PractitionerRole?_id={{context.draftOrders.entry.resource.requester.resolve()"
                  ".ofType(PractitionerRole).id}}")
PREFETCH: dict[str, dict[str, str]] = {
    "order-select": {**_COMMON_PREFETCH, "practitionerRoles": _PRACTITIONERS},
    "order-sign": {**_COMMON_PREFETCH, "practitionerRoles": _PRACTITIONERS},
    "order-dispatch": {
        **_COMMON_PREFETCH,
        "deviceRequests": "DeviceRequest?_id={{context.dispatchedOrders"
                          ".resolve().ofType(DeviceRequest).id}}",
        "medicationRequests": "MedicationRequest?_id={{context.dispatchedOrders"
                              ".resolve().ofType(MedicationRequest).id}}",
        "nutritionOrders": "NutritionOrder?_id={{context.dispatchedOrders"
                           ".resolve().ofType(NutritionOrder).id}}",
        "serviceRequests": "ServiceRequest?_id={{context.dispatchedOrders"
                           ".resolve().ofType(ServiceRequest).id}}",
    },
    "appointment-book": {
        **_COMMON_PREFETCH,
        "serviceRequests": "ServiceRequest?_id={{context.appointments.entry.resource.basedOn"
                           ".resolve().ofType(ServiceRequest).id}}",
    },
}


class HookProblem(Exception):
    """A hook call the service cannot answer: 400 (not a CDS Hooks request), 404, 412."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Caller:
    """The authenticated CDS client and the request's trace, for storage and audit."""

    client_id: str
    org_id: str
    fhir_servers: tuple[str, ...]
    request_id: str | None = None
    source_ip: str | None = None


# ------------------------------------------------------------------ discovery


def discovery() -> dict[str, Any]:
    """The CDS Hooks discovery document (shape of the CRD guide's CRDServices.json)."""
    services = []
    for hook, info in HOOKS.items():
        services.append({
            "hook": hook, "id": hook, "title": info["title"],
            "description": info["description"], "prefetch": PREFETCH[hook],
            "extension": {
                "davinci-crd.version": ["2.2"],
                "davinci-crd.configuration-options": [
                    {"code": "coverage-info", "type": "boolean", "name": "Coverage Information",
                     "description": "Whether the service is covered, needs prior "
                                    "authorization or documentation", "default": True},
                    {"code": "max-cards", "type": "integer", "name": "Maximum cards",
                     "description": "The most cards returned (coverage warnings first)",
                     "default": DEFAULT_MAX_CARDS},
                ],
            },
        })
    return {"services": services}


# ------------------------------------------------------------------ FHIR helpers


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _tail(reference: str) -> str | None:
    """`Type/id` of a relative or absolute literal reference (history suffix dropped)."""
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return f"{parts[-2]}/{parts[-1]}"
    return None


class Resources:
    """Every resource the request carried (prefetch, context, contained), by reference."""

    def __init__(self) -> None:
        self._by_key: dict[str, dict[str, Any]] = {}

    def add(self, resource: Any, full_url: str | None = None) -> None:
        if not isinstance(resource, dict) or not _str(resource.get("resourceType")):
            return
        rtype = resource["resourceType"]
        if rtype == "Bundle":
            for entry in _list(resource.get("entry")):
                entry = _dict(entry)
                self.add(entry.get("resource"), _str(entry.get("fullUrl")))
            return
        rid = _str(resource.get("id"))
        if rid:
            self._by_key.setdefault(f"{rtype}/{rid}", resource)
        if full_url:
            self._by_key.setdefault(full_url, resource)

    def resolve(self, ref: Any, within: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The resource a Reference (or reference string) points at, if the request had it."""
        reference = ref if isinstance(ref, str) else _str(_dict(ref).get("reference"))
        if not reference:
            return None
        if reference.startswith("#") and within is not None:
            for res in _list(within.get("contained")):
                if _dict(res).get("id") == reference[1:]:
                    return res
            return None
        found = self._by_key.get(reference)
        if found is None and (tail := _tail(reference)):
            found = self._by_key.get(tail)
        return found


def _codings(concept: Any) -> Iterator[dict[str, Any]]:
    for coding in _list(_dict(concept).get("coding")):
        if isinstance(coding, dict):
            yield coding


def _concepts(order: dict[str, Any], resources: Resources) -> list[Any]:
    """The CodeableConcepts that say what an order is, by resource type."""
    rtype = order.get("resourceType")
    if rtype == "ServiceRequest":
        return [order.get("code")]
    if rtype == "DeviceRequest":
        device = resources.resolve(order.get("codeReference"))
        return [order.get("codeCodeableConcept"), _dict(device).get("type")]
    if rtype == "MedicationRequest":
        med = resources.resolve(order.get("medicationReference"), order)
        return [order.get("medicationCodeableConcept"), _dict(med).get("code")]
    if rtype == "NutritionOrder":
        oral = _dict(order.get("oralDiet"))
        enteral = _dict(order.get("enteralFormula"))
        return [*_list(oral.get("type")),
                *[_dict(s).get("type") for s in _list(order.get("supplement"))],
                enteral.get("baseFormulaType"), enteral.get("additiveType")]
    if rtype == "VisionPrescription":
        return [_dict(s).get("product") for s in _list(order.get("lensSpecification"))]
    if rtype == "Appointment":
        return [*_list(order.get("serviceType")), order.get("appointmentType")]
    if rtype == "CommunicationRequest":
        return [*_list(order.get("category")), *_list(order.get("reasonCode"))]
    return [order.get("code")]


def billing_codes(order: dict[str, Any], resources: Resources) -> list[tuple[str, str]]:
    """(`CPT`|`HCPCS`, code) of an order: its own CPT/HCPCS codings, else the CRD
    billing-options the EHR listed; other code systems are ignored."""
    concepts = [c for c in _concepts(order, resources) if isinstance(c, dict)]
    found = _billing(c for concept in concepts for c in _codings(concept))
    if not found:
        options = [ext.get("valueCodeableConcept") for concept in concepts
                   for ext in _list(concept.get("extension"))
                   if _dict(ext).get("url") == BILLING_OPTIONS]
        found = _billing(c for concept in options for c in _codings(concept))
    return found[:MAX_CODES_PER_ORDER]


def _billing(codings: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for coding in codings:
        system = CODE_SYSTEMS.get(_str(coding.get("system")) or "")
        code = (_str(coding.get("code")) or "").strip()
        if system and CODE_FORMAT[system].fullmatch(code) and (system, code) not in out:
            out.append((system, code))
    return out


def _label(order: dict[str, Any], resources: Resources, codes: list[tuple[str, str]]) -> str:
    """Plain words for the order in a card: the EHR's own text, else the billing code."""
    for concept in _concepts(order, resources):
        concept = _dict(concept)
        if _str(concept.get("text")):
            return concept["text"][:80]
        for coding in _codings(concept):
            if _str(coding.get("display")):
                return coding["display"][:80]
    if codes:
        return f"{codes[0][0]} {codes[0][1]}"
    return f"this {order.get('resourceType', 'order')}"


def _date(value: Any) -> dt.date | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        return None


def _first_date(*values: Any) -> dt.date | None:
    for value in values:
        got = _date(value)
        if got is not None:
            return got
    return None


def service_date(order: dict[str, Any]) -> dt.date | None:
    """When the service is to happen, as far as the order says (else None: today)."""
    period = _dict(order.get("occurrencePeriod"))
    timing = _dict(_dict(_dict(order.get("occurrenceTiming")).get("repeat")).get("boundsPeriod"))
    dispense = _dict(_dict(order.get("dispenseRequest")).get("validityPeriod"))
    dosage = [_dict(_dict(_dict(_dict(d).get("timing")).get("repeat")).get("boundsPeriod"))
              .get("start") for d in _list(order.get("dosageInstruction"))]
    schedule = [_dict(_dict(_dict(s).get("repeat")).get("boundsPeriod")).get("start")
                for s in _list(_dict(order.get("oralDiet")).get("schedule"))]
    requested = [_dict(p).get("start") for p in _list(order.get("requestedPeriod"))]
    return _first_date(order.get("occurrenceDateTime"), period.get("start"),
                       timing.get("start"), dispense.get("start"), *dosage, *schedule,
                       order.get("start"), *requested)


def _quantity(order: dict[str, Any]) -> int:
    value = _dict(order.get("quantityQuantity")).get("value")
    if isinstance(value, int | float) and not isinstance(value, bool) and 1 <= value <= 9999:
        return max(1, int(value))
    return 1


def _npi_of(resource: dict[str, Any] | None, resources: Resources, depth: int = 0) -> str | None:
    if not resource or depth > 2:
        return None
    for ident in _list(resource.get("identifier")):
        ident = _dict(ident)
        if ident.get("system") == NPI and _str(ident.get("value")):
            return ident["value"]
    if resource.get("resourceType") == "PractitionerRole":
        return _npi_of(resources.resolve(resource.get("practitioner")), resources, depth + 1)
    return None


def _npi(ref: Any, resources: Resources, within: dict[str, Any]) -> str | None:
    """The NPI behind a reference: a logical NPI identifier, or the resolved resource's."""
    ref = _dict(ref)
    ident = _dict(ref.get("identifier"))
    if ident.get("system") == NPI and _str(ident.get("value")):
        return ident["value"]
    return _npi_of(resources.resolve(ref, within), resources)


def _requester_ref(order: dict[str, Any]) -> Any:
    for key in ("requester", "orderer", "prescriber"):
        if isinstance(order.get(key), dict):
            return order[key]
    for part in _list(order.get("participant")):
        actor = _dict(_dict(part).get("actor"))
        if (_tail(_str(actor.get("reference")) or "") or "").startswith("Practitioner"):
            return actor
    return None


def _diagnoses(order: dict[str, Any]) -> list[str]:
    out = []
    for concept in _list(order.get("reasonCode")):
        for coding in _codings(concept):
            code = (_str(coding.get("code")) or "").strip()
            if coding.get("system") == ICD10CM and ICD10CM_FORMAT.fullmatch(code):
                out.append(code)
    return out


def _place_of_service(order: dict[str, Any]) -> str | None:
    for concept in _list(order.get("locationCode")):
        for coding in _codings(concept):
            if "place-of-service" in (_str(coding.get("system")) or "").lower():
                code = _str(coding.get("code"))
                if code and re.fullmatch(r"\d{2}", code):
                    return code
    return None


# ------------------------------------------------------------------ payer matching


def _norm(name: str) -> str:
    return " ".join(name.split()).casefold()


def match_payer(payors: list[dict[str, Any]],
                payers: dict[str, PayerConfig]) -> PayerConfig | None:
    """Our payer for a Coverage's payor references and the Organizations they resolve to:
    by identifier (`value` or `system|value`, as listed in the payers file) or by name."""
    idents: set[str] = set()
    names: set[str] = set()
    for payor in payors:
        for ident in [_dict(payor.get("identifier")), *map(_dict, _list(payor.get("idents")))]:
            value = _str(ident.get("value"))
            if value:
                idents.add(value)
                if _str(ident.get("system")):
                    idents.add(f"{ident['system']}|{value}")
        for name in (payor.get("display"), payor.get("name")):
            if _str(name):
                names.add(_norm(name))
    for payer in payers.values():
        if any(p in idents for p in payer.match.payor_identifiers):
            return payer
        if any(_norm(n) in names for n in payer.match.payor_names):
            return payer
    return None


def _payors(coverage: dict[str, Any], resources: Resources,
            fetcher: FhirFetcher | None) -> list[dict[str, Any]]:
    """Each payor reference with what its Organization adds (identifiers, name)."""
    out = []
    for ref in _list(coverage.get("payor")):
        ref = _dict(ref)
        org = resources.resolve(ref, coverage)
        if org is None and fetcher is not None and fetcher.usable:
            tail = _tail(_str(ref.get("reference")) or "")
            if tail and tail.startswith("Organization/"):
                try:
                    org = fetcher.read("Organization", tail.split("/", 1)[1])
                except FetchFailed:
                    org = None
        org = _dict(org)
        out.append({"identifier": ref.get("identifier"), "display": ref.get("display"),
                    "idents": _list(org.get("identifier")), "name": org.get("name")})
    return out


# ------------------------------------------------------------------ the hook


@dataclasses.dataclass
class _Order:
    resource: dict[str, Any]
    codes: list[tuple[str, str]]
    label: str
    start: dt.date
    quantity: int
    requester_npi: str | None
    performer_npi: str | None
    diagnoses: list[str]
    place_of_service: str | None
    # filled in by the determination:
    dets: list[tuple[tuple[str, str] | None, Determination, str]] = dataclasses.field(
        default_factory=list)


def _check_request(service_id: str, body: Any) -> dict[str, Any]:
    if service_id not in HOOKS:
        raise HookProblem(404, "No such CDS service.")
    if not isinstance(body, dict):
        raise HookProblem(400, "A CDS Hooks request is a JSON object.")
    if not _str(body.get("hookInstance")) or not _str(body.get("hook")):
        raise HookProblem(400, "A CDS Hooks request needs `hook` and `hookInstance`.")
    if body["hook"] != service_id:
        raise HookProblem(400, f"This service answers the `{service_id}` hook.")
    if not isinstance(body.get("context"), dict):
        raise HookProblem(400, "A CDS Hooks request needs a `context` object.")
    for key in ("prefetch", "fhirAuthorization", "extension"):
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise HookProblem(400, f"`{key}` must be an object.")
    return body


def _configuration(body: dict[str, Any]) -> tuple[bool, int]:
    config = _dict(_dict(body.get("extension")).get("davinci-crd.configuration"))
    coverage_info = config.get("coverage-info", True) is not False
    max_cards = config.get("max-cards", DEFAULT_MAX_CARDS)
    if not isinstance(max_cards, int) or isinstance(max_cards, bool) or max_cards < 0:
        max_cards = DEFAULT_MAX_CARDS
    return coverage_info, max_cards


def _order_resources(hook: str, context: dict[str, Any], resources: Resources,
                     fetcher: FhirFetcher) -> list[dict[str, Any]]:
    """The orders the hook is about, in the order the EHR listed them."""
    if hook in ("order-select", "order-sign"):
        entries = [_dict(e).get("resource")
                   for e in _list(_dict(context.get("draftOrders")).get("entry"))]
        orders = [r for r in entries if isinstance(r, dict) and _str(r.get("resourceType"))]
        selections = {s for s in _list(context.get("selections")) if isinstance(s, str)}
        if hook == "order-select" and selections:
            chosen = [r for r in orders if f"{r['resourceType']}/{r.get('id')}" in selections]
            orders = chosen or orders
        return orders
    if hook == "appointment-book":
        entries = [_dict(e).get("resource")
                   for e in _list(_dict(context.get("appointments")).get("entry"))]
        return [r for r in entries if isinstance(r, dict) and r.get("resourceType")]
    orders = []
    for ref in _list(context.get("dispatchedOrders")):
        if not isinstance(ref, str):
            continue
        found = resources.resolve(ref)
        if found is None:
            tail = _tail(ref)
            if tail is None:
                continue
            if not fetcher.usable:
                raise HookProblem(412, "A dispatched order was neither prefetched nor "
                                       "readable from an allowed FHIR server.")
            try:
                found = fetcher.read(*tail.split("/", 1))
            except FetchFailed as exc:
                raise HookProblem(412, f"Could not read a dispatched order: {exc}") from None
        if found is not None:
            orders.append(found)
    return orders


def _prefetched(prefetch: dict[str, Any], key: str, rtype: str) -> tuple[bool, list[dict]]:
    """(the key was prefetched, its resources of `rtype`); anything else in its place (null,
    an OperationOutcome for a failed prefetch, junk) counts as not prefetched."""
    value = _dict(prefetch.get(key))
    if value.get("resourceType") == rtype:
        return True, [value]
    if value.get("resourceType") == "Bundle":
        return True, [_dict(e).get("resource") for e in _list(value.get("entry"))
                      if _dict(_dict(e).get("resource")).get("resourceType") == rtype]
    return False, []


def _patient_and_coverages(body: dict[str, Any], fetcher: FhirFetcher
                           ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    prefetch = _dict(body.get("prefetch"))
    context = body["context"]
    patient_id = _str(context.get("patientId"))
    has_patient, patients = _prefetched(prefetch, "patient", "Patient")
    has_coverage, coverages = _prefetched(prefetch, "coverage", "Coverage")
    if not has_coverage:
        if not fetcher.usable or not patient_id:
            raise HookProblem(412, "Coverage was not prefetched and no allowed FHIR server "
                                   "with an access token was given.")
        try:
            coverages = fetcher.search("Coverage", {"patient": patient_id, "status": "active"})
        except FetchFailed as exc:
            raise HookProblem(412, f"Could not read the Coverage: {exc}") from None
    if not has_patient and fetcher.usable and patient_id:
        try:
            got = fetcher.read("Patient", patient_id)
        except FetchFailed:
            got = None  # demographics only refine the rules; the hook still answers
        patients = [got] if got else []
    return (patients[0] if patients else None), coverages


def _demographics(patient: dict[str, Any] | None) -> tuple[dt.date | None, str | None]:
    if not patient:
        return None, None
    birth = _date(patient.get("birthDate")) if len(str(patient.get("birthDate"))) == 10 else None
    sex = patient.get("gender")
    return birth, sex if sex in ("female", "male", "other", "unknown") else None


def _coverage_active(coverage: dict[str, Any], on: dt.date) -> bool:
    if coverage.get("status") in ("cancelled", "entered-in-error"):
        return False
    period = _dict(coverage.get("period"))
    start, end = _date(period.get("start")), _date(period.get("end"))
    return not ((start and on < start) or (end and on > end))


def _unknown_payer() -> Determination:
    return Determination(
        covered="conditional", pa_needed="conditional", info_needed=("OTH",),
        reasons=(Reason("unknown-payer", "The patient's payer is not one this service knows; "
                                         "check coverage requirements with the payer"),))


def _no_billing_code() -> Determination:
    return Determination(
        covered="conditional", pa_needed="conditional", info_needed=("detail-code",),
        reasons=(Reason("no-billing-code", "The order carries no CPT or HCPCS code, so its "
                                           "coverage requirements cannot be determined"),))


def handle_hook(services: Services, caller: Caller, service_id: str, body: Any, *,
                spend: Callable[[sa.Connection], None] | None = None) -> dict[str, Any]:
    """Answer one CDS Hooks call: cards and systemActions, assertions stored, call audited.

    Nothing waits inside a transaction: the answer is worked out first (reading the EHR's
    FHIR server when it did not prefetch), then the assertions and the audit row are written
    in one transaction. `spend` (the JWT's jti) runs first in that transaction, or, when the
    EHR's server must be read, in a transaction of its own before the first read, so a
    replayed call never makes the service call anyone.
    """
    now = clock.now()
    spent = False

    def spend_now() -> None:
        nonlocal spent
        if spend is not None and not spent:
            with services.engine.begin() as tx:
                spend(tx)
            spent = True

    try:
        answer, rows, note = _evaluate(services, caller, service_id, body, now, spend_now)
    except HookProblem:
        spend_now()  # a refused call's jti is spent too: it is never accepted later
        raise
    with services.engine.begin() as conn:
        if spend is not None and not spent:
            spend(conn)
        if rows:
            conn.execute(t.coverage_assertions.insert(), rows)
        _audit_in(conn, caller, service_id, now, note, assertions=len(rows))
    return answer


def _evaluate(services: Services, caller: Caller, service_id: str, body: Any,
              now: dt.datetime, before_fetch: Callable[[], None],
              ) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """(the CDS Hooks answer, the coverage-assertion rows to store, a note for the audit)."""
    body = _check_request(service_id, body)
    hook = body["hook"]
    coverage_info, max_cards = _configuration(body)
    if not coverage_info:
        return {"cards": []}, [], "coverage-info off"
    resources = Resources()
    for value in _dict(body.get("prefetch")).values():
        resources.add(value)
    context = body["context"]
    for key in ("draftOrders", "appointments"):
        resources.add(context.get(key))
    fetcher = FhirFetcher(_str(body.get("fhirServer")), body.get("fhirAuthorization"),
                          caller.fhir_servers, before_first_use=before_fetch)
    order_resources = _order_resources(hook, context, resources, fetcher)[:MAX_ORDERS]
    if not order_resources:
        return {"cards": []}, [], "no orders"
    patient, coverages = _patient_and_coverages(body, fetcher)
    if not coverages:
        return {"cards": [_no_coverage_card()]}, [], "coverage not found"

    payer, coverage = None, coverages[0]
    for candidate in coverages:
        payer = match_payer(_payors(candidate, resources, fetcher), services.payers)
        if payer is not None:
            coverage = candidate
            break
    user_npi = _npi(context.get("userId"), resources, {})
    orders = [_order_facts(o, resources, user_npi, now.date()) for o in order_resources]
    birth, sex = _demographics(patient)
    version = _determine(services, payer, orders, birth, sex)
    for order in orders:
        order.dets = [(code, det if _coverage_active(coverage, order.start)
                       else for_inactive_coverage(det), aid) for code, det, aid in order.dets]

    coverage_ref = _coverage_reference(coverage)
    rows = [{"id": aid, "org_id": caller.org_id, "payer_id": payer.id if payer else "",
             "code_system": code[0] if code else "", "code": code[1] if code else "",
             "ruleset_version": version or "", "determination": det.to_record(),
             "created_at": now}
            for order in orders for code, det, aid in order.dets]
    source = {"label": payer.name if payer else "authsvc coverage requirements",
              "topic": {"system": CARD_TYPES, "code": "coverage-info",
                        "display": "Coverage Information"}}
    cards = _cards(orders, source)[:max_cards]
    actions = [{"type": "update",
                "description": "Coverage information for this order",
                "resource": _annotated(o, coverage_ref, now.date())}
               for o in orders if _str(o.resource.get("id"))]  # an update needs an id
    answer = {"cards": cards, "systemActions": actions}
    return answer, rows, f"payer={payer.id if payer else 'unknown'}"


def _order_facts(resource: dict[str, Any], resources: Resources, user_npi: str | None,
                 today: dt.date) -> _Order:
    codes = billing_codes(resource, resources)
    performer = _list(resource.get("performer")) or [resource.get("performer")]
    return _Order(
        resource=resource, codes=codes, label=_label(resource, resources, codes),
        start=service_date(resource) or today, quantity=_quantity(resource),
        requester_npi=_npi(_requester_ref(resource), resources, resource) or user_npi,
        performer_npi=_npi(performer[0], resources, resource) if performer else None,
        diagnoses=_diagnoses(resource), place_of_service=_place_of_service(resource))


def _determine(services: Services, payer: PayerConfig | None, orders: list[_Order],
               birth: dt.date | None, sex: str | None) -> str | None:
    """Fill each order's determinations; the rules see all orders' lines together (so
    cross-line policies work across the draft orders), grouped by requester."""
    engine = services.rules.current()
    version = None
    known = payer is not None and payer.id in engine.payer_ids()
    if known:
        assert payer is not None
        version = engine.version(payer.id)
    groups: dict[tuple, list[_Order]] = {}
    for order in orders:
        order.dets = []
        if not order.codes:
            order.dets.append((None, _no_billing_code(), ids.new_id("ca")))
            continue
        if not known:
            order.dets.extend((code, _unknown_payer(), ids.new_id("ca")) for code in order.codes)
            continue
        key = (order.requester_npi, order.performer_npi, order.place_of_service)
        groups.setdefault(key, []).append(order)
    assert payer is not None or not groups
    for (requester, performer, pos), group in groups.items():
        lines, owners = [], []
        for order in group:
            for code in order.codes:
                lines.append(LineFacts(sequence=len(lines) + 1, code_system=code[0],
                                       code=code[1], quantity=order.quantity,
                                       service_start=order.start))
                owners.append((order, code))
        facts = OrderFacts(
            payer_id=payer.id, lines=tuple(lines),  # type: ignore[union-attr]
            diagnoses=tuple(dict.fromkeys(d for o in group for d in o.diagnoses)),
            place_of_service=pos, requester_npi=requester, performer_npi=performer,
            patient_birth_date=birth, patient_sex=sex)
        for (order, code), det in zip(owners, engine.determine(facts), strict=True):
            order.dets.append((code, det, ids.new_id("ca")))
    return version


def _coverage_reference(coverage: dict[str, Any]) -> dict[str, Any]:
    rid = _str(coverage.get("id"))
    ref: dict[str, Any] = {"reference": f"Coverage/{rid}"} if rid else {}
    if not rid:
        for ident in _list(coverage.get("identifier")):
            if _str(_dict(ident).get("value")):
                ref["identifier"] = {k: v for k, v in ident.items() if k in ("system", "value")}
                break
    return ref or {"display": "Coverage"}


# ------------------------------------------------------------------ the answer


def coverage_information(det: Determination, *, coverage_ref: dict[str, Any],
                         code: tuple[str, str] | None, assertion_id: str,
                         on: dt.date) -> dict[str, Any]:
    """One CRD `coverage-information` extension for a determination."""
    ext: list[dict[str, Any]] = [
        {"url": "coverage", "valueReference": coverage_ref},
        {"url": "covered", "valueCode": det.covered},
    ]
    if det.pa_needed is not None:
        ext.append({"url": "pa-needed", "valueCode": det.pa_needed})
    ext += [{"url": "doc-needed", "valueCode": d} for d in det.doc_needed]
    if det.doc_needed:
        ext.append({"url": "doc-purpose", "valueCode": "withpa" if det.pa_needed in (
            "auth-needed", "conditional") else "retain-doc"})
    ext += [{"url": "info-needed", "valueCode": i} for i in det.info_needed]
    if code is not None:
        ext.append({"url": "billingCode",
                    "valueCoding": {"system": SYSTEM_URL[code[0]], "code": code[1]}})
    for reason in det.reasons:
        concept: dict[str, Any] = {"text": reason.text}
        system = CRD_TEMP if reason.code in CRD_REASONS else REASON_SYSTEM
        concept["coding"] = [{"system": system, "code": reason.code}]
        ext.append({"url": "reason", "valueCodeableConcept": concept})
    for link in det.policy_links:
        ext.append({"url": "detail", "extension": [
            {"url": "code", "valueCodeableConcept": {"coding": [
                {"system": CRD_TEMP, "code": "policy-link"}]}},
            {"url": "value", "valueUrl": link},
        ]})
    ext += [{"url": "date", "valueDate": on.isoformat()},
            {"url": "coverage-assertion-id", "valueString": assertion_id}]
    if det.satisfied_pa_id is not None:
        ext.append({"url": "satisfied-pa-id", "valueString": det.satisfied_pa_id})
    if det.expiry_date is not None:
        ext.append({"url": "expiry-date", "valueDate": det.expiry_date})
    return {"url": COVERAGE_INFO, "extension": ext}


def _annotated(order: _Order, coverage_ref: dict[str, Any], on: dt.date) -> dict[str, Any]:
    """The draft order as the EHR sent it, its coverage-information replaced by ours."""
    resource = dict(order.resource)
    kept = [e for e in _list(resource.get("extension")) if _dict(e).get("url") != COVERAGE_INFO]
    resource["extension"] = kept + [
        coverage_information(det, coverage_ref=coverage_ref, code=code, assertion_id=aid, on=on)
        for code, det, aid in order.dets]
    return resource


_PRIORITY = {"not-covered": 0, "auth-needed": 1, "conditional": 2, "indeterminate": 2,
             "performpa": 2, "satisfied": 3, "no-auth": 4}
_DOCS = {"clinical": "clinical notes supporting medical necessity",
         "admin": "administrative documents", "patient": "patient-provided information",
         "conditional": "documentation the payer may ask for",
         "indeterminate": "documentation the payer may ask for"}


def _headline(det: Determination, label: str) -> tuple[str, str]:
    """(summary, indicator) in plain words for one determination."""
    codes = {r.code for r in det.reasons}
    if det.covered == "not-covered":
        return f"Not covered: {label}", "warning"
    if det.pa_needed == "auth-needed":
        return f"Prior authorization needed: {label}", "warning"
    if det.pa_needed == "satisfied":
        return f"No prior authorization needed (gold card): {label}", "info"
    if det.pa_needed == "no-auth":
        return f"No prior authorization needed: {label}", "info"
    if "unknown-payer" in codes:
        return f"Payer not recognised; coverage requirements unknown: {label}", "warning"
    if "no-billing-code" in codes:
        return f"No billing code; coverage requirements unknown: {label}", "info"
    return f"Prior authorization may be needed: {label}", "warning"


def _cards(orders: list[_Order], source: dict[str, Any]) -> list[dict[str, Any]]:
    ranked = []
    for n, order in enumerate(orders):
        for k, (code, det, aid) in enumerate(order.dets):
            label = order.label if len(order.dets) == 1 or code is None else (
                f"{order.label} ({code[0]} {code[1]})")
            summary, indicator = _headline(det, label)
            lines = [f"Payer policy: {r.text}" if r.code == "policy" else r.text
                     for r in det.reasons]
            if det.doc_needed:
                lead = ("Gather for the authorization request: " if det.pa_needed in (
                    "auth-needed", "conditional") else "Keep on file: ")
                lines.append(lead + "; ".join(_DOCS.get(d, d) for d in det.doc_needed) + ".")
            if det.satisfied_pa_id:
                lines.append(f"Gold card {det.satisfied_pa_id}"
                             + (f", valid until {det.expiry_date}." if det.expiry_date else "."))
            lines.append(f"Coverage assertion {aid}: quote it when submitting the order.")
            card: dict[str, Any] = {
                "uuid": str(uuid.uuid4()), "summary": summary[:140], "indicator": indicator,
                "detail": "\n\n".join(lines), "source": source,
            }
            rtype, rid = order.resource.get("resourceType"), _str(order.resource.get("id"))
            if rid:
                card["extension"] = {"davinci-crd.associated-resource": [
                    {"reference": f"{rtype}/{rid}"}]}
            links = [{"label": "Payer policy", "url": url, "type": "absolute"}
                     for url in det.policy_links]
            if links:
                card["links"] = links
            ranked.append(((_PRIORITY.get(det.covered if det.covered == "not-covered"
                                          else det.pa_needed or "", 2), n, k), card))
    return [card for _, card in sorted(ranked, key=lambda x: x[0])]


def _no_coverage_card() -> dict[str, Any]:
    return {"uuid": str(uuid.uuid4()), "summary": "No active coverage found for this patient",
            "indicator": "warning",
            "detail": "Coverage requirements cannot be determined without the patient's "
                      "coverage; update the coverage record and try again.",
            "source": {"label": "authsvc coverage requirements",
                       "topic": {"system": CARD_TYPES, "code": "insurance",
                                 "display": "Insurance"}}}


# ------------------------------------------------------------------ audit


def _audit_in(conn: sa.Connection, caller: Caller, hook: str, now: dt.datetime, reason: str,
              *, assertions: int) -> None:
    repo.add_audit(conn, at=now, org_id=caller.org_id, token_id=caller.client_id,
                   role="cds-client", action=hook[:20], entity_type="cds_hook",
                   entity_id=None, patient_id=None, outcome="success",
                   request_id=caller.request_id, source_ip=caller.source_ip,
                   reason=f"{reason}; assertions={assertions}"[:100])


# ------------------------------------------------------------------ continuity with orders


def reuse_assertions(conn: sa.Connection, org_id: str, body: dict[str, Any], version: str,
                     determinations: list[Determination], *, order_id: str | None = None,
                     at: dt.datetime | None = None, actor: str = "system",
                     ) -> list[Determination]:
    """Determinations for an order's lines, reusing the coverage assertion a line names.

    A line whose `coverage_assertion_id` is this organization's assertion for the same payer
    and code keeps the assertion's determination while the payer's ruleset is the same; when
    the ruleset changed, the fresh determination stands. Either way the timeline says so
    (when `order_id` is given; events are stamped a microsecond after `at` so they follow
    `order_received`).
    """
    wanted = {line.get("coverage_assertion_id") for line in body.get("lines") or ()}
    wanted.discard(None)
    if not wanted:
        return determinations
    ca = t.coverage_assertions
    rows = {r["id"]: dict(r) for r in conn.execute(
        sa.select(ca).where(ca.c.id.in_(sorted(wanted)), ca.c.org_id == org_id)).mappings()}
    payer_id = body["coverage"]["payer_id"]
    out = []
    events = []
    for line, det in zip(body["lines"], determinations, strict=True):
        aid = line.get("coverage_assertion_id")
        if not aid:
            out.append(det)
            continue
        row = rows.get(aid)
        detail = {"sequence": line["sequence"], "coverage_assertion_id": aid}
        if row is None or (row["payer_id"], row["code_system"], row["code"]) != (
                payer_id, line["code_system"], line["code"]):
            events.append(("coverage_assertion_not_applicable", {
                **detail, "reason": "unknown assertion" if row is None
                else "the assertion is for another payer or code"}))
            out.append(det)
        elif row["ruleset_version"] != version:
            events.append(("coverage_assertion_reevaluated", {
                **detail, "assertion_ruleset_version": row["ruleset_version"],
                "ruleset_version": version}))
            out.append(det)
        else:
            events.append(("coverage_assertion_reused",
                           {**detail, "ruleset_version": version}))
            out.append(Determination.from_record(row["determination"]))
    if order_id is not None:
        from authsvc.service_layer import timeline

        stamp = (at or clock.now()) + dt.timedelta(microseconds=1)
        for event, detail in events:
            timeline.record(conn, org_id=org_id, order_id=order_id, at=stamp, event=event,
                            actor=actor, detail=detail)
    return out
