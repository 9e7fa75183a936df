"""The Da Vinci PAS 2.2.1 examples as independent test inputs for the PAS / FHIR adapter.

Every response example of the guide must parse into the exact PayerAnswer fields, and the
Bundles we build must validate with fhir.resources and carry what the guide's request
examples carry.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.coverageeligibilityrequest import CoverageEligibilityRequest

from authsvc.adapters.payers import pas_fhir
from authsvc.adapters.payers.pas_fhir import (
    NoClaimResponse,
    PasFhirAdapter,
    PasParseError,
    build_claim_bundle,
    build_eligibility_request,
    build_subscription,
    parse_eligibility_response,
    parse_operation_outcome,
    parse_response,
)
from authsvc.adapters.payers.registry import (
    DEFAULT_PAYERS_FILE,
    DEMO_DEV_SECRET,
    PayerConfig,
    PayerConfigError,
    build_adapter,
    expand_env,
    load_payers,
    webhook_key_from_secret,
)
from authsvc.domain.payer import (
    Attachment,
    ClaimLine,
    ClaimRequest,
    CoverageInfo,
    DenialReason,
    EligibilityRequest,
    InfoRequest,
    LineDecision,
    Party,
    PatientInfo,
    PayerError,
)

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "pas-2.2.1"
TZ5 = dt.timezone(dt.timedelta(hours=5))

RESPONSE_EXAMPLES = [
    "Bundle-ErrorResponseBundleExample.json",
    "Bundle-PASClaimInquiryResponseBundleExample.json",
    "Bundle-PASSubscriptionNotification.json",
    "Bundle-ReferralAuthorizationResponseBundleExample.json",
    "Bundle-ReferralPendingAuthorizationResponseBundleExample.json",
    "Bundle-RejectionResponseBundleExample.json",
    "ClaimResponse-ErrorResponseExample.json",
    "ClaimResponse-PASClaimInquiryResponseExample.json",
    "ClaimResponse-PractitionerRequestorAdditionalContentResponseExample.json",
    "ClaimResponse-PractitionerRequestorPendingResponseExample.json",
    "ClaimResponse-PractitionerRequestorResponseExample.json",
    "ClaimResponse-RejectionResponseExample.json",
    "Parameters-PASClaimInquiryOperationResponseExample.json",
]

CONFIG = PayerConfig(id="demo", name="Demo Health Plan", protocol="pas-fhir",
                     base_url="http://127.0.0.1:9/fhir")

APPROVED_LINE = LineDecision(
    sequence=1, review_action="A1", auth_number="AUTH0001", authorized_quantity=1,
    authorized_code="3", valid_from=dt.date(2005, 5, 2), valid_to=dt.date(2005, 6, 2),
)


def load(name: str) -> dict:
    with (FIXTURES / name).open(encoding="utf-8") as fh:
        return json.load(fh)


def make_claim(**changes) -> ClaimRequest:
    claim = ClaimRequest(
        claim_identifier="case_01TEST",
        certification_type="I",
        urgency="standard",
        patient=PatientInfo("MRN-0001", "Ana", "Diaz", dt.date(1984, 3, 2), "female"),
        coverage=CoverageInfo("demo", "SIM-APPROVE-0001", "G-100"),
        requester=Party("1234567893", "Dr. Rivera"),
        performer=Party("1003000126", "Valley Imaging"),
        diagnoses=("M54.50", "M51.16"),
        place_of_service="22",
        lines=(
            ClaimLine(1, "CPT", "72148", 1, dt.date(2026, 12, 1), dt.date(2026, 12, 31)),
            ClaimLine(2, "HCPCS", "E0424", 3, dt.date(2026, 12, 1)),
        ),
        created_at=dt.datetime(2026, 11, 20, 9, 30, tzinfo=dt.UTC),
    )
    return dataclasses.replace(claim, **changes)


def entries(bundle: dict) -> dict[str, dict]:
    return {e["fullUrl"]: e["resource"] for e in bundle["entry"]}


def resolve(bundle: dict, ref: dict) -> dict:
    return entries(bundle)[ref["reference"]]


def ext_urls(obj: dict) -> set[str]:
    return {e["url"] for e in obj.get("extension", [])}


# ---------------------------------------------------------------- the guide's examples


def test_fixture_directory_is_there():
    assert FIXTURES.is_dir(), FIXTURES
    assert set(RESPONSE_EXAMPLES) <= {p.name for p in FIXTURES.glob("*.json")}


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_every_example_loads_with_fhir_resources(name):
    doc = load(name)
    get_fhir_model_class(doc["resourceType"]).model_validate(doc)


@pytest.mark.parametrize("name", RESPONSE_EXAMPLES)
def test_every_response_example_parses(name):
    answer = parse_response(load(name))
    assert answer.outcome in ("complete", "error")
    assert answer.claim_identifier == "111099"
    assert answer.last_updated is not None and answer.last_updated.tzinfo is not None


@pytest.mark.parametrize("name", [
    "ClaimResponse-PractitionerRequestorResponseExample.json",
    "Bundle-ReferralAuthorizationResponseBundleExample.json",
])
def test_approval_a1(name):
    answer = parse_response(load(name))
    assert answer.outcome == "complete"
    assert not answer.rejected
    assert answer.lines == (APPROVED_LINE,)
    assert answer.errors == ()
    assert answer.info_request is None
    assert answer.payer_ref == "PractitionerRequestorResponseExample"
    assert answer.event_number is None
    assert answer.last_updated == dt.datetime(2005, 5, 2, 11, 2, tzinfo=TZ5)


@pytest.mark.parametrize("name", [
    "ClaimResponse-RejectionResponseExample.json",
    "Bundle-RejectionResponseBundleExample.json",
])
def test_rejection_example_is_a_denial_a3(name):
    answer = parse_response(load(name))
    assert answer.outcome == "complete"
    assert not answer.rejected  # a denial is a decision, not a rejected request
    assert answer.lines == (LineDecision(sequence=1, review_action="A3"),)
    assert answer.payer_ref == "RejectionResponseExample"


@pytest.mark.parametrize("name", [
    "ClaimResponse-PractitionerRequestorPendingResponseExample.json",
    "Bundle-ReferralPendingAuthorizationResponseBundleExample.json",
])
def test_pended_a4_with_administration_reference(name):
    answer = parse_response(load(name))
    assert answer.outcome == "complete"  # PAS: pended is complete + A4, never "queued"
    assert answer.lines == (LineDecision(sequence=1, review_action="A4",
                                         administration_ref="PEND0001"),)


def test_additional_content_add_item():
    answer = parse_response(load(
        "ClaimResponse-PractitionerRequestorAdditionalContentResponseExample.json"))
    assert answer.lines == (
        APPROVED_LINE,
        LineDecision(sequence=2, review_action="A1", auth_number="AUTH0001",
                     authorized_quantity=1, authorized_code="3"),
    )


@pytest.mark.parametrize("name", [
    "ClaimResponse-ErrorResponseExample.json",
    "Bundle-ErrorResponseBundleExample.json",
])
def test_error_with_aaa_codes(name):
    answer = parse_response(load(name))
    assert answer.outcome == "error"
    assert answer.rejected
    assert answer.lines == ()
    assert answer.errors == (
        PayerError(code="04"),
        PayerError(code="T4", followup="C", element="2010A-NM103",
                   path="Bundle.entry[1].Organization.name"),
    )
    assert answer.payer_ref == "ErrorResponseExample"


@pytest.mark.parametrize("name", [
    "ClaimResponse-PASClaimInquiryResponseExample.json",
    "Bundle-PASClaimInquiryResponseBundleExample.json",
    "Parameters-PASClaimInquiryOperationResponseExample.json",
])
def test_inquiry_response(name):
    answer = parse_response(load(name))
    assert answer.outcome == "complete"
    assert answer.lines == (LineDecision(sequence=1, review_action="A1",
                                         auth_number="AUTH0001"),)
    assert answer.payer_ref == "PASClaimInquiryResponseExample"
    assert answer.last_updated == dt.datetime(2019, 7, 20, 11, 1, tzinfo=TZ5)


def test_subscription_notification_event_number():
    raw = (FIXTURES / "Bundle-PASSubscriptionNotification.json").read_bytes()
    adapter = PasFhirAdapter(CONFIG, recorder=lambda record: None)
    answer = adapter.parse_notification(raw)
    assert answer.event_number == 2
    assert answer.lines == (APPROVED_LINE,)
    assert answer.claim_identifier == "111099"
    assert answer.last_updated == dt.datetime(2005, 5, 2, 11, 2, tzinfo=TZ5)


def test_notification_status_alone_has_no_claim_response():
    with pytest.raises(NoClaimResponse):
        parse_response(load("Parameters-SubscriptionNotificationParameters.json"))


def test_task_asking_for_loinc_codes_is_an_info_request():
    bundle = load("Bundle-ReferralPendingAuthorizationResponseBundleExample.json")
    task = load("Task-AdditionalInformationTaskExample.json")
    bundle["entry"].append({"fullUrl": "http://example.org/fhir/Task/T1", "resource": task})
    answer = parse_response(bundle)
    assert answer.info_request == InfoRequest(codes=("28570-0",))
    assert answer.lines[0].review_action == "A4"


def test_communication_request_is_an_info_request():
    response = load("ClaimResponse-PractitionerRequestorPendingResponseExample.json")
    response["contained"] = [load("CommunicationRequest-CommunicationRequestExample.json")]
    assert parse_response(response).info_request == InfoRequest(codes=("18776-5",))


def test_completed_task_asks_for_nothing():
    bundle = load("Bundle-ReferralPendingAuthorizationResponseBundleExample.json")
    task = dict(load("Task-AdditionalInformationTaskExample.json"), status="completed")
    bundle["entry"].append({"fullUrl": "http://example.org/fhir/Task/T1", "resource": task})
    assert parse_response(bundle).info_request is None


def test_operation_outcome_of_an_invalid_request():
    errors = parse_operation_outcome(load("OperationOutcome-InvalidRequestResponse.json"))
    assert errors == (PayerError(code="invalid",
                                 message="The input request is not of the desired format."),)


# ---------------------------------------------------------------- decisions the examples lack


def _with_item(item: dict, **extra) -> dict:
    response = load("ClaimResponse-PractitionerRequestorResponseExample.json")
    response["item"] = [item]
    response.update(extra)
    return response


def _review(code: str, number: str | None = None, reason: str | None = None) -> list[dict]:
    sub = [{"url": pas_fhir.EXT_REVIEW_ACTION_CODE,
            "valueCodeableConcept": {"coding": [{"system": pas_fhir.X12_REVIEW_ACTION,
                                                 "code": code}]}}]
    if number:
        sub.append({"url": "number", "valueString": number})
    if reason:
        sub.append({"url": "reasonCode", "valueCodeableConcept": {"coding": [
            {"system": pas_fhir.X12_REVIEW_REASON, "code": reason,
             "display": "Not Medically Necessary"}]}})
    return [{"extension": [{"url": pas_fhir.EXT_REVIEW_ACTION, "extension": sub}],
             "category": {"coding": [{"code": "submitted"}]}}]


def test_denial_reason_code_and_process_note():
    response = _with_item(
        {"itemSequence": 1, "noteNumber": [1], "adjudication": _review("A3", reason="0F")},
        processNote=[{"number": 1, "type": "display", "text": "Conservative therapy first."}],
    )
    get_fhir_model_class("ClaimResponse").model_validate(response)
    line = parse_response(response).lines[0]
    assert line.review_action == "A3"
    assert line.auth_number is None
    assert line.denial_reason == DenialReason("0F", "Conservative therapy first.")


def test_modification_a6_is_granted_as_add_item():
    """PAS spec-36/37: five sessions requested, three authorized."""
    response = _with_item(
        {"itemSequence": 1, "adjudication": _review("A6", number="AUTH0002")},
        addItem=[{"itemSequence": [1],
                  "productOrService": {"coding": [{"system": pas_fhir.CPT, "code": "97110"}]},
                  "quantity": {"value": 3},
                  "adjudication": _review("A1", number="AUTH0002")}],
    )
    get_fhir_model_class("ClaimResponse").model_validate(response)
    line = parse_response(response).lines[0]
    assert (line.review_action, line.authorized_quantity, line.authorized_code,
            line.auth_number) == ("A6", 3, "97110", "AUTH0002")


@pytest.mark.parametrize("doc", [
    {"resourceType": "Patient"},
    {"resourceType": "ClaimResponse"},  # no outcome
    {"resourceType": "ClaimResponse", "outcome": "complete", "item": [{"itemSequence": "1"}]},
    {"resourceType": "ClaimResponse", "outcome": "complete", "item": "nope"},
    {"resourceType": "ClaimResponse", "outcome": "complete",
     "item": [{"itemSequence": 1, "noteNumber": 1}]},
    {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "ClaimResponse",
                                                       "outcome": "approved"}}]},
    [],
])
def test_unusable_documents_are_parse_errors(doc):
    with pytest.raises(PasParseError):
        parse_response(doc)


def test_queued_is_not_pas_and_reads_as_complete():
    response = load("ClaimResponse-PractitionerRequestorPendingResponseExample.json")
    assert parse_response(dict(response, outcome="queued")).outcome == "complete"


def test_bundle_without_claim_response():
    with pytest.raises(NoClaimResponse):
        parse_response({"resourceType": "Bundle", "type": "collection", "entry": []})


# ---------------------------------------------------------------- what we build


def test_submit_bundle_validates_and_carries_what_the_guide_carries():
    guide = load("Bundle-ReferralAuthorizationBundleExample.json")
    guide_claim = guide["entry"][0]["resource"]
    bundle = build_claim_bundle(make_claim(), CONFIG)
    Bundle.model_validate(bundle)

    assert bundle["type"] == guide["type"] == "collection"
    assert bundle["meta"]["profile"] == guide["meta"]["profile"]
    assert bundle["timestamp"] == "2026-11-20T09:30:00Z"
    claim = bundle["entry"][0]["resource"]
    assert claim["resourceType"] == "Claim"
    assert claim["use"] == guide_claim["use"] == "preauthorization"
    assert claim["status"] == "active"
    assert claim["identifier"] == [{"system": "urn:authsvc:claim", "value": "case_01TEST"}]
    assert claim["created"] == "2026-11-20T09:30:00Z"
    # header UM06, item UM01/UM02 as in the guide
    assert ext_urls(claim) & ext_urls(guide_claim) == {pas_fhir.EXT_LEVEL_OF_SERVICE}
    level = claim["extension"][0]["valueCodeableConcept"]["coding"][0]
    assert (level["system"], level["code"]) == ("https://codesystem.x12.org/005010/1338", "E")
    guide_item_urls = ext_urls(guide_claim["item"][0])
    assert [i["sequence"] for i in claim["item"]] == [1, 2]
    for item in claim["item"]:
        assert {pas_fhir.EXT_CERTIFICATION_TYPE, pas_fhir.EXT_REQUEST_TYPE} <= \
            ext_urls(item) & guide_item_urls
        cert = next(e for e in item["extension"] if e["url"] == pas_fhir.EXT_CERTIFICATION_TYPE)
        assert cert["valueCodeableConcept"]["coding"][0]["code"] == "I"
        assert item["productOrService"]["coding"][0]["code"]
        assert item["category"]["coding"][0]["system"] == \
            guide_claim["item"][0]["category"]["coding"][0]["system"]
    first, second = claim["item"]
    assert first["productOrService"]["coding"] == [
        {"system": "http://www.ama-assn.org/go/cpt", "code": "72148"}]
    assert second["productOrService"]["coding"] == [
        {"system": "https://bluebutton.cms.gov/resources/codesystem/hcpcs", "code": "E0424"}]
    assert first["servicedPeriod"] == {"start": "2026-12-01", "end": "2026-12-31"}
    assert second["servicedDate"] == "2026-12-01"
    assert second["quantity"] == {"value": 3}
    assert first["locationCodeableConcept"]["coding"][0]["code"] == "22"
    assert [d["diagnosisCodeableConcept"]["coding"][0] for d in claim["diagnosis"]] == [
        {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M54.50"},
        {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M51.16"},
    ]
    # references resolve inside the Bundle, like the guide's
    coverage = resolve(bundle, claim["insurance"][0]["coverage"])
    assert coverage["resourceType"] == "Coverage"
    assert coverage["subscriberId"] == "SIM-APPROVE-0001"
    assert claim["insurance"][0]["focal"] is True
    patient = resolve(bundle, claim["patient"])
    assert (patient["resourceType"], patient["birthDate"], patient["gender"]) == \
        ("Patient", "1984-03-02", "female")
    assert resolve(bundle, coverage["beneficiary"]) is patient
    provider = resolve(bundle, claim["provider"])
    assert provider["identifier"] == [{"system": "http://hl7.org/fhir/sid/us-npi",
                                       "value": "1234567893"}]
    assert resolve(bundle, claim["insurer"])["name"] == "Demo Health Plan"
    performer = resolve(bundle, claim["careTeam"][0]["provider"])
    assert performer["identifier"][0]["value"] == "1003000126"


def test_expedited_is_um06_u():
    claim = build_claim_bundle(make_claim(urgency="expedited"), CONFIG)["entry"][0]["resource"]
    level = next(e for e in claim["extension"] if e["url"] == pas_fhir.EXT_LEVEL_OF_SERVICE)
    assert level["valueCodeableConcept"]["coding"][0]["code"] == "U"


def test_a_retry_resends_the_same_bundle():
    claim = make_claim()
    first = build_claim_bundle(claim, CONFIG)
    assert build_claim_bundle(claim, CONFIG) == first
    other = build_claim_bundle(make_claim(claim_identifier="case_02OTHER"), CONFIG)
    assert other["identifier"] != first["identifier"]
    assert other["entry"][0]["fullUrl"] != first["entry"][0]["fullUrl"]


def test_bundle_identifier_holds_no_phi():
    bundle = build_claim_bundle(make_claim(), CONFIG)
    ids = json.dumps([bundle["id"], bundle["identifier"], [e["fullUrl"] for e in
                                                          bundle["entry"]]])
    for phi in ("Diaz", "1984", "SIM-APPROVE", "MRN-0001"):
        assert phi not in ids


def test_update_with_attachment_references_the_first_claim():
    guide = load("Bundle-HomecareAuthorizationUpdateBundleExample.json")["entry"][0]["resource"]
    att = Attachment("att_1", "application/pdf", "MRI report", b"%PDF-1.4", loinc="18748-4")
    claim = make_claim(claim_identifier="case_01TEST", related_claim_identifier="case_01TEST",
                       attachments=(att,),
                       lines=(ClaimLine(1, "CPT", "72148", 1, dt.date(2026, 12, 1),
                                        dt.date(2026, 12, 31), change_flag="changed"),
                              ClaimLine(2, "HCPCS", "E0424", 3, dt.date(2026, 12, 1),
                                        cancelled=True)))
    bundle = build_claim_bundle(claim, CONFIG, "update")
    Bundle.model_validate(bundle)
    resource = bundle["entry"][0]["resource"]
    assert resource["meta"]["profile"] == guide["meta"]["profile"]
    assert resource["related"][0]["claim"]["identifier"]["value"] == "case_01TEST"
    assert resource["related"][0]["relationship"]["coding"][0]["code"] == \
        guide["related"][0]["relationship"]["coding"][0]["code"] == "prior"
    info = resource["supportingInfo"][0]
    assert info["category"]["coding"][0]["code"] == "additionalInformation"
    assert info["extension"] == [{"url": pas_fhir.EXT_INFO_CHANGED, "valueCode": "added"}]
    doc = resolve(bundle, info["valueReference"])
    assert doc["resourceType"] == "DocumentReference"
    assert doc["type"]["coding"][0]["code"] == "18748-4"
    assert doc["content"][0]["attachment"]["data"] == "JVBERi0xLjQ="
    changed, cancelled = resource["item"]
    assert {"url": pas_fhir.EXT_INFO_CHANGED, "valueCode": "changed"} in changed["extension"]
    assert cancelled["modifierExtension"] == guide["item"][1]["modifierExtension"]
    cert = next(e for e in cancelled["extension"] if e["url"] == pas_fhir.EXT_CERTIFICATION_TYPE)
    assert cert["valueCodeableConcept"]["coding"][0]["code"] == "3"


def test_related_claim_per_kind():
    extension = make_claim(claim_identifier="case_ext", certification_type="4",
                           related_claim_identifier="case_approved")

    def related(kind: str) -> list:
        claim = build_claim_bundle(extension, CONFIG, kind)["entry"][0]["resource"]
        return [r["claim"]["identifier"]["value"] for r in claim.get("related", [])]

    assert related("submit") == ["case_approved"]  # the new request follows the approval
    assert related("update") == ["case_ext"]  # an update or cancel targets the case itself
    assert related("cancel") == ["case_ext"]
    assert related("inquire") == []


def test_cancel_is_certification_type_3_on_the_header_without_items():
    bundle = build_claim_bundle(make_claim(), CONFIG, "cancel")
    Bundle.model_validate(bundle)
    claim = bundle["entry"][0]["resource"]
    assert "item" not in claim
    cert = next(e for e in claim["extension"] if e["url"] == pas_fhir.EXT_CERTIFICATION_TYPE)
    assert cert["valueCodeableConcept"]["coding"][0]["code"] == "3"
    assert claim["related"][0]["claim"]["identifier"]["value"] == "case_01TEST"


def test_inquiry_bundle_is_like_the_guides():
    guide = load("Bundle-PASClaimInquiryBundleExample.json")
    bundle = build_claim_bundle(make_claim(), CONFIG, "inquire")
    Bundle.model_validate(bundle)
    assert bundle["meta"]["profile"] == guide["meta"]["profile"]
    claim = bundle["entry"][0]["resource"]
    assert claim["identifier"][0]["value"] == "case_01TEST"
    assert {r["resourceType"] for r in entries(bundle).values()} >= \
        {e["resource"]["resourceType"] for e in guide["entry"]}


def test_eligibility_request_carries_the_date_of_service():
    request = EligibilityRequest(
        request_id="elig_01", patient=make_claim().patient,
        coverage=CoverageInfo("demo", "SIM-APPROVE-0001"), requester=Party("1234567893"),
        date_of_service=dt.date(2026, 12, 1), codes=(("CPT", "72148"),),
    )
    doc = build_eligibility_request(request, CONFIG)
    CoverageEligibilityRequest.model_validate(doc)
    assert doc["servicedDate"] == "2026-12-01"
    contained = {r["id"]: r for r in doc["contained"]}
    assert contained["coverage"]["subscriberId"] == "SIM-APPROVE-0001"
    assert doc["insurance"][0]["coverage"] == {"reference": "#coverage"}
    assert doc["item"][0]["productOrService"]["coding"][0]["code"] == "72148"


def test_eligibility_answers():
    base = {"resourceType": "CoverageEligibilityResponse", "status": "active",
            "purpose": ["validation"], "patient": {"display": "x"}, "created": "2026-11-20",
            "request": {"display": "x"}, "insurer": {"display": "x"}, "outcome": "complete"}
    active = dict(base, insurance=[{"coverage": {"display": "PPO"}, "inforce": True}])
    inactive = dict(base, insurance=[{"coverage": {"display": "PPO"}, "inforce": False}])
    missing = dict(base, outcome="error", error=[{"code": {"coding": [
        {"system": pas_fhir.X12_REJECT_REASON, "code": "75"}]}}])
    for doc in (active, inactive, missing):
        get_fhir_model_class("CoverageEligibilityResponse").model_validate(doc)
    assert parse_eligibility_response(active).status == "active"
    assert parse_eligibility_response(active).plan_name == "PPO"
    assert parse_eligibility_response(inactive).status == "inactive"
    answer = parse_eligibility_response(missing)
    assert answer.status == "member_not_found"
    assert answer.errors == (PayerError(code="75"),)
    assert parse_eligibility_response(base).status == "error"


def test_subscription_is_like_the_guides():
    guide = load("Subscription-PASSubscriptionExample.json")
    doc = build_subscription("https://authsvc.example/v1/payer-callbacks/demo", CONFIG)
    assert doc["criteria"] == guide["criteria"]
    assert doc["channel"]["type"] == "rest-hook"
    assert doc["channel"]["endpoint"] == "https://authsvc.example/v1/payer-callbacks/demo"
    assert doc["channel"]["_payload"] == guide["channel"]["_payload"]
    assert doc["_criteria"]["extension"][0]["url"] == \
        guide["_criteria"]["extension"][0]["url"]


def test_sim_answers_parse_like_the_guides():
    """The simulator's Bundles round-trip through the adapter's parser (no HTTP)."""
    from authsvc.payer_sim.app import SimClaim, decide, parse_pas_request, response_bundle

    bundle = build_claim_bundle(make_claim(), CONFIG)
    raw = json.dumps(bundle).encode()
    parsed = parse_pas_request(copy.deepcopy(bundle), raw)
    assert (parsed.kind, parsed.member_id, parsed.claim_identifier) == \
        ("submit", "SIM-APPROVE-0001", "case_01TEST")
    claim = SimClaim(identifier="case_01TEST", system="urn:authsvc:claim",
                     member_id=parsed.member_id, scenario="SIM-MODIFY",
                     lines={ln.sequence: ln for ln in parsed.lines},
                     decisions=decide("SIM-MODIFY", "case_01TEST", parsed.lines),
                     context=parsed.context, response_id="cr-1")
    answer = parse_response(response_bundle(claim, "case_01TEST", "urn:authsvc:claim",
                                            context=claim.context))
    assert [(ln.review_action, ln.authorized_quantity) for ln in answer.lines] == \
        [("A6", 1), ("A6", 1)]


# ---------------------------------------------------------------- the payers file


def test_default_payers_file_points_demo_at_the_simulator():
    payers = load_payers(DEFAULT_PAYERS_FILE, env={})
    demo = payers["demo"]
    assert demo.base_url == "http://127.0.0.1:8090/fhir"
    assert (demo.protocol, demo.timeout_seconds, demo.cms0057_impacted) == \
        ("pas-fhir", 15.0, True)
    assert demo.poll_schedule_seconds == (60, 300, 900, 3600, 14400)
    assert demo.secret_env == "AUTHSVC_PAYER_DEMO_SECRET"
    assert isinstance(build_adapter(demo, lambda record: None), PasFhirAdapter)


def test_simulator_url_is_overridable():
    payers = load_payers(DEFAULT_PAYERS_FILE, env={"AUTHSVC_SIM_URL": "http://127.0.0.1:5555"})
    assert payers["demo"].base_url == "http://127.0.0.1:5555/fhir"
    assert load_payers(DEFAULT_PAYERS_FILE, env={"AUTHSVC_SIM_PORT": "8123"})["demo"].base_url \
        == "http://127.0.0.1:8123/fhir"
    assert expand_env("${A:-x}/${B}", {"B": "y"}) == "x/y"
    with pytest.raises(PayerConfigError):
        expand_env("${MISSING}", {})


def test_dev_secret_only_for_demo(monkeypatch):
    monkeypatch.delenv("AUTHSVC_PAYER_DEMO_SECRET", raising=False)
    demo = dataclasses.replace(CONFIG, secret_env="AUTHSVC_PAYER_DEMO_SECRET")
    assert demo.secret() == DEMO_DEV_SECRET
    other = dataclasses.replace(demo, id="acme", secret_env="AUTHSVC_PAYER_ACME_SECRET")
    monkeypatch.delenv("AUTHSVC_PAYER_ACME_SECRET", raising=False)
    with pytest.raises(PayerConfigError):
        other.secret()
    monkeypatch.setenv("AUTHSVC_PAYER_DEMO_SECRET", "s3cret")
    assert demo.secret() == "s3cret"
    assert demo.webhook_key() == b"s3cret"
    assert webhook_key_from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw") == \
        base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")


def test_standard_webhooks_known_answer_vector():
    from authsvc.payer_sim.app import sign

    assert sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330, b'{"test": 2432232314}') == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize("body, message", [
    ("payers: []", "non-empty"),
    ("payers:\n  - {id: x, name: X, protocol: x12, base_url: 'http://a'}", "protocol"),
    ("payers:\n  - {id: x, name: X, protocol: pas-fhir, base_url: 'ftp://a'}", "base_url"),
    ("payers:\n  - {id: x, name: X, protocol: pas-fhir, base_url: 'http://a', color: red}",
     "unknown keys"),
    ("payers:\n  - {id: x, name: X, protocol: pas-fhir, base_url: 'http://a'}\n"
     "  - {id: x, name: Y, protocol: pas-fhir, base_url: 'http://b'}", "duplicate"),
    ("payers:\n  - {id: x, name: X, protocol: pas-fhir, base_url: 'http://a', "
     "timeout_seconds: 0}", "timeout"),
])
def test_bad_payers_files_fail_loudly(tmp_path, body, message):
    path = tmp_path / "payers.yaml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(PayerConfigError, match=message):
        load_payers(path, env={})
