"""What the security review of the dashboard found, each as what a user or an attacker would
see: forged page links, extreme dates, odd digits, NUL characters, tampered documents, the
audit of each page, unauthenticated form posts, file names, the language link and HSTS."""

from __future__ import annotations

import base64

import pytest

from tests.browser.dash import csrf_of, seed_case, sign_in
from tests.security.conftest import fresh_addr

pytestmark = pytest.mark.integration


@pytest.fixture()
def coordinator(app, tokens):
    client = app.test_client()
    resp = sign_in(client, tokens["org-a"]["coordinator"],
                   environ_base={"REMOTE_ADDR": fresh_addr()})
    assert resp.status_code == 303
    return client


def _csrf(client, path: str = "/app/") -> str:  # type: ignore[no-untyped-def]
    return csrf_of(client.get(path).get_data(as_text=True))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# ------------------------------------------------------------------ forged page links


@pytest.mark.parametrize("cursor", [
    _b64(b'{"d":null,"id":"a\\u0000b"}'),  # a NUL PostgreSQL refuses
    _b64(b"[" * 1200),  # nesting deep enough for a RecursionError
    "A" * 5000,
])
def test_a_forged_page_link_shows_the_first_page_with_a_message(coordinator, cursor):
    resp = coordinator.get(f"/app/?cursor={cursor}")
    assert resp.status_code == 200
    assert "That page link is no longer valid" in resp.get_data(as_text=True)


# ------------------------------------------------------------------ extreme report dates


@pytest.mark.parametrize(("query", "field"), [
    ("to=0001-01-05", "To (YYYY-MM-DD)"),
    ("from=0001-01-01&to=0001-01-02", "From (YYYY-MM-DD)"),
    ("to=9999-12-31", "To (YYYY-MM-DD)")])
def test_report_dates_out_of_range_are_a_400_page_naming_the_field(coordinator, query, field):
    for path in ("/app/metrics", "/app/metrics.csv"):
        resp = coordinator.get(f"{path}?{query}")
        assert resp.status_code == 400, (path, resp.status_code)
        text = resp.get_data(as_text=True)
        assert f"{field}: use a date from 2000-01-01 to 2199-12-31" in text


# ------------------------------------------------------------------ digits (§1.9)


@pytest.mark.parametrize("quantity", ["\u00b2", "\u0661", "\uff11", "1 2", "0", "1000"])
def test_an_authorized_quantity_takes_ascii_digits_only(coordinator, services, tokens,
                                                         quantity):
    _, case_id = seed_case(coordinator, services, tokens["org-a"]["clinician"], "org-a")
    resp = coordinator.post(f"/app/cases/{case_id}/decision", data={
        "csrf_token": _csrf(coordinator), "received_via": "phone", "outcome_1": "modified",
        "quantity_1": quantity})
    assert resp.status_code == 422
    assert "Authorized quantity: a whole number from 1 to 999" in resp.get_data(as_text=True)
    page = coordinator.get(f"/app/cases/{case_id}").get_data(as_text=True)
    assert 'id="case-state">Pended<' in page  # nothing recorded


def test_an_outcome_field_numbered_in_other_digits_is_not_a_line(coordinator, services,
                                                                 tokens):
    _, case_id = seed_case(coordinator, services, tokens["org-a"]["clinician"], "org-a")
    resp = coordinator.post(f"/app/cases/{case_id}/decision", data={
        "csrf_token": _csrf(coordinator), "received_via": "phone",
        "outcome_\u0661": "approved"})
    assert resp.status_code == 422 and "Outcome: required" in resp.get_data(as_text=True)


# ------------------------------------------------------------------ documents and audit


def _audit_rows(services, request_id: str) -> list[dict]:  # type: ignore[no-untyped-def]
    import sqlalchemy as sa

    from authsvc.adapters.db import tables as t

    with services.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(t.audit_events).where(
            t.audit_events.c.request_id == request_id).order_by(
            t.audit_events.c.id)).mappings()]


