"""B1–B13 of reliability.md §3.3: every hostile body answers 4xx problem+json naming the field,
never a 500, never echoes PHI, and writes nothing."""

from __future__ import annotations

import json
import threading
import uuid

import pytest

from authsvc.adapters.db import tables as t
from tests.conftest import auth, order_body
from tests.security.conftest import assert_problem, audit_rows, canary_body, count

pytestmark = pytest.mark.integration


@pytest.fixture()
def clin(tokens) -> str:
    return tokens["org-a"]["clinician"]


def post_raw(client, token, data: bytes, ctype: str = "application/json", **headers):
    h = auth(token, **{"Idempotency-Key": uuid.uuid4().hex, **headers})
    return client.post("/v1/orders", data=data, content_type=ctype, headers=h)


def post(client, token, body, **headers):
    h = auth(token, **{"Idempotency-Key": uuid.uuid4().hex, **headers})
    return client.post("/v1/orders", json=body, headers=h)


def errors_of(resp) -> set[tuple[str, str]]:
    return {(e["field"], e["code"]) for e in assert_problem(resp, 422)["errors"]}


@pytest.fixture()
def no_writes(services):
    """Asserts the test wrote no order, patient or outbox row."""
    tables = (t.orders, t.patients, t.outbox)
    before = [count(services, x) for x in tables]
    yield
    assert [count(services, x) for x in tables] == before


@pytest.mark.parametrize("data", [b"{bad", b"", b"null", b"[]", b'"text"', b"{\"a\": 1"])
def test_B1_malformed_json_is_400_and_audited_as_error(client, clin, services, no_writes, data):
    rid = uuid.uuid4().hex
    resp = post_raw(client, clin, data, **{"X-Request-Id": rid})
    body = assert_problem(resp, 400)
    assert "bad" not in body["detail"] or data != b"{bad"
    rows = audit_rows(services, rid)
    assert rows and rows[-1]["outcome"] == "error" and rows[-1]["reason"] == "http_400"


def test_B2_wrong_content_types_are_415(client, clin, no_writes):
    valid = json.dumps(canary_body()).encode()
    assert_problem(post_raw(client, clin, valid, "text/plain"), 415)
    assert_problem(post_raw(client, clin, valid, "application/x-www-form-urlencoded"), 415)
    resp = client.post("/v1/orders", data={"x": "1"}, content_type="multipart/form-data",
                       headers=auth(clin, **{"Idempotency-Key": uuid.uuid4().hex}))
    assert_problem(resp, 415)
    resp = client.post("/v1/payer-callbacks/demo", data=b"{}", content_type="text/plain")
    assert_problem(resp, 415)


def test_B2_json_on_the_attachments_route_is_415(app, client, tokens, org_objects):
    case_id = org_objects["org-a"]["case_id"]
    resp = client.post(f"/v1/cases/{case_id}/attachments", json={"file": "x"},
                       headers=auth(tokens["org-a"]["coordinator"]))
    assert_problem(resp, 415)


@pytest.mark.parametrize(("mutate", "field", "code"), [
    (lambda b: b["requester"].update(npi=1234567893), "requester.npi", "invalid_type"),
    (lambda b: b["patient"].update(birth_date=19010203), "patient.birth_date", "invalid_type"),
    (lambda b: b["patient"].update(birth_date="19010203"), "patient.birth_date", "invalid_format"),
    (lambda b: b.update(diagnoses="J45.50"), "diagnoses", "invalid_type"),
    (lambda b: b["lines"][0].update(quantity="1"), "lines[0].quantity", "invalid_type"),
    (lambda b: b["lines"][0].update(quantity=True), "lines[0].quantity", "invalid_type"),
    (lambda b: b["lines"][0].update(quantity=1.5), "lines[0].quantity", "invalid_type"),
    (lambda b: b.update(urgency=None), "urgency", "required"),
    (lambda b: b.update(patient=None), "patient", "required"),
    (lambda b: b.update(lines="x"), "lines", "invalid_type"),
])
def test_B3_wrong_types_are_422_naming_the_field(client, clin, no_writes, mutate, field, code):
    body = canary_body()
    mutate(body)
    errors = errors_of(post(client, clin, body))
    fields = {f for f, _ in errors}
    assert field in fields, errors
    if code == "required":  # a null required field: `required` or `invalid_type`
        assert (field, "required") in errors or (field, "invalid_type") in errors
    else:
        assert (field, code) in errors


