"""Issue 9 in a real browser: a coordinator signs in, sees the seeded overdue case first,
filters, opens it, adds a note, uploads a document, records a phone decision, and the order
is approved in the JSON API. Plus auto-refresh, Spanish, CSRF refusal, session expiry and an
axe-core accessibility check. A screenshot of the worklist goes to var/test-artifacts/."""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
import uuid

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import tables as t
from tests.conftest import order_body
from tests.e2e.harness import wait_for

pytestmark = pytest.mark.e2e
PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00"
       b"\x00\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N"
       b"\x00\x00\x00\x00IEND\xaeB`\x82")


def _submit(api, urgency: str = "standard") -> tuple[str, str]:
    """An order the simulator pends and never decides (SIM-SILENT): (order id, case id)."""
    ext = f"EHR-{uuid.uuid4().hex[:6].upper()}"
    status, _, body = api.request("POST", "/v1/orders", order_body(
        "SIM-SILENT-0001", external_id=ext, urgency=urgency),
        headers={"Idempotency-Key": uuid.uuid4().hex})
    assert status == 201, body
    order_id = body["id"]

    def pended():  # type: ignore[no-untyped-def]
        _, _, order = api.request("GET", f"/v1/orders/{order_id}")
        cases = order["cases"]
        return cases[0]["id"] if cases and cases[0]["state"] == "pended" else None

    return order_id, wait_for(pended, timeout=60)


def _make_overdue(database_url: str, case_id: str, hours: float) -> None:
    """Seed: the payer received the request 7 days + `hours` ago, so the deadline passed."""
    engine = sa.create_engine(database_url)
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        conn.execute(t.cases.update().where(t.cases.c.id == case_id).values(
            decision_due_at=now - dt.timedelta(hours=hours),
            payer_received_at=now - dt.timedelta(days=7, hours=hours)))
    engine.dispose()


def _sign_in(page, base: str, token: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{base}/app/")
    assert "/app/login" in page.url  # not signed in yet
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r".*/app/(\?.*)?$"))


def _axe(page) -> list[str]:  # type: ignore[no-untyped-def]
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    return [f"{v['id']}: {v['help']} ({len(v['nodes'])})"
            for v in results.response["violations"] if v["impact"] in ("serious", "critical")]


@pytest.fixture(scope="module")
def seeded(clinician_api, database_url):
    overdue = _submit(clinician_api)
    _make_overdue(database_url, overdue[1], hours=3.2)
    expedited = _submit(clinician_api, urgency="expedited")
    return {"overdue": overdue, "expedited": expedited}


def test_coordinator_works_a_case_from_the_worklist_to_an_approval(
        system, page, org_tokens, seeded, coordinator_api, artifacts):
    order_id, case_id = seeded["overdue"]
    _, other_case = seeded["expedited"]
    _sign_in(page, system.api, org_tokens["coordinator"])

    # the seeded overdue case is at the top, with a word (not only a colour) and the time
    first = page.locator("table.worklist tbody tr").first
    assert first.get_attribute("data-case-id") == case_id
    assert "Overdue" in first.inner_text() and "overdue by 3 h" in first.inner_text()
    assert page.locator(f"tr[data-case-id='{other_case}']").count() == 1
    assert "2 open" in page.locator("#counts-title").inner_text()
    page.screenshot(path=str(artifacts / "worklist.png"), full_page=True)
    assert _axe(page) == []

    # filter: expedited only → the overdue standard case is gone, the filter stays in the URL
    page.get_by_label("Urgency").select_option("expedited")
    page.get_by_role("button", name="Apply filters").click()
    page.wait_for_url(re.compile(r".*urgency=expedited.*"))
    assert page.locator(f"tr[data-case-id='{case_id}']").count() == 0
    assert page.locator(f"tr[data-case-id='{other_case}']").count() == 1
    page.get_by_role("link", name="Clear filters").click()

    # open the case
    page.locator(f"tr[data-case-id='{case_id}'] a").first.click()
    page.wait_for_url(f"**/app/cases/{case_id}")
    assert page.locator("#case-state").inner_text() == "Pended"
    assert _axe(page) == []

    page.get_by_role("button", name="Assign to me").click()
    page.get_by_text("The case is assigned to you.").wait_for()
    assert page.locator("#case-assignee").inner_text() != "Unassigned"

    page.get_by_label("Note", exact=True).fill("Called the payer, reference 42: decision coming.")
    page.get_by_role("button", name="Add note").click()
    page.get_by_text("Note added.").wait_for()
    assert "Called the payer, reference 42" in page.locator("#notes").inner_text()

    page.get_by_label(re.compile("^Document")).set_input_files(
        {"name": "clinical-notes.png", "mimeType": "image/png", "buffer": PNG})
    page.get_by_role("button", name="Upload attachment").click()
    page.get_by_text("Attachment uploaded.").wait_for()
    assert "clinical-notes.png" in page.locator("#attachments").inner_text()

    page.get_by_label("Received via").select_option("phone")
    page.get_by_label("Reference (call or fax reference)").fill("CALL-7781")
    page.locator("#d-outcome-1").select_option("approved")
    page.locator("#d-auth-1").fill("AUTH-PHONE-1")
    page.locator("#d-qty-1").fill("1")
    page.locator("#d-from-1").fill("2026-12-01")
    page.locator("#d-to-1").fill("2026-12-31")
    page.get_by_role("button", name="Record decision").click()
    page.get_by_text("Decision recorded.").wait_for()
    assert page.locator("#case-state").inner_text() == "Approved"
    assert "AUTH-PHONE-1" in page.locator("#decisions").inner_text()
    assert "Decided 20" in page.locator("dl.facts").first.inner_text()  # no longer "overdue"
    page.screenshot(path=str(artifacts / "case.png"), full_page=True)

    # the JSON API sees the order approved, with the auth number the coordinator entered
    status, _, order = coordinator_api.request("GET", f"/v1/orders/{order_id}")
    assert status == 200 and order["status"] == "approved"
    status, _, case = coordinator_api.request("GET", f"/v1/cases/{case_id}")
    assert case["lines"][0]["decision"]["auth_number"] == "AUTH-PHONE-1"
    assert [n["text"] for n in case["notes"]] == [
        "Called the payer, reference 42: decision coming."]
    assert [a["filename"] for a in case["attachments"]] == ["clinical-notes.png"]

    # a conflicting action gets a clear message, not a crash: appeal an approved case
    page.goto(f"{system.api}/app/cases/{case_id}")
    resp = page.request.post(f"{system.api}/app/cases/{case_id}/cancel", form={
        "csrf_token": page.locator("input[name=csrf_token]").first.get_attribute("value")})
    assert resp.status == 303 or resp.ok  # cancelling an approval withdraws it
    page.goto(f"{system.api}/app/cases/{case_id}")
    assert page.locator("#case-state").inner_text() == "Cancelled"