@pytest.fixture()
def folder_app(settings, services, tmp_path):
    """The app with AUTHSVC_ATTACHMENTS_DIR set: documents are files, checked on reading."""
    import dataclasses

    from authsvc.api import create_app

    folder = tmp_path / "attachments"
    s2 = dataclasses.replace(settings, attachments_dir=folder)
    svc2 = dataclasses.replace(services, settings=s2)
    return create_app(s2, svc2), folder


def test_dashboard_documents_go_to_the_folder_and_a_tampered_file_is_never_served(
        folder_app, services, tokens):
    import hashlib
    import io
    import uuid

    import sqlalchemy as sa

    from authsvc.adapters.db import tables as t

    app, folder = folder_app
    client = app.test_client()
    order_id, case_id = seed_case(client, services, tokens["org-a"]["clinician"], "org-a")
    sign_in(client, tokens["org-a"]["coordinator"], environ_base={"REMOTE_ADDR": fresh_addr()})
    pdf = b"%PDF-1.4\n%dashboard\n" + uuid.uuid4().hex.encode()
    resp = client.post(f"/app/cases/{case_id}/attachments", data={
        "csrf_token": _csrf(client, f"/app/cases/{case_id}"),
        "file": (io.BytesIO(pdf), "letter.pdf")}, content_type="multipart/form-data")
    assert resp.status_code == 303
    with services.engine.connect() as conn:
        row = conn.execute(sa.select(t.attachments).where(
            t.attachments.c.case_id == case_id)).mappings().one()
        patient = conn.execute(sa.select(t.orders.c.patient_id).where(
            t.orders.c.id == order_id)).scalar()
    # stored like the API stores it: a file in the folder, no bytes in the row
    assert row["data"] is None and row["storage_path"]
    path = folder / row["storage_path"]  # relative to the attachments folder
    assert path.read_bytes() == pdf
    url = f"/app/cases/{case_id}/attachments/{row['id']}"
    rid = uuid.uuid4().hex
    ok = client.get(url, headers={"X-Request-Id": rid})
    assert ok.status_code == 200 and ok.data == pdf
    assert ok.headers["X-Attachment-Sha256"] == hashlib.sha256(pdf).hexdigest()
    # the read is audited with the patient, as the case page's reads are
    assert [(r["action"], r["entity_type"], r["entity_id"], r["patient_id"], r["outcome"])
            for r in _audit_rows(services, rid)] == [
        ("read", "attachment", row["id"], patient, "success")]
    # altered on disk: a clear 503 page, never the altered bytes
    path.write_bytes(b"%PDF-1.4\n%TAMPERED")
    bad = client.get(url)
    assert bad.status_code == 503 and b"TAMPERED" not in bad.data
    assert "cannot be read or no longer matches" in bad.get_data(as_text=True)
    assert bad.headers["Retry-After"] == "60"
    path.unlink()  # gone: the same page, not a 500
    gone = client.get(url)
    assert gone.status_code == 503
    assert "cannot be read or no longer matches" in gone.get_data(as_text=True)


def test_a_refused_upload_leaves_no_file_behind(folder_app, services, tokens):
    import io
    import uuid

    app, folder = folder_app
    client = app.test_client()
    _, case_id = seed_case(client, services, tokens["org-a"]["clinician"], "org-a",
                           state="approved")
    sign_in(client, tokens["org-a"]["coordinator"], environ_base={"REMOTE_ADDR": fresh_addr()})
    resp = client.post(f"/app/cases/{case_id}/attachments", data={
        "csrf_token": _csrf(client), "file": (io.BytesIO(b"%PDF-1.4\n" + uuid.uuid4().bytes),
                                              "late.pdf")}, content_type="multipart/form-data")
    assert resp.status_code == 409
    assert not [p for p in folder.rglob("*") if p.is_file()]


