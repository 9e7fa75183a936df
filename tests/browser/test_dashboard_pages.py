"""The dashboard's pages through Flask's test client (no browser): conflicts and bad input
give a clear message (never a 500), the metrics page and its CSV, time-left wording and the
two UI languages."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from tests.browser.dash import csrf_of, seed_case, sign_in

pytestmark = pytest.mark.integration


@pytest.fixture()
def coordinator(app, tokens):
    client = app.test_client()
    assert sign_in(client, tokens["org-a"]["coordinator"]).status_code == 303
    return client


def _csrf(client) -> str:  # type: ignore[no-untyped-def]
    return csrf_of(client.get("/app/").get_data(as_text=True))


def test_a_decision_on_a_case_that_is_no_longer_deciding_is_a_clear_409(
        app, coordinator, services, tokens):
    _, case_id = seed_case(coordinator, services, tokens["org-a"]["clinician"], "org-a",
                           state="approved")
    resp = coordinator.post(f"/app/cases/{case_id}/decision", data={
        "csrf_token": _csrf(coordinator), "received_via": "phone", "outcome_1": "denied"})
    assert resp.status_code == 409
    text = resp.get_data(as_text=True)
    assert "Not done: a decision can be recorded only while the payer is deciding" in text
    assert "(the case is now Approved)" in text
    resp = coordinator.post(f"/app/cases/{case_id}/appeal", data={
        "csrf_token": _csrf(coordinator), "kind": "standard"})
    assert resp.status_code == 409 and "Not done:" in resp.get_data(as_text=True)
    resp = coordinator.post(f"/app/cases/{case_id}/decision?lang=es", data={
        "csrf_token": _csrf(coordinator), "received_via": "phone", "outcome_1": "denied"})
    assert resp.status_code == 409
    assert "No se hizo: esta acción no es posible ahora (el caso está en Aprobado)" in \
        resp.get_data(as_text=True)
    coordinator.get("/app/?lang=en")


@pytest.mark.parametrize(("form", "expected"), [
    ({"received_via": "pigeon", "outcome_1": "approved"}, "Received via: choose one"),
    ({"received_via": "phone", "outcome_1": "modified"}, "Authorized quantity: required"),
    ({"received_via": "phone", "outcome_1": "approved", "valid_from_1": "31/12/2026"},
     "Valid from (YYYY-MM-DD): use YYYY-MM-DD"),
    ({"received_via": "phone", "outcome_1": "approved", "quantity_1": "-3"},
     "a whole number from 1 to 999"),
    ({"received_via": "phone", "outcome_9": "approved"}, "no line with this sequence"),
    ({"received_via": "phone"}, "Outcome: required"),
])
def test_bad_decision_input_is_named_on_the_page(app, coordinator, services, tokens, form,
                                                 expected):
    _, case_id = seed_case(coordinator, services, tokens["org-a"]["clinician"], "org-a")
    resp = coordinator.post(f"/app/cases/{case_id}/decision",
                            data={"csrf_token": _csrf(coordinator), **form})
    assert resp.status_code == 422
    text = resp.get_data(as_text=True)
    assert "Not done. Please correct:" in text and expected in text
    if "outcome_1" in form:  # what was typed is still in the form, to correct
        assert f'<option value="{form["outcome_1"]}" selected>' in text
    page = coordinator.get(f"/app/cases/{case_id}").get_data(as_text=True)
    assert 'id="case-state">Pended<' in page  # nothing changed


def test_bad_uploads_and_notes_get_messages_not_errors(app, coordinator, services, tokens):
    _, case_id = seed_case(coordinator, services, tokens["org-a"]["clinician"], "org-a")
    import io

    resp = coordinator.post(f"/app/cases/{case_id}/attachments", data={
        "csrf_token": _csrf(coordinator), "file": (io.BytesIO(b"MZ\x90\x00 not a pdf"),
                                                   "virus.exe")},
        content_type="multipart/form-data")
    assert resp.status_code == 415
    assert "only PDF, PNG, JPEG and TIFF" in resp.get_data(as_text=True)
    resp = coordinator.post(f"/app/cases/{case_id}/attachments", data={
        "csrf_token": _csrf(coordinator)}, content_type="multipart/form-data")
    assert resp.status_code == 422 and "choose a non-empty file" in resp.get_data(as_text=True)
    resp = coordinator.post(f"/app/cases/{case_id}/notes", data={
        "csrf_token": _csrf(coordinator), "text": "   "})
    assert resp.status_code == 422 and "Note: required" in resp.get_data(as_text=True)
    resp = coordinator.post(f"/app/cases/{case_id}/notes", data={
        "csrf_token": _csrf(coordinator), "text": "x" * 10_001})
    assert resp.status_code == 422 and "Note: too long" in resp.get_data(as_text=True)


def test_unusable_filters_and_cursors_are_explained_and_ignored(app, coordinator):
    resp = coordinator.get("/app/?state=bogus&urgency=soon&cursor=%%%")
    assert resp.status_code == 400
    text = resp.get_data(as_text=True)
    assert "Some filters were not understood and were ignored: State, Urgency" in text
    assert "That page link is no longer valid" in text
    assert coordinator.get("/app/cases/not-a-case").status_code == 404
    assert coordinator.get("/app/metrics?from=2026-13-01&to=x").status_code == 400


def test_worklist_filters_assigned_to_me_and_paging(app, coordinator, services, tokens):
    _, mine = seed_case(coordinator, services, tokens["org-a"]["clinician"], "org-a",
                        overdue_by_hours=500)
    coordinator.post(f"/app/cases/{mine}/assign", data={"csrf_token": _csrf(coordinator)})
    text = coordinator.get("/app/?mine=1").get_data(as_text=True)
    # exactly the cases the JSON API says are assigned to this coordinator (other tests of
    # the session may have assigned some too)
    listed = re.findall(r'data-case-id="([^"]+)"', text)
    api = app.test_client().get("/v1/cases?assignee=org-a-coordinator&limit=50", headers={
        "Authorization": f"Bearer {tokens['org-a']['coordinator']}"}).get_json()
    assert mine in listed and sorted(listed) == sorted(c["id"] for c in api["items"])
    assert "org-a-coordinator" in text
    # paging keeps the filters in the next-page link
    for _ in range(2):
        seed_case(coordinator, services, tokens["org-a"]["clinician"], "org-a")
    from authsvc.api.dashboard import views

    old, views.PAGE_SIZE = views.PAGE_SIZE, 1
    try:
        first = coordinator.get("/app/?state=pended").get_data(as_text=True)
    finally:
        views.PAGE_SIZE = old
    assert 'rel="next"' in first and "state=pended&amp;cursor=" in first


def test_the_metrics_page_shows_the_report_a_chart_and_a_csv(app, coordinator, services,
                                                             tokens):
    _, case_id = seed_case(coordinator, services, tokens["org-a"]["clinician"], "org-a",
                           overdue_by_hours=-60)
    resp = coordinator.post(f"/app/cases/{case_id}/decision", data={
        "csrf_token": _csrf(coordinator), "received_via": "fax", "outcome_1": "approved",
        "auth_number_1": "FAX-1"})
    assert resp.status_code == 303
    today = dt.datetime.now(dt.UTC).date().isoformat()
    page = coordinator.get(f"/app/metrics?from={today}&to={today}&payer_id=demo")
    text = page.get_data(as_text=True)
    assert page.status_code == 200 and 'id="metrics-table"' in text
    assert "<svg" in text and "Approval rate and median decision time by urgency" in text
    csv = coordinator.get(f"/app/metrics.csv?from={today}&to={today}&payer_id=demo")
    assert csv.status_code == 200 and csv.mimetype == "text/csv"
    assert "attachment" in csv.headers["Content-Disposition"]
    header, *rows = csv.get_data(as_text=True).splitlines()
    assert header.startswith("payer_id,urgency,requests,approved,approved_pct")
    assert any(r.startswith("demo,standard,") for r in rows)


def test_time_left_reads_like_the_issue_says(app):
    from flask import g

    from authsvc.api.dashboard.views import time_left

    now = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
    dash = app.extensions["authsvc_dashboard"]
    with dash.test_request_context("/"):
        g.lang = "en"
        assert time_left((now + dt.timedelta(days=2, hours=4, minutes=10)).isoformat(),
                         now) == "2 d 4 h left"
        assert time_left((now - dt.timedelta(hours=3, minutes=5)).isoformat(),
                         now) == "overdue by 3 h"
        assert time_left((now + dt.timedelta(minutes=45)).isoformat(), now) == "45 min left"
        assert time_left(None, now) == "No deadline yet"
        g.lang = "es"
        assert time_left((now - dt.timedelta(hours=3)).isoformat(), now) == "vencido hace 3 h"


def test_both_languages_have_every_string_and_the_browser_language_is_honoured(app, tokens):
    from authsvc.api.dashboard import i18n

    assert set(i18n.EN) == set(i18n.ES)
    assert all(i18n.ES[k] for k in i18n.ES)
    client = app.test_client()
    page = client.get("/app/login", headers={"Accept-Language": "es-MX,es;q=0.9,en;q=0.5"})
    assert '<html lang="es">' in page.get_data(as_text=True)
    assert "Iniciar sesión" in page.get_data(as_text=True)
    page = client.get("/app/login?lang=en")
    assert "Sign in" in page.get_data(as_text=True)


def test_pages_carry_a_strict_content_security_policy(app, coordinator):
    resp = coordinator.get("/app/")
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp and "form-action 'self'" in csp
    assert "<script>" not in resp.get_data(as_text=True)
    with coordinator.get("/app/static/dashboard.js") as js:
        assert js.status_code == 200 and "X-Dashboard-Poll" in js.get_data(as_text=True)
    assert resp.headers["Cache-Control"] == "no-store"


def test_what_people_type_is_shown_as_text_never_as_markup(app, coordinator, services, tokens):
    _, case_id = seed_case(coordinator, services, tokens["org-a"]["clinician"], "org-a")
    resp = coordinator.post(f"/app/cases/{case_id}/notes", data={
        "csrf_token": _csrf(coordinator), "text": "<script>alert('x')</script> & <b>bold</b>"})
    assert resp.status_code == 303
    page = coordinator.get(f"/app/cases/{case_id}").get_data(as_text=True)
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "<script>alert" not in page


def test_needs_attention_can_be_cleared_and_a_rejected_case_resubmitted(
        app, coordinator, services, tokens):
    from authsvc.adapters.db import repo
    from authsvc.domain import clock

    _, case_id = seed_case(coordinator, services, tokens["org-a"]["clinician"], "org-a",
                           state="rejected", overdue_by_hours=-100)
    with services.engine.begin() as conn:
        repo.update_case(conn, case_id, attention_reason="rejected",
                         attention_since=clock.now())
    page = coordinator.get(f"/app/cases/{case_id}").get_data(as_text=True)
    assert "Needs attention: Rejected by the payer" in page
    resp = coordinator.post(f"/app/cases/{case_id}/resolve", data={
        "csrf_token": _csrf(coordinator), "note": "called them"})
    assert resp.status_code == 303
    page = coordinator.get(f"/app/cases/{case_id}").get_data(as_text=True)
    assert "Marked as handled." in page and "Nothing needs attention" in page
    resp = coordinator.post(f"/app/cases/{case_id}/resubmit", data={
        "csrf_token": _csrf(coordinator)})
    assert resp.status_code == 303
    new_case = resp.headers["Location"].rsplit("/", 1)[-1]
    assert new_case != case_id
    page = coordinator.get(f"/app/cases/{new_case}").get_data(as_text=True)
    assert "Resubmitted: this is the new case." in page
    assert 'id="case-state">Ready to submit<' in page
    again = coordinator.post(f"/app/cases/{case_id}/resubmit", data={
        "csrf_token": _csrf(coordinator)})
    assert again.status_code == 409 and "(the case is now Superseded)" in again.get_data(
        as_text=True)
