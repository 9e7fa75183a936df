"""CDS Hooks coverage requirements (Da Vinci CRD) over HTTP: the guide's own requests, gold
cards, fetching from a FHIR server, JWT checks, continuity with orders, audit."""

from __future__ import annotations

import copy
import datetime as dt
import json
import threading
import time
import uuid
from pathlib import Path

import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fhir.resources.R4B import get_fhir_model_class
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from authsvc.adapters.db import tables as t
from tests.conftest import auth, free_port, order_body

pytestmark = pytest.mark.integration

CRD = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "crd"
COVERAGE_INFO = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
CRD_TEMP = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"
PUBLIC = "http://127.0.0.1:8000"  # the tests' Settings keep the default AUTHSVC_PUBLIC_URL
ORG = "org-a"


def load(name: str) -> dict:
    return json.loads((CRD / name).read_text())


# ------------------------------------------------------------------ keys and tokens


class Signer:
    """A CDS client's key pair; `token()` makes a CDS Hooks JWT for a service."""

    def __init__(self, alg: str = "RS384", kid: str | None = None):
        self.alg = alg
        self.kid = kid or uuid.uuid4().hex[:8]
        if alg.startswith("RS"):
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            algo = jwt.algorithms.RSAAlgorithm
        else:
            self.private = ec.generate_private_key(ec.SECP384R1())
            algo = jwt.algorithms.ECAlgorithm
        public_jwk = json.loads(algo.to_jwk(self.private.public_key()))
        self.jwk = {**public_jwk, "kid": self.kid, "use": "sig", "alg": alg}

    def token(self, iss: str, service: str = "order-sign", **over) -> str:
        now = int(time.time())
        claims = {"iss": iss, "sub": "ehr-client", "aud": f"{PUBLIC}/cds-services/{service}",
                  "iat": now, "exp": now + 240, "jti": uuid.uuid4().hex}
        claims.update(over)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": self.kid})

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# ------------------------------------------------------------------ a small FHIR server


def demo_coverage(payor: dict | None = None, cid: str = "cov-demo") -> dict:
    return {"resourceType": "Coverage", "id": cid, "status": "active",
            "subscriberId": "SIM-APPROVE-0001",
            "beneficiary": {"reference": "Patient/123"},
            "payor": [payor or {"display": "Demo Health Plan"}]}