def test_a_full_disk_is_a_503_page_and_nothing_is_kept(folder_app, services, tokens,
                                                      monkeypatch):
    import errno
    import io
    import uuid

    from authsvc.adapters import attachment_files

    app, folder = folder_app
    client = app.test_client()
    _, case_id = seed_case(client, services, tokens["org-a"]["clinician"], "org-a")
    sign_in(client, tokens["org-a"]["coordinator"], environ_base={"REMOTE_ADDR": fresh_addr()})
    real_put = attachment_files.put
    written = []

    def put_then_disk_full(*args, **kwargs):
        written.append(real_put(*args, **kwargs))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(attachment_files, "put", put_then_disk_full)
    resp = client.post(f"/app/cases/{case_id}/attachments", data={
        "csrf_token": _csrf(client), "file": (io.BytesIO(b"%PDF-1.4\n" + uuid.uuid4().bytes),
                                              "scan.pdf")}, content_type="multipart/form-data")
    assert resp.status_code == 503 and int(resp.headers["Retry-After"]) > 0
    assert "The document store is full" in resp.get_data(as_text=True)
    assert written and not [p for p in folder.rglob("*") if p.is_file()]


def test_the_worklist_is_audited_as_a_case_search(coordinator, services):
    import uuid

    rid = uuid.uuid4().hex
    assert coordinator.get("/app/?state=pended", headers={"X-Request-Id": rid}).status_code == 200
    assert [(r["action"], r["entity_type"], r["outcome"])
            for r in _audit_rows(services, rid)] == [("search", "case", "success")]


def test_every_dashboard_page_and_form_has_its_audit_kind(app):
    from authsvc.api.dashboard import AUDIT_KIND

    dash = app.extensions["authsvc_dashboard"]
    endpoints = {rule.endpoint for rule in dash.url_map.iter_rules()
                 if rule.endpoint.startswith("dashboard.")}
    assert endpoints and endpoints <= set(AUDIT_KIND), endpoints - set(AUDIT_KIND)
    assert set(AUDIT_KIND) <= endpoints, set(AUDIT_KIND) - endpoints  # no stale key


# ------------------------------------------------------------------ NUL characters


@pytest.mark.parametrize(("action", "form", "label"), [
    ("notes", {"text": "a\x00b"}, "Note"),
    ("resolve", {"note": "a\x00b"}, "What was done (optional)"),
    ("appeal", {"kind": "standard", "reason": "a\x00b"}, "Reason"),
    ("decision", {"received_via": "phone", "outcome_1": "denied", "denial_text_1": "x\x00"},
     "Line 1 · Denial reason in words"),
])
def test_a_nul_character_in_a_form_is_a_400_page_naming_the_field(
        coordinator, services, tokens, action, form, label):
    _, case_id = seed_case(coordinator, services, tokens["org-a"]["clinician"], "org-a")
    resp = coordinator.post(f"/app/cases/{case_id}/{action}",
                            data={"csrf_token": _csrf(coordinator), **form})
    assert resp.status_code == 400
    text = resp.get_data(as_text=True)
    assert f"Not done: “{label}” contains a NUL character (\\x00)" in text
    page = coordinator.get(f"/app/cases/{case_id}").get_data(as_text=True)
    assert 'id="case-state">Pended<' in page and "a\x00b" not in page