def test_the_worklist_refreshes_itself_every_30_s_and_keeps_the_filters(
        system, page, org_tokens, seeded, coordinator_api):
    _, case_id = seeded["expedited"]
    page.clock.install()
    _sign_in(page, system.api, org_tokens["coordinator"])
    page.goto(f"{system.api}/app/?urgency=expedited")
    row = page.locator(f"tr[data-case-id='{case_id}']")
    assert "Unassigned" in row.inner_text()
    status, _, _ = coordinator_api.request("POST", f"/v1/cases/{case_id}/assign",
                                           {"assignee": "Pat Doe"})
    assert status == 200
    page.clock.run_for(31_000)
    page.locator(f"tr[data-case-id='{case_id}']", has_text="Pat Doe").wait_for()
    assert "urgency=expedited" in page.url
    assert page.locator("table.worklist tbody tr").count() == 1  # still filtered


def test_spanish_ui_and_the_case_of_another_organization(system, page, org_tokens, seeded,
                                                          artifacts):
    _sign_in(page, system.api, org_tokens["admin"])
    page.goto(f"{system.api}/app/?lang=es")
    assert page.locator("h1").inner_text() == "Lista de trabajo"
    assert page.locator("html").get_attribute("lang") == "es"
    page.goto(f"{system.api}/app/metrics")  # the choice is remembered
    assert page.locator("h1").inner_text() == "Métricas de autorización previa"
    page.screenshot(path=str(artifacts / "metrics-es.png"), full_page=True)
    assert _axe(page) == []
    other = system.token(f"other-{uuid.uuid4().hex[:4]}", "coordinator")
    page.context.clear_cookies()
    _sign_in(page, system.api, other)
    resp = page.goto(f"{system.api}/app/cases/{seeded['overdue'][1]}")
    assert resp.status == 404


def test_sign_in_with_the_keyboard_only(system, page, org_tokens):
    page.goto(f"{system.api}/app/login")
    assert _axe(page) == []
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to main content"
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")  # main → the first control inside it
    while page.evaluate("document.activeElement.id") != "token":
        page.keyboard.press("Tab")
    page.keyboard.type(org_tokens["clinician"])
    page.keyboard.press("Enter")
    page.get_by_text("A clinician token cannot use the dashboard").wait_for()
    page.get_by_label("API token").focus()
    page.keyboard.type(org_tokens["coordinator"])
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r".*/app/$"))
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")  # skip link, then the first link of the header
    assert page.evaluate("document.activeElement.tagName") in ("A", "BUTTON")


def test_a_form_without_its_csrf_token_is_refused(system, page, org_tokens, seeded):
    _, case_id = seeded["expedited"]
    _sign_in(page, system.api, org_tokens["coordinator"])
    page.goto(f"{system.api}/app/cases/{case_id}")
    page.evaluate("document.querySelectorAll('input[name=csrf_token]')"
                  ".forEach(e => e.value = 'forged')")
    page.get_by_label("Note", exact=True).fill("should never be stored")
    page.get_by_role("button", name="Add note").click()
    page.get_by_text("This form expired or did not come from this page").wait_for()
    page.goto(f"{system.api}/app/cases/{case_id}")
    assert "should never be stored" not in page.content()


@pytest.fixture()
def short_idle_server(settings, services, monkeypatch):
    """The app served on a free port with a 3 s idle window (in-process; real clock)."""
    from werkzeug.serving import make_server

    from authsvc.api import create_app

    monkeypatch.setenv("AUTHSVC_DASHBOARD_IDLE_SECONDS", "3")
    server = make_server("127.0.0.1", 0, create_app(settings, services), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


def test_an_idle_session_ends_and_the_page_asks_to_sign_in_again(
        short_idle_server, page, tokens):
    _sign_in(page, short_idle_server, tokens["org-a"]["coordinator"])
    cookie = next(c for c in page.context.cookies() if c["name"] == "authsvc_dash")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["expires"] - time.time() <= 4
    time.sleep(4)
    page.get_by_role("link", name="Metrics").click()
    page.wait_for_url("**/app/login?notice=session_expired")
    assert "Your session ended after" in page.locator("main").inner_text()