def test_B4_huge_bodies_and_collections(client, clin, no_writes):
    assert_problem(post_raw(client, clin, b'{"notes": "' + b"a" * (10 * 1024 * 1024) + b'"}'), 413)
    assert_problem(post_raw(client, clin, b'{"notes": "' + b"a" * (1024 * 1024) + b'"}'), 413)
    many = canary_body(diagnoses=["J45.50"] * 10_000)
    resp = post_raw(client, clin, json.dumps(many).encode())
    assert_problem(resp, (413, 422))
    assert ("diagnoses", "too_many") in errors_of(post(client, clin, canary_body(
        diagnoses=["J45.50"] * 13)))
    lines = [dict(canary_body()["lines"][0], sequence=i) for i in range(1, 52)]
    assert ("lines", "too_many") in errors_of(post(client, clin, canary_body(lines=lines)))
    assert ("notes", "out_of_range") in errors_of(post(client, clin, canary_body(
        notes="n" * 100_000)))
    assert ("patient.given_name", "out_of_range") in errors_of(post(client, clin, canary_body(
        patient=dict(canary_body()["patient"], given_name="Z" * 5000))))


def test_B4_thousand_deep_query_string_is_never_a_500(client, clin):
    deep = "a" + "[b]" * 1000
    resp = client.get(f"/v1/orders?{deep}=1&status=" + "x" * 5000, headers=auth(clin))
    assert_problem(resp, 422)
    resp = client.get("/v1/orders?" + "&".join(f"k{i}=v" for i in range(1000)), headers=auth(clin))
    assert resp.status_code == 200


def test_B5_deep_nesting_is_400(client, clin, no_writes):
    assert_problem(post_raw(client, clin, b"[" * 100_000 + b"]" * 100_000), 400)
    assert_problem(post_raw(client, clin, b'{"a":' * 40_000 + b"1" + b"}" * 40_000), 400)
    assert_problem(post_raw(client, clin, b'{"a":' + b"[" * 33 + b"]" * 33 + b"}"), 400)


@pytest.mark.parametrize("data", [
    b'{"lines": [{"quantity": NaN}]}', b'{"q": Infinity}', b'{"q": -Infinity}',
    b'{"q": ' + b"9" * 5000 + b"}", b'{"org_id": "A", "org_id": "B"}',
    b'{"notes": "\\u0000"}', b'{"notes": "\\ud800"}', b'{"notes": "\\udfff x"}',
    b'{"q": 1e999}', b'{"notes": "\xff\xfe"}',
])
def test_B6_json_edge_values_are_400(client, clin, no_writes, data):
    assert_problem(post_raw(client, clin, data), 400)


@pytest.mark.parametrize("url", ["/v1/orders/ord_%00", "/v1/orders?mrn=%00",
                                 "/v1/orders?status=x&%00=1", "/v1/audit?patient_mrn=a%00b"])
def test_B6_nul_in_the_url_is_400(client, tokens, url):
    assert_problem(client.get(url, headers=auth(tokens["org-a"]["admin"])), 400)


def test_B7_unknown_and_not_billable_icd10cm(client, clin, no_writes):
    assert ("diagnoses[0]", "unknown_code") in errors_of(post(client, clin, canary_body(
        diagnoses=["Q99.99"])))
    assert ("diagnoses[0]", "not_billable") in errors_of(post(client, clin, canary_body(
        diagnoses=["E11"])))


def test_B7_icd10cm_retired_before_the_date_of_service(client, clin):
    import datetime as dt

    from authsvc.adapters import codesets

    current = codesets.table_for(None)
    codesets.register_table(codesets.table_from_codes(
        (c for c in current.codes if c != "J4550"), version="icd10cm@2098-10-01",
        effective=dt.date(2098, 10, 1)))
    try:
        body = canary_body()
        body["lines"][0].update(service_start="2098-10-02", service_end="2098-10-30")
        assert ("diagnoses[0]", "unknown_code") in errors_of(post(client, clin, body))
    finally:
        codesets.reset_tables()


@pytest.mark.parametrize(("system", "code"), [("CPT", "99999"), ("HCPCS", "A9999")])
def test_B7_cpt_and_hcpcs_are_format_checked_only(client, clin, system, code):
    body = order_body()
    body["lines"][0].update(code_system=system, code=code)
    resp = post(client, clin, body)
    assert resp.status_code == 201, resp.get_json()
    det = resp.get_json()["lines"][0]["determination"]
    assert det["pa_needed"] == "conditional"