def test_a_nul_character_in_a_file_name_or_the_sign_in_token_is_a_400_page(
        app, coordinator, services, tokens):
    import io

    _, case_id = seed_case(coordinator, services, tokens["org-a"]["clinician"], "org-a")
    resp = coordinator.post(f"/app/cases/{case_id}/attachments", data={
        "csrf_token": _csrf(coordinator),
        "file": (io.BytesIO(b"%PDF-1.4\n%nul\n"), "a\x00b.pdf")},
        content_type="multipart/form-data")
    assert resp.status_code == 400
    assert "“Document (PDF, PNG, JPEG or TIFF, at most 10 MiB)” contains a NUL" in \
        resp.get_data(as_text=True)
    assert "a.pdf" not in coordinator.get(f"/app/cases/{case_id}").get_data(as_text=True)
    client = app.test_client()
    page = client.get("/app/login").get_data(as_text=True)
    resp = client.post("/app/login", data={"csrf_token": csrf_of(page), "token": "asv_\x00"},
                       environ_base={"REMOTE_ADDR": fresh_addr()})
    assert resp.status_code == 400 and "“API token” contains a NUL" in resp.get_data(
        as_text=True)


# ------------------------------------------------------------------ file names


@pytest.mark.parametrize(("sent", "stored"), [
    ("invoice\u202efdp.exe", "invoicefdp.exe"),  # right-to-left override: "exe.pdf" shown
    ("tab\tbell\x07\x1b[31m.pdf", "tabbell[31m.pdf"),
    ("\u200b\u2066\u2069", "document"),  # nothing but invisible characters
    ("scans/report\u2028.pdf", "report.pdf"),
])
def test_upload_file_names_lose_control_and_direction_characters(
        coordinator, services, tokens, sent, stored):
    import io
    import uuid

    import sqlalchemy as sa

    from authsvc.adapters.db import tables as t

    _, case_id = seed_case(coordinator, services, tokens["org-a"]["clinician"], "org-a")
    resp = coordinator.post(f"/app/cases/{case_id}/attachments", data={
        "csrf_token": _csrf(coordinator),
        "file": (io.BytesIO(b"%PDF-1.4\n" + uuid.uuid4().bytes), sent)},
        content_type="multipart/form-data")
    assert resp.status_code == 303
    with services.engine.connect() as conn:
        names = conn.execute(sa.select(t.attachments.c.filename).where(
            t.attachments.c.case_id == case_id)).scalars().all()
    assert names == [stored]


# ------------------------------------------------------------------ language link, HSTS


def _lang_link(html: str) -> str:
    import html as htmllib
    import re

    match = re.search(r'<a href="([^"]*)" lang="(?:en|es)" hreflang', html)
    assert match, "no language link"
    return htmllib.unescape(match.group(1))


def test_the_language_link_keeps_the_page_and_works_after_a_refused_form(
        coordinator, services, tokens):
    _, case_id = seed_case(coordinator, services, tokens["org-a"]["clinician"], "org-a")
    link = _lang_link(coordinator.get("/app/?state=pended&urgency=standard").get_data(
        as_text=True))
    assert link == "/app/?state=pended&urgency=standard&lang=es"
    # a refused form answers at its POST-only address: the link goes to the case page
    refused = coordinator.post(f"/app/cases/{case_id}/notes",
                               data={"csrf_token": _csrf(coordinator), "text": ""})
    assert refused.status_code == 422
    link = _lang_link(refused.get_data(as_text=True))
    assert link == f"/app/cases/{case_id}?lang=es"
    followed = coordinator.get(link)
    assert followed.status_code == 200 and '<html lang="es">' in followed.get_data(
        as_text=True)
    assert _lang_link(followed.get_data(as_text=True)) == f"/app/cases/{case_id}?lang=en"
    coordinator.get("/app/?lang=en")


def test_hsts_is_sent_only_when_the_cookie_is_secure(app, settings, services, monkeypatch):
    from authsvc.api import create_app

    assert "Strict-Transport-Security" not in app.test_client().get("/app/login").headers
    monkeypatch.setenv("AUTHSVC_DASHBOARD_SECURE_COOKIE", "1")
    secure = create_app(settings, services).test_client()
    resp = secure.get("/app/login", base_url="https://localhost")
    assert resp.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert secure.get("/app/", base_url="https://localhost").headers[
        "Strict-Transport-Security"] == "max-age=31536000"