class FhirServer:
    """A FHIR test server on a free 127.0.0.1 port; records the requests it got."""

    def __init__(self, jwks: dict):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self.seen: list[tuple[str, str | None]] = []
        self.resources: dict[str, dict] = {
            "Patient/123": {**load("Patient-example.json"), "id": "123"},
            "MedicationRequest/1111": {**load("MedicationRequest-example.json"), "id": "1111"},
            "MedicationRequest/2222": {**load("MedicationRequest-example.json"), "id": "2222"},
        }
        self.coverages = [demo_coverage()]
        app = Flask("fhir-test")

        @app.get("/fhir/<rtype>/<rid>")
        def read(rtype: str, rid: str):
            self.seen.append((f"{rtype}/{rid}", request.headers.get("Authorization")))
            found = self.resources.get(f"{rtype}/{rid}")
            return (jsonify(found), 200) if found else (jsonify({}), 404)

        @app.get("/fhir/Coverage")
        def search():
            self.seen.append(("Coverage?" + request.query_string.decode(),
                              request.headers.get("Authorization")))
            return jsonify({"resourceType": "Bundle", "type": "searchset",
                            "entry": [{"resource": c} for c in self.coverages]})

        @app.get("/jwks.json")
        def keys():
            return jsonify(jwks)

        @app.get("/redirect/fhir/<path:rest>")
        def redirect(rest: str):
            return "", 302, {"Location": f"{self.base}/{rest}"}

        self.server = make_server("127.0.0.1", self.port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FhirServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def keys() -> dict[str, Signer]:
    return {"rs": Signer("RS384"), "es": Signer("ES384"), "other": Signer("RS384")}


@pytest.fixture(scope="module")
def fhir(keys):
    with FhirServer({"keys": [keys["rs"].jwk]}) as server:
        yield server


def register(services, *, jwks: dict | None = None, jwks_url: str | None = None,
             servers: list[str] = (), org: str = ORG) -> str:
    iss = f"https://ehr-{uuid.uuid4().hex[:8]}.example.org"
    with services.engine.begin() as conn:
        conn.execute(t.cds_clients.insert().values(
            id=f"cdc_{uuid.uuid4().hex[:20]}", org_id=org, iss=iss, jwks=jwks,
            jwks_url=jwks_url, fhir_servers=list(servers),
            created_at=dt.datetime.now(dt.UTC)))
    return iss


@pytest.fixture(scope="module")
def iss(services, keys, fhir) -> str:
    return register(services, jwks={"keys": [keys["rs"].jwk, keys["es"].jwk]},
                    servers=[fhir.base])


def call(client, signer: Signer, iss: str, body: dict, service: str | None = None, **hdrs):
    service = service or body.get("hook", "order-sign")
    headers = {"Authorization": f"Bearer {signer.token(iss, service)}",
               "X-Request-Id": uuid.uuid4().hex, **hdrs}
    return client.post(f"/cds-services/{service}", json=body, headers=headers)


def validate(resource: dict) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def coverage_infos(resource: dict) -> list[dict[str, list]]:
    """Each coverage-information extension as {sub-url: [values]}."""
    out = []
    for ext in resource.get("extension", []):
        if ext["url"] != COVERAGE_INFO:
            continue
        d: dict[str, list] = {}
        for sub in ext["extension"]:
            value = next(v for k, v in sub.items() if k.startswith("value") or k == "extension")
            d.setdefault(sub["url"], []).append(value)
        out.append(d)
    return out


def check_structure(answer: dict, *, only: set[str] | None = None) -> None:
    """Our answer has the shape of the guide's CRDServiceResponse*.json examples (resources
    validated with fhir.resources R4B; `only`: the ids of the orders that were valid FHIR)."""
    examples = [load(f"CRDServiceResponse{s}.json") for s in ("", "2", "3")]
    card_keys = set.intersection(*[set(c) for e in examples for c in e["cards"]])
    action_keys = set.intersection(*[set(a) for e in examples for a in e.get("systemActions", [])])
    example_urls = {sub["url"] for e in examples for a in e.get("systemActions", [])
                    for ext in a["resource"].get("extension", []) if ext["url"] == COVERAGE_INFO
                    for sub in ext["extension"]}
    assert isinstance(answer["cards"], list)
    for card in answer["cards"]:
        assert card_keys <= set(card), card
        assert card["indicator"] in ("info", "warning", "critical")
        assert len(card["summary"]) < 140 and card["source"]["label"]
        for link in card.get("links", []):
            assert link["type"] == "absolute" and link["url"].startswith("https://")
    for action in answer.get("systemActions", []):
        assert action_keys <= set(action) and action["type"] == "update"
        if only is None or action["resource"]["id"] in only:
            validate(action["resource"])
        infos = coverage_infos(action["resource"])
        assert infos
        for info in infos:
            assert {"coverage", "covered", "date", "coverage-assertion-id"} <= set(info)
            assert set(info) <= example_urls | {"expiry-date", "doc-purpose"}
            assert ("satisfied-pa-id" in info) == (info.get("pa-needed") == ["satisfied"])
            if "conditional" in info["covered"] + info.get("pa-needed", []):
                assert info.get("info-needed")
            if info["covered"] == ["not-covered"]:
                assert "pa-needed" not in info


# ------------------------------------------------------------------ discovery


def test_discovery_lists_the_crd_hooks_without_a_jwt(client):
    resp = client.get("/cds-services")
    assert resp.status_code == 200
    services = {s["id"]: s for s in resp.get_json()["services"]}
    assert set(services) == {"order-select", "order-sign", "order-dispatch", "appointment-book"}
    guide = {s["hook"]: s for s in load("CRDServices.json")["services"]}
    for sid, svc in services.items():
        assert svc["hook"] == sid
        assert set(guide[sid]) - {"extension"} <= set(svc)
        assert svc["prefetch"]["patient"] == guide[sid]["prefetch"]["patient"]
        assert svc["prefetch"]["coverage"] == guide[sid]["prefetch"]["coverage"]


def test_openapi_documents_the_hooks(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["paths"]["/cds-services"]["get"]["x-roles"] == ["public"]
    assert spec["paths"]["/cds-services/{service_id}"]["post"]["x-roles"] == ["cds-jwt"]


# ------------------------------------------------------------------ the guide's requests


def test_crd_request_order_sign_full_prefetch(client, services, keys, iss):
    body = load("CRDServiceRequest.json")
    resp = call(client, keys["rs"], iss, body)
    assert resp.status_code == 200, resp.get_json()
    answer = resp.get_json()
    check_structure(answer)
    actions = answer["systemActions"]
    assert [a["resource"]["id"] for a in actions] == ["1357", "2468"]
    # 1357 is coded in SNOMED with CPT billing options: one coverage-information per option.
    billing = [i["billingCode"][0]["code"] for i in coverage_infos(actions[0]["resource"])]
    assert billing == ["77061", "77062", "77065", "77066"]
    # Acme Health Plan is no payer of ours: conditional, with reason unknown-payer.
    for action in actions:
        for info in coverage_infos(action["resource"]):
            assert info["covered"] == ["conditional"]
            codes = [c["code"] for r in info["reason"] for c in r.get("coding", [])]
            assert "unknown-payer" in codes
            assert info["coverage"][0]["reference"] == "Coverage/COV1"
    assert answer["cards"] and all(c["extension"]["davinci-crd.associated-resource"]
                                   for c in answer["cards"])
    assert len(answer["cards"]) <= 5  # the request's davinci-crd.configuration max-cards


def test_crd_request_order_dispatch_honours_coverage_info_off(client, keys, iss):
    resp = call(client, keys["rs"], iss, load("CRDServiceRequest2.json"))
    assert resp.status_code == 200
    assert resp.get_json() == {"cards": []}
    check_structure(resp.get_json())


def test_crd_request_order_dispatch_reads_dispatched_orders(client, keys, iss, fhir):
    body = load("CRDServiceRequest2.json")
    del body["extension"]["davinci-crd.configuration"]
    assert call(client, keys["rs"], iss, body).status_code == 412  # example.org: not allowed
    body["fhirServer"] = fhir.base
    resp = call(client, keys["rs"], iss, body)
    assert resp.status_code == 200, resp.get_json()
    answer = resp.get_json()
    check_structure(answer)
    assert [a["resource"]["id"] for a in answer["systemActions"]] == ["1111", "2222"]
    assert ("MedicationRequest/1111", "Bearer some-opaque-fhir-access-token") in fhir.seen


@pytest.mark.parametrize("name", ["CRDServiceRequest3.json", "CRDServiceRequest4.json"])
def test_crd_requests_without_prefetch_fetch_from_the_fhir_server(client, keys, iss, fhir, name):
    body = load(name)
    resp = call(client, keys["rs"], iss, body)
    assert resp.status_code == 412  # http://example.org/...: not allow-listed for this client
    body["fhirServer"] = fhir.base + "/"
    fhir.seen.clear()
    resp = call(client, keys["rs"], iss, body)
    assert resp.status_code == 200, resp.get_json()
    answer = resp.get_json()
    check_structure(answer)
    assert ("Patient/123", "Bearer some-opaque-fhir-access-token") in fhir.seen
    assert any(p.startswith("Coverage?patient=123") for p, _ in fhir.seen)
    (action,) = answer["systemActions"]
    kind = "CommunicationRequest" if name.endswith("3.json") else "Appointment"
    assert action["resource"]["resourceType"] == kind
    (info,) = coverage_infos(action["resource"])
    assert info["coverage"] == [{"reference": "Coverage/cov-demo"}]
    assert info["covered"] == ["conditional"] and info["info-needed"] == ["detail-code"]


def test_every_guide_request_is_answered(client, keys, iss, fhir):
    for path in sorted(CRD.glob("CRDServiceRequest*.json")):
        body = json.loads(path.read_text())
        if "prefetch" not in body:
            body["fhirServer"] = fhir.base
        resp = call(client, keys["rs"], iss, body)
        assert resp.status_code == 200, (path.name, resp.get_json())
        check_structure(resp.get_json())


def test_redirects_and_unlisted_servers_are_never_followed(client, keys, iss, fhir):
    body = load("CRDServiceRequest3.json")
    body["fhirServer"] = f"http://127.0.0.1:{fhir.port}/redirect/fhir"
    assert call(client, keys["rs"], iss, body).status_code == 412
    body["fhirServer"] = fhir.base
    body.pop("fhirAuthorization")
    assert call(client, keys["rs"], iss, body).status_code == 412


# ------------------------------------------------------------------ our own payer


def service_request(rid: str, system: str, code: str, *, when: str = "2026-12-01",
                    display: str | None = None, requester: str = "PractitionerRole/PR1") -> dict:
    coding = {"system": system, "code": code, **({"display": display} if display else {})}
    return {"resourceType": "ServiceRequest", "id": rid, "status": "draft",
            "intent": "original-order", "code": {"coding": [coding]},
            "subject": {"reference": "Patient/123"}, "occurrenceDateTime": when,
            "requester": {"reference": f"http://ehr.example.org/fhir/{requester}"}}


def sign_request(orders: list[dict], *, npi: str = "1003000126", payor: dict | None = None,
                 organizations: list[dict] = ()) -> dict:
    """An order-sign request for our demo payer with full prefetch."""
    patient = {**load("Patient-example.json"), "id": "123"}
    return {
        "hook": "order-sign", "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/P1", "patientId": "123",
                    "draftOrders": {"resourceType": "Bundle", "type": "collection",
                                    "entry": [{"resource": o} for o in orders]}},
        "prefetch": {
            "patient": patient,
            "coverage": {"resourceType": "Bundle", "type": "searchset",
                         "entry": [{"resource": demo_coverage(payor)}]},
            "practitionerRoles": {"resourceType": "Bundle", "type": "searchset", "entry": [
                {"resource": {"resourceType": "PractitionerRole", "id": "PR1",
                              "practitioner": {"reference": "Practitioner/P1"}}}]},
            "practitioners": {"resourceType": "Bundle", "type": "searchset", "entry": [
                {"resource": {"resourceType": "Practitioner", "id": "P1", "identifier": [
                    {"system": "http://hl7.org/fhir/sid/us-npi", "value": npi}]}}]},
            "organizations": {"resourceType": "Bundle", "type": "searchset",
                              "entry": [{"resource": o} for o in organizations]},
        },
    }


HCPCS = "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
CPT = "http://www.ama-assn.org/go/cpt"


def test_three_orders_for_the_demo_payer(client, services, keys, iss):
    body = sign_request([
        service_request("sr-mri", CPT, "72148", display="MRI lumbar spine without contrast"),
        service_request("sr-visit", CPT, "99213"),
        service_request("sr-o2", "https://bluebutton.cms.gov/resources/codesystem/hcpcs",
                        "E0424"),
        service_request("sr-unknown", CPT, "12345"),
    ])
    rid = uuid.uuid4().hex
    resp = call(client, keys["es"], iss, body, **{"X-Request-Id": rid})
    assert resp.status_code == 200, resp.get_json()
    answer = resp.get_json()
    check_structure(answer)
    infos = {a["resource"]["id"]: coverage_infos(a["resource"])[0]
             for a in answer["systemActions"]}
    assert infos["sr-mri"]["pa-needed"] == ["auth-needed"]
    assert infos["sr-mri"]["doc-needed"] == ["clinical"]
    links = [d for d in infos["sr-mri"]["detail"]]
    assert any(e.get("valueUrl", "").endswith("/imaging/mri-lumbar") for d in links for e in d)
    assert infos["sr-visit"]["pa-needed"] == ["no-auth"]
    assert infos["sr-visit"]["covered"] == ["covered"]
    assert infos["sr-o2"]["pa-needed"] == ["auth-needed"]
    # A code no policy names: conditional with a reason, never silence.
    unknown = infos["sr-unknown"]
    assert unknown["covered"] == ["conditional"] and unknown["pa-needed"] == ["conditional"]
    assert unknown["info-needed"] and [c["code"] for r in unknown["reason"]
                                       for c in r["coding"]] == ["no-policy"]
    first = answer["cards"][0]
    assert first["summary"] == "Prior authorization needed: MRI lumbar spine without contrast"
    assert first["indicator"] == "warning" and first["links"][0]["url"].startswith("https://")
    assert "clinical notes" in first["detail"]
    # Each answer is stored as a coverage assertion; the call is audited.
    aid = infos["sr-mri"]["coverage-assertion-id"][0]
    with services.engine.connect() as conn:
        row = conn.execute(sa.select(t.coverage_assertions).where(
            t.coverage_assertions.c.id == aid)).mappings().one()
        audits = conn.execute(sa.select(t.audit_events).where(
            t.audit_events.c.request_id == rid)).mappings().all()
    assert (row["org_id"], row["payer_id"], row["code_system"], row["code"]) == (
        ORG, "demo", "CPT", "72148")
    assert row["ruleset_version"].startswith("demo@")
    assert [(a["role"], a["action"], a["entity_type"], a["outcome"]) for a in audits] == [
        ("cds-client", "order-sign", "cds_hook", "success")]
    assert "Baxter" not in json.dumps([dict(a) for a in audits], default=str)


def test_gold_card_reproduces_the_annotated_example(client, keys, iss):
    example = load("MedicationRequest-annotated-example.json")
    (ex_info,) = coverage_infos(example)
    body = sign_request([service_request("sr-gold", CPT, "72148")], npi="1234567893")
    resp = call(client, keys["rs"], iss, body)
    assert resp.status_code == 200
    (action,) = resp.get_json()["systemActions"]
    (info,) = coverage_infos(action["resource"])
    # The guide's semantics: satisfied + satisfied-pa-id + reason gold-card (CRD code system).
    assert info["pa-needed"] == ex_info["pa-needed"] == ["satisfied"]
    assert info["satisfied-pa-id"] == ["gc-1234567893-2026-01-01"]
    assert ex_info["satisfied-pa-id"]
    ex_reason = ex_info["reason"][0]["coding"][0]
    assert {"system": CRD_TEMP, "code": "gold-card"} in [c for r in info["reason"]
                                                         for c in r["coding"]]
    assert ex_reason == {"system": CRD_TEMP, "code": "gold-card"}
    assert info["expiry-date"] == ["2026-12-31"]
    assert info["covered"] == ex_info["covered"] == ["conditional"]
    card = resp.get_json()["cards"][0]
    assert "gold card" in card["summary"] and card["indicator"] == "info"
    # Outside the card's window the policy's own answer stands (and no satisfied-pa-id).
    body = sign_request([service_request("sr-late", CPT, "72148", when="2027-01-05")],
                        npi="1234567893")
    (action,) = call(client, keys["rs"], iss, body).get_json()["systemActions"]
    (info,) = coverage_infos(action["resource"])
    assert info["pa-needed"] == ["auth-needed"] and "satisfied-pa-id" not in info


@pytest.mark.parametrize("payor,orgs", [
    ({"identifier": {"value": "demo"}}, []),
    ({"reference": "Organization/payer-1"},
     [{"resourceType": "Organization", "id": "payer-1", "name": "Demo  health plan"}]),
    ({"display": "Acme"}, []),
])
def test_payor_matching(client, keys, iss, payor, orgs):
    body = sign_request([service_request("sr", CPT, "72148")], payor=payor, organizations=orgs)
    (action,) = call(client, keys["rs"], iss, body).get_json()["systemActions"]
    (info,) = coverage_infos(action["resource"])
    codes = [c["code"] for r in info["reason"] for c in r["coding"]]
    if payor.get("display") == "Acme":
        assert codes == ["unknown-payer"] and info["covered"] == ["conditional"]
    else:
        assert info["pa-needed"] == ["auth-needed"]


def test_inactive_coverage_is_not_covered(client, keys, iss):
    body = sign_request([service_request("sr", CPT, "72148")])
    cov = body["prefetch"]["coverage"]["entry"][0]["resource"]
    cov["period"] = {"start": "2020-01-01", "end": "2026-06-30"}
    (action,) = call(client, keys["rs"], iss, body).get_json()["systemActions"]
    (info,) = coverage_infos(action["resource"])
    assert info["covered"] == ["not-covered"] and "pa-needed" not in info


def test_no_coverage_found_answers_with_a_card(client, keys, iss):
    body = sign_request([service_request("sr", CPT, "72148")])
    body["prefetch"]["coverage"] = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    resp = call(client, keys["rs"], iss, body)
    assert resp.status_code == 200
    assert resp.get_json()["cards"][0]["summary"].startswith("No active coverage")


# ------------------------------------------------------------------ continuity


def test_an_order_with_the_assertion_id_reuses_it(client, services, keys, iss, tokens):
    body = sign_request([service_request("sr", CPT, "72148")])
    (action,) = call(client, keys["rs"], iss, body).get_json()["systemActions"]
    (info,) = coverage_infos(action["resource"])
    aid = info["coverage-assertion-id"][0]
    order = order_body()
    order["lines"][0]["coverage_assertion_id"] = aid
    resp = client.post("/v1/orders", json=order, headers=auth(
        tokens[ORG]["clinician"], **{"Idempotency-Key": uuid.uuid4().hex}))
    assert resp.status_code == 201, resp.get_json()
    order_id = resp.get_json()["id"]
    assert resp.get_json()["lines"][0]["determination"]["pa_needed"] == "auth-needed"
    view = client.get(f"/v1/orders/{order_id}", headers=auth(tokens[ORG]["clinician"])).get_json()
    events = [e["event"] for e in view["timeline"]]
    assert events[:2] == ["order_received", "coverage_assertion_reused"]

    # The ruleset changed since the assertion: re-evaluated, and the timeline says so.
    with services.engine.begin() as conn:
        conn.execute(t.coverage_assertions.update().where(t.coverage_assertions.c.id == aid)
                     .values(ruleset_version="demo@2020-01-01.1"))
    resp = client.post("/v1/orders", json=order, headers=auth(
        tokens[ORG]["clinician"], **{"Idempotency-Key": uuid.uuid4().hex}))
    view = client.get(f"/v1/orders/{resp.get_json()['id']}",
                      headers=auth(tokens[ORG]["clinician"])).get_json()
    (event,) = [e for e in view["timeline"] if e["event"].startswith("coverage_assertion")]
    assert event["event"] == "coverage_assertion_reevaluated"

    # Another organization's assertion id is not reused.
    resp = client.post("/v1/orders", json=order, headers=auth(
        tokens["org-b"]["clinician"], **{"Idempotency-Key": uuid.uuid4().hex}))
    view = client.get(f"/v1/orders/{resp.get_json()['id']}",
                      headers=auth(tokens["org-b"]["clinician"])).get_json()
    assert "coverage_assertion_not_applicable" in [e["event"] for e in view["timeline"]]


def test_a_reused_assertion_keeps_its_gold_card(client, keys, iss, tokens):
    body = sign_request([service_request("sr", CPT, "72148")], npi="1234567893")
    (action,) = call(client, keys["rs"], iss, body).get_json()["systemActions"]
    aid = coverage_infos(action["resource"])[0]["coverage-assertion-id"][0]
    order = order_body()
    order["lines"][0]["coverage_assertion_id"] = aid  # requester 1003000126: no card itself
    resp = client.post("/v1/orders", json=order, headers=auth(
        tokens[ORG]["clinician"], **{"Idempotency-Key": uuid.uuid4().hex}))
    det = resp.get_json()["lines"][0]["determination"]
    assert det["pa_needed"] == "satisfied"
    assert det["satisfied_pa_id"] == "gc-1234567893-2026-01-01"


# ------------------------------------------------------------------ bad requests


@pytest.mark.parametrize("mutate", [
    lambda b: b.pop("hook"),
    lambda b: b.pop("hookInstance"),
    lambda b: b.__setitem__("context", []),
    lambda b: b.__setitem__("hook", "order-select"),
    lambda b: b.__setitem__("prefetch", "nope"),
])
def test_not_a_cds_hooks_request_is_400(client, keys, iss, mutate):
    body = load("CRDServiceRequest.json")
    mutate(body)
    resp = call(client, keys["rs"], iss, body, service="order-sign")
    assert resp.status_code == 400
    assert resp.mimetype == "application/problem+json"


def test_non_object_and_non_json_bodies_are_400(client, keys, iss):
    headers = {"Authorization": f"Bearer {keys['rs'].token(iss)}"}
    assert client.post("/cds-services/order-sign", json=[1], headers=headers).status_code == 400
    headers = {"Authorization": f"Bearer {keys['rs'].token(iss)}"}
    resp = client.post("/cds-services/order-sign", data=b"{nope",
                       content_type="application/json", headers=headers)
    assert resp.status_code == 400


def test_unknown_service_is_404(client, keys, iss):
    resp = call(client, keys["rs"], iss, load("CRDServiceRequest.json"), service="nope")
    assert resp.status_code == 404


def test_lenient_with_elements_the_service_does_not_need(client, keys, iss):
    body = sign_request([service_request("sr", CPT, "72148")])
    junk = [
        None, 7, "x", {"resourceType": 5}, {"resourceType": "ServiceRequest"},
        {"resourceType": "ServiceRequest", "id": "j1", "code": "not-a-concept",
         "occurrenceDateTime": "someday", "requester": "Practitioner/1",
         "quantityQuantity": {"value": "many"}, "reasonCode": [None, {"coding": "x"}]},
        {"resourceType": "DeviceRequest", "id": "j2", "codeReference": {"reference": 3}},
        {"resourceType": "MedicationRequest", "id": "j3", "medicationReference": {
            "reference": "#missing"}, "dosageInstruction": [None, {"timing": 1}]},
        {"resourceType": "ServiceRequest", "id": "j4", "code": {"coding": [
            {"system": CPT, "code": "7214"}, {"system": CPT, "code": "72148x"},
            {"system": CPT, "code": None}, None]}},
    ]
    body["context"]["draftOrders"]["entry"] += [{"resource": j} for j in junk] + [None, 5]
    body["context"]["userId"] = {"odd": True}
    body["prefetch"]["patient"]["birthDate"] = "1984"
    body["prefetch"]["extra"] = [1, 2]
    body["prefetch"]["coverage"]["entry"][0]["resource"]["payor"].append("garbage")
    body["extension"] = {"davinci-crd.configuration": {"max-cards": "lots"}}
    resp = call(client, keys["rs"], iss, body)
    assert resp.status_code == 200, resp.get_json()
    check_structure(resp.get_json(), only={"sr"})
    ids = [a["resource"]["id"] for a in resp.get_json()["systemActions"]]
    assert ids == ["sr", "j1", "j2", "j3", "j4"]  # an order without an id cannot be updated


# ------------------------------------------------------------------ JWT


def test_es384_and_jwks_url_clients(client, services, keys, fhir):
    remote_iss = register(services, jwks_url=f"http://127.0.0.1:{fhir.port}/jwks.json",
                          servers=[fhir.base])
    body = sign_request([service_request("sr", CPT, "72148")])
    assert call(client, keys["rs"], remote_iss, body).status_code == 200
    assert call(client, keys["es"], remote_iss, body).status_code == 401  # not in its JWKS


def _hs256_with_public_key(signer: Signer, iss: str) -> str:
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": signer.kid}).encode())
    claims = b64(json.dumps({"iss": iss, "sub": "x", "aud": f"{PUBLIC}/cds-services/order-sign",
                             "exp": now + 60, "jti": uuid.uuid4().hex}).encode())
    sig = hmac.new(signer.public_pem(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(sig)}"


def _alg_none(iss: str) -> str:
    now = int(time.time())
    return jwt.encode({"iss": iss, "sub": "x", "aud": f"{PUBLIC}/cds-services/order-sign",
                       "exp": now + 60, "jti": uuid.uuid4().hex}, None, algorithm="none")


def test_jwt_failures_are_401(client, services, keys, iss):
    body = sign_request([service_request("sr", CPT, "72148")])
    rs, other = keys["rs"], keys["other"]
    replayed = rs.token(iss)
    now = int(time.time())
    cases = {
        "bad_signature": Signer("RS384", kid=rs.kid).token(iss),
        "other_key": other.token(iss),
        "wrong_audience": rs.token(iss, aud=f"{PUBLIC}/cds-services/order-select"),
        "other_host": rs.token(iss, aud="https://elsewhere.example/cds-services/order-sign"),
        "expired": rs.token(iss, iat=now - 900, exp=now - 600),
        "exp_too_far": rs.token(iss, exp=now + 3600),
        "exp_absurd": rs.token(iss, exp=10**20),
        "exp_not_a_number": rs.token(iss, exp="soon"),
        "aud_missing": rs.token(iss, aud=None),
        "future_iat": rs.token(iss, iat=now + 3600),
        "unknown_issuer": rs.token("https://stranger.example.org"),
        "alg_none": _alg_none(iss),
        "hs256_public_key": _hs256_with_public_key(rs, iss),
        "no_jti": rs.token(iss, jti=None),
        "no_sub": rs.token(iss, sub=None),
        "garbage": "not.a.jwt",
        "missing": None,
    }
    first = client.post("/cds-services/order-sign", json=body,
                        headers={"Authorization": f"Bearer {replayed}"})
    assert first.status_code == 200
    cases["replayed_jti"] = replayed
    for name, token in cases.items():
        rid = uuid.uuid4().hex
        headers = {"X-Request-Id": rid}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        resp = client.post("/cds-services/order-sign", json=copy.deepcopy(body), headers=headers)
        assert resp.status_code == 401, (name, resp.get_json())
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        with services.engine.connect() as conn:
            audits = conn.execute(sa.select(t.audit_events).where(
                t.audit_events.c.request_id == rid)).mappings().all()
        assert [a["outcome"] for a in audits] == ["denied"], name


def test_a_refused_call_spends_its_jti_and_a_replay_calls_no_one(client, keys, iss, fhir):
    body = load("CRDServiceRequest3.json")  # no prefetch, example.org: 412
    token = keys["rs"].token(iss)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post("/cds-services/order-sign", json=body, headers=headers).status_code == 412
    body["fhirServer"] = fhir.base
    assert client.post("/cds-services/order-sign", json=body, headers=headers).status_code == 401
    token = keys["rs"].token(iss)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post("/cds-services/order-sign", json=body, headers=headers).status_code == 200
    fhir.seen.clear()
    assert client.post("/cds-services/order-sign", json=body, headers=headers).status_code == 401
    assert fhir.seen == []  # the replay was refused before the EHR's server was called


def test_cds_clients_add_command(services, settings, keys, tmp_path):
    import subprocess
    import sys

    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [keys["es"].jwk]}))
    iss = f"https://cli-{uuid.uuid4().hex[:6]}.example.org"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "authsvc.cli", "cds-clients", "add",
                               *args, "--database-url", settings.database_url],
                              capture_output=True, text=True)

    done = cli("--org", ORG, "--iss", iss, "--jwks-file", str(jwks),
               "--fhir-server", "https://ehr.example.org/fhir/")
    assert done.returncode == 0, done.stderr
    client_id = done.stdout.strip()
    with services.engine.connect() as conn:
        row = conn.execute(sa.select(t.cds_clients).where(
            t.cds_clients.c.id == client_id)).mappings().one()
    assert (row["org_id"], row["iss"], row["fhir_servers"]) == (
        ORG, iss, ["https://ehr.example.org/fhir"])
    assert cli("--org", ORG, "--iss", iss, "--jwks-file", str(jwks)).returncode == 1  # dup
    private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(keys["es"].private))
    jwks.write_text(json.dumps({"keys": [private]}))
    refused = cli("--org", ORG, "--iss", iss + "x", "--jwks-file", str(jwks))
    assert refused.returncode == 1 and "private" in refused.stderr
    assert cli("--org", ORG, "--iss", iss + "y", "--jwks-url", "ftp://x").returncode == 1