@pytest.mark.parametrize(("npi", "code"), [
    ("1234567890", "invalid_check_digit"), ("0234567893", "invalid_format"),
    ("123456789", "invalid_format"), ("12345678930", "invalid_format"),
    ("١٢٣٤٥٦٧٨٩٣", "invalid_format"), ("1234567893\n", "invalid_format"),
    (" 1234567893", "invalid_format"), ("１２３４５６７８９３", "invalid_format"),
])
def test_B8_invalid_npis_rejected(client, clin, no_writes, npi, code):
    body = canary_body()
    body["requester"]["npi"] = npi
    assert ("requester.npi", code) in errors_of(post(client, clin, body))


def test_B8_npi_arabic_digits_rejected(client, clin, no_writes):
    body = canary_body()
    body["performer"]["npi"] = "١٢٣٤٥٦٧٨٩٣"
    assert ("performer.npi", "invalid_format") in errors_of(post(client, clin, body))


def test_B8_only_the_valid_npi_is_accepted(client, clin):
    body = order_body()
    body["requester"]["npi"] = "1234567893"
    assert post(client, clin, body).status_code == 201


@pytest.mark.parametrize(("where", "value"), [
    ("dx", "e11.9"), ("dx", "E1.19"), ("dx", "E11."), ("dx", "11.9"), ("dx", "S52.131AB"),
    ("dx", "J06.9 "), ("dx", "E119"),
    ("CPT", "9921"), ("CPT", "992133"), ("CPT", "99213-25"),
    ("HCPCS", "W1234"), ("HCPCS", "A04281"), ("HCPCS", "a0428"),
])
def test_B9_bad_code_formats_are_invalid_format(client, clin, no_writes, where, value):
    body = canary_body()
    if where == "dx":
        body["diagnoses"] = [value]
        field = "diagnoses[0]"
    else:
        body["lines"][0].update(code_system=where, code=value)
        field = "lines[0].code"
    assert (field, "invalid_format") in errors_of(post(client, clin, body))


INJECTIONS = ["' OR 1=1--", '"; DROP TABLE orders;--', "{{7*7}}", "${jndi:ldap://127.0.0.1/x}",
              "<script>alert(1)</script>", "%0d%0a", "../../etc/passwd"]


def test_B10_injection_strings_are_stored_literally(client, clin, services):
    body = order_body()
    body["patient"]["given_name"] = INJECTIONS[0]
    body["patient"]["family_name"] = INJECTIONS[1]
    body["notes"] = "\n".join(INJECTIONS)
    body["external_id"] = "{{7*7}}"
    resp = post(client, clin, body)
    assert resp.status_code == 201, resp.get_json()
    import sqlalchemy as sa

    with services.engine.connect() as conn:
        row = conn.execute(sa.select(t.orders.c.notes, t.orders.c.external_id).where(
            t.orders.c.id == resp.get_json()["id"])).one()
    assert row.notes == "\n".join(INJECTIONS) and row.external_id == "{{7*7}}"
    assert count(services, t.orders) > 0  # the table is still there


def test_B10_crlf_in_single_line_fields_and_headers_is_rejected(client, clin, no_writes):
    body = canary_body()
    body["patient"]["given_name"] = "ZZCANARY\r\nX-Injected: 1"
    assert ("patient.given_name", "invalid_format") in errors_of(post(client, clin, body))
    for header in ("Idempotency-Key", "X-Request-Id"):
        environ = {"HTTP_" + header.upper().replace("-", "_"): "abc\r\nX-Injected: 1"}
        resp = client.post("/v1/orders", json=canary_body(), headers=auth(clin),
                           environ_overrides=environ)
        assert_problem(resp, 400)
        assert "X-Injected" not in resp.headers


def test_B10_injection_in_idempotency_key_and_request_id_headers(client, clin):
    resp = post(client, clin, order_body(), **{"Idempotency-Key": "'OR'1'='1--%0d%0a{{7*7}}${x}"})
    assert resp.status_code == 201
    assert_problem(post(client, clin, order_body(), **{"Idempotency-Key": "' OR 1=1--"}), 400)
    resp = client.get("/v1/orders", headers=auth(clin, **{"X-Request-Id": "' OR 1=1--"}))
    assert_problem(resp, 400)


