"""CDS Hooks → order facts and back (pure parts of authsvc/service_layer/crd.py): codes of
every draft-order type of the CRD guide, dates, payer matching, and the coverage-information
extension validated with fhir.resources (R4B)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from fhir.resources.R4B import get_fhir_model_class

from authsvc.adapters.payers.registry import PayerConfig, PayerMatch
from authsvc.domain.determination import Determination, Reason
from authsvc.service_layer import crd

CRD = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "crd"
CPT = "http://www.ama-assn.org/go/cpt"


def load(name: str) -> dict:
    return json.loads((CRD / name).read_text())


def sr(*codings: dict, **extra) -> dict:
    return {"resourceType": "ServiceRequest", "id": "x", "status": "draft",
            "intent": "order", "subject": {"reference": "Patient/1"},
            "code": {"coding": list(codings)}, **extra}


def test_cpt_and_both_hcpcs_systems_are_read_other_codings_ignored():
    order = sr({"system": "http://snomed.info/sct", "code": "12345"},
               {"system": CPT, "code": "72148"},
               {"system": "https://bluebutton.cms.gov/resources/codesystem/hcpcs",
                "code": "E0424"},
               {"system": "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
                "code": "J0585"},
               {"system": CPT, "code": "72148"},  # duplicate
               {"system": CPT, "code": "7214"}, {"system": CPT, "code": "e0424"})
    assert crd.billing_codes(order, crd.Resources()) == [
        ("CPT", "72148"), ("HCPCS", "E0424"), ("HCPCS", "J0585")]


def test_billing_options_are_used_when_the_order_has_no_billing_code():
    request = load("CRDServiceRequest.json")
    order = request["context"]["draftOrders"]["entry"][0]["resource"]
    assert crd.billing_codes(order, crd.Resources()) == [
        ("CPT", "77061"), ("CPT", "77062"), ("CPT", "77065"), ("CPT", "77066")]
    oxygen = request["context"]["draftOrders"]["entry"][1]["resource"]
    assert crd.billing_codes(oxygen, crd.Resources()) == [("HCPCS", "E0431")]


def _add(concept: dict) -> dict:
    concept.setdefault("coding", []).append({"system": CPT, "code": "99213"})
    return concept


def _device(o: dict) -> None:
    o.pop("codeReference", None)
    o["codeCodeableConcept"] = _add({})


def _medication(o: dict) -> None:
    o.pop("medicationReference", None)
    o["medicationCodeableConcept"] = _add(o.get("medicationCodeableConcept") or {})


@pytest.mark.parametrize("name,mutate", [
    ("DeviceRequest-example.json", _device),
    ("MedicationRequest-example.json", _medication),
    ("NutritionOrder-example.json", lambda o: _add(o["oralDiet"]["type"][0])),
    ("VisionPrescription-visionprescription-example.json",
     lambda o: _add(o["lensSpecification"][0]["product"])),
    ("Appointment-example.json", lambda o: _add(o["serviceType"][0])),
    ("ServiceRequest-example.json", lambda o: _add(o["code"])),
    ("CommunicationRequest-example.json",
     lambda o: o.setdefault("category", []).append(_add({}))),
])
def test_each_guide_order_type_gets_a_valid_coverage_information(name, mutate):
    order = load(name)
    assert crd.billing_codes(order, crd.Resources()) == []  # the examples carry no CPT/HCPCS
    mutate(order)
    assert crd.billing_codes(order, crd.Resources()) == [("CPT", "99213")]

    det = Determination(covered="covered", pa_needed="no-auth",
                        reasons=(Reason("policy", "Visits need no authorization"),),
                        policy_links=("https://payer.example/p",))
    ext = crd.coverage_information(det, coverage_ref={"reference": "Coverage/c1"},
                                   code=("CPT", "99213"), assertion_id="ca_1",
                                   on=dt.date(2026, 11, 26))
    annotated = {**order, "extension": [*order.get("extension", []), ext]}
    get_fhir_model_class(order["resourceType"]).model_validate(annotated)


def test_device_code_from_a_prefetched_device():
    resources = crd.Resources()
    resources.add({"resourceType": "Bundle", "entry": [{"resource": {
        "resourceType": "Device", "id": "example", "type": {"coding": [
            {"system": "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
             "code": "E0431"}]}}}]})
    assert crd.billing_codes(load("DeviceRequest-example.json"), resources) == [
        ("HCPCS", "E0431")]


def test_references_resolve_relative_absolute_and_contained():
    resources = crd.Resources()
    resources.add({"resourceType": "Bundle", "entry": [
        {"fullUrl": "http://ehr/fhir/Practitioner/P1",
         "resource": {"resourceType": "Practitioner", "id": "P1"}}]})
    assert resources.resolve({"reference": "Practitioner/P1"})["id"] == "P1"
    assert resources.resolve({"reference": "http://other/fhir/Practitioner/P1"})["id"] == "P1"
    assert resources.resolve("http://ehr/fhir/Practitioner/P1/_history/2")["id"] == "P1"
    holder = {"contained": [{"resourceType": "Organization", "id": "o"}]}
    assert resources.resolve({"reference": "#o"}, holder)["resourceType"] == "Organization"
    assert resources.resolve({"reference": 5}) is None


@pytest.mark.parametrize("order,expected", [
    ({"occurrenceDateTime": "2026-12-01T10:00:00Z"}, dt.date(2026, 12, 1)),
    ({"occurrencePeriod": {"start": "2026-12-02"}}, dt.date(2026, 12, 2)),
    ({"occurrenceTiming": {"repeat": {"boundsPeriod": {"start": "2026-12-03"}}}},
     dt.date(2026, 12, 3)),
    ({"dispenseRequest": {"validityPeriod": {"start": "2026-12-04"}}}, dt.date(2026, 12, 4)),
    ({"start": "2026-12-05T09:00:00Z"}, dt.date(2026, 12, 5)),
    ({"occurrenceDateTime": "2026"}, None),
    ({"occurrenceDateTime": 7}, None),
])
def test_service_date(order, expected):
    assert crd.service_date(order) == expected


def _payers() -> dict[str, PayerConfig]:
    return {"demo": PayerConfig(
        id="demo", name="Demo", protocol="pas-fhir", base_url="http://x",
        match=PayerMatch(payor_identifiers=("demo", "http://payers.example|P-9"),
                         payor_names=("Demo Health Plan",)))}


@pytest.mark.parametrize("payor,matches", [
    ({"identifier": {"value": "demo"}}, True),
    ({"identifier": {"system": "http://payers.example", "value": "P-9"}}, True),
    ({"identifier": {"system": "http://other.example", "value": "P-9"}}, False),
    ({"display": " demo   HEALTH plan "}, True),
    ({"name": "Demo Health Plan"}, True),
    ({"idents": [{"system": "http://payers.example", "value": "P-9"}]}, True),
    ({"display": "Acme Health Plan"}, False),
    ({}, False),
])
def test_match_payer(payor, matches):
    got = crd.match_payer([payor], _payers())
    assert (got is not None and got.id == "demo") == matches


def test_discovery_has_the_guide_services_shape():
    guide = {s["hook"]: s for s in load("CRDServices.json")["services"]}
    doc = crd.discovery()
    assert [s["id"] for s in doc["services"]] == [
        "order-select", "order-sign", "order-dispatch", "appointment-book"]
    for svc in doc["services"]:
        assert set(guide[svc["hook"]]) == set(svc)
        assert svc["prefetch"]["coverage"] == guide[svc["hook"]]["prefetch"]["coverage"]


def test_gold_card_extension_follows_the_annotated_example():
    det = Determination(covered="conditional", pa_needed="satisfied", info_needed=("OTH",),
                        reasons=(Reason("gold-card", "Prior authorization waived"),),
                        satisfied_pa_id="gc-1", expiry_date="2026-12-31")
    ext = crd.coverage_information(det, coverage_ref={"reference": "Coverage/c"},
                                   code=("CPT", "72148"), assertion_id="ca_1",
                                   on=dt.date(2026, 11, 26))
    subs = {s["url"]: s for s in ext["extension"]}
    assert subs["pa-needed"]["valueCode"] == "satisfied"
    assert subs["satisfied-pa-id"]["valueString"] == "gc-1"
    assert subs["reason"]["valueCodeableConcept"]["coding"] == [
        {"system": crd.CRD_TEMP, "code": "gold-card"}]
    example = load("MedicationRequest-annotated-example.json")
    (ex,) = [e for e in example["extension"] if e["url"] == crd.COVERAGE_INFO]
    ex_subs = {s["url"]: s for s in ex["extension"]}
    assert ex_subs["reason"]["valueCodeableConcept"]["coding"] == [
        {"system": crd.CRD_TEMP, "code": "gold-card"}]
    assert {"coverage", "covered", "date", "coverage-assertion-id"} <= set(subs) & set(ex_subs)
