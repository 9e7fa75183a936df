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