def _fuzz_bodies():
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.sampled_from(
        ["ServiceRequest", "Coverage", "Patient", "Bundle", "Organization/x", "72148", CPT,
         "2026-12-01", "#x", "Practitioner/P1", "http://hl7.org/fhir/sid/us-npi"])
    keys = st.sampled_from(["resourceType", "id", "entry", "resource", "code", "coding",
                            "system", "display", "payor", "reference", "identifier", "value",
                            "requester", "occurrenceDateTime", "extension", "url", "status",
                            "period", "start", "end", "birthDate", "contained", "name"])
    tree = st.recursive(leaves, lambda kids: st.lists(kids, max_size=4)
                        | st.dictionaries(keys, kids, max_size=5), max_leaves=25)
    return st.fixed_dictionaries({
        "hook": st.just("order-sign"), "hookInstance": st.just("fuzz"),
        "context": st.fixed_dictionaries({"patientId": tree, "draftOrders": tree,
                                          "userId": tree}),
        "prefetch": st.fixed_dictionaries({"coverage": tree, "patient": tree,
                                           "practitioners": tree}),
    })


def test_never_a_500(client, keys, iss):
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(_fuzz_bodies())
    def run(body):
        resp = call(client, keys["rs"], iss, body)
        assert resp.status_code in (200, 400, 412), resp.get_json()

    run()


def test_a_malformed_body_spends_the_jti(client, keys, iss):
    headers = {"Authorization": f"Bearer {keys['rs'].token(iss)}"}
    resp = client.post("/cds-services/order-sign", data=b"{nope",
                       content_type="application/json", headers=headers)
    assert resp.status_code == 400
    body = sign_request([service_request("sr", CPT, "72148")])
    assert client.post("/cds-services/order-sign", json=body, headers=headers).status_code == 401