def test_B10_log_lines_are_not_split():
    import logging

    from authsvc.logs import JsonFormatter

    record = logging.LogRecord("t", logging.INFO, __file__, 1, "value %s",
                               ("a\r\nX-Injected: 1\n{\"level\": \"error\"}",), None)
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\r" not in line
    assert json.loads(line)["level"] == "info"


def test_B11_unicode_names_are_nfc_with_bidi_controls_stripped(client, clin, services):
    import sqlalchemy as sa

    body = order_body()
    body["patient"]["mrn"] = "MRN-UNI-" + uuid.uuid4().hex[:8]
    body["patient"]["given_name"] = "Jose\u0301\u202e"  # NFD é plus RTL override
    body["patient"]["family_name"] = "王\u200d😀"
    resp = post(client, clin, body)
    assert resp.status_code == 201, resp.get_json()
    with services.engine.connect() as conn:
        row = conn.execute(sa.select(t.patients.c.given_name, t.patients.c.family_name).where(
            t.patients.c.mrn == body["patient"]["mrn"])).one()
    assert row.given_name == "José" and row.family_name == "王\u200d😀"


def test_B11_combining_marks_and_homoglyph_codes(client, clin, no_writes):
    body = canary_body()
    body["patient"]["given_name"] = "a" + "\u0301" * 1000
    assert ("patient.given_name", "out_of_range") in errors_of(post(client, clin, body))
    body = canary_body(diagnoses=["\u041511.9"])  # Cyrillic Е
    assert ("diagnoses[0]", "invalid_format") in errors_of(post(client, clin, body))


def test_B12_mass_assignment_fields_are_refused(client, clin, no_writes, tokens, org_objects):
    body = canary_body(status="approved", org_id="org-b", created_by="x", payer_ref="p",
                       id="ord_x")
    errors = errors_of(post(client, clin, body))
    assert {(f, "unknown_field") for f in ("status", "org_id", "created_by", "payer_ref",
                                            "id")} <= errors


def test_B12_mass_assignment_on_case_assign(app, client, tokens, org_objects):
    resp = client.post(f"/v1/cases/{org_objects['org-a']['case_id']}/assign",
                       json={"assignee": "Pat", "org_id": "org-b"},
                       headers=auth(tokens["org-a"]["coordinator"]))
    assert ("org_id", "unknown_field") in errors_of(resp)


def test_B13_idempotency_key_misuse(client, clin, services):
    before = count(services, t.orders)
    resp = client.post("/v1/orders", json=order_body(), headers=auth(clin))
    assert_problem(resp, 400)
    assert_problem(post(client, clin, order_body(), **{"Idempotency-Key": "k" * 256}), 400)
    key = uuid.uuid4().hex
    assert post(client, clin, order_body(), **{"Idempotency-Key": key}).status_code == 201
    resp = post(client, clin, order_body(external_id="OTHER"), **{"Idempotency-Key": key})
    assert_problem(resp, 422)
    assert count(services, t.orders) == before + 1


def test_B13_two_concurrent_identical_requests_make_one_order(app, clin, services):
    key = uuid.uuid4().hex
    barrier = threading.Barrier(2)
    statuses: list[int] = []
    ids: list[str] = []

    def go() -> None:
        c = app.test_client()
        barrier.wait()
        r = c.post("/v1/orders", json=order_body(), headers=auth(
            clin, **{"Idempotency-Key": key}))
        statuses.append(r.status_code)
        if r.status_code == 201:
            ids.append(r.get_json()["id"])

    threads = [threading.Thread(target=go) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(statuses) in ([201, 201], [201, 409])
    assert len(set(ids)) == 1
    import sqlalchemy as sa

    with services.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(t.idempotency_keys).where(
            t.idempotency_keys.c.key == key)).scalar()
    assert n == 1


def test_B13_same_key_on_another_route_template_is_its_own_scope(app, client, tokens):
    key = uuid.uuid4().hex
    assert post(client, tokens["org-a"]["admin"], order_body(),
                **{"Idempotency-Key": key}).status_code == 201
    from authsvc.adapters import ssrf

    public = {"hooks.billing.test": ["93.184.216.34"]}  # the SSRF guard's resolver seam
    with ssrf.use_resolver(lambda host, port: public[host]):
        resp = client.post("/v1/subscriptions", json={
            "url": "https://hooks.billing.test/authsvc", "events": ["outcome.created"]},
            headers=auth(tokens["org-a"]["admin"], **{"Idempotency-Key": key}))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert "Idempotent-Replayed" not in resp.headers
