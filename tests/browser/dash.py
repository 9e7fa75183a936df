"""Helpers shared by the dashboard tests (in-process Flask client and browser)."""

from __future__ import annotations

import datetime as dt
import re
import uuid

from tests.conftest import auth, order_body

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def sign_in(client, token: str, **kw):  # type: ignore[no-untyped-def]
    """Sign in through the real form (CSRF token included); returns the POST's answer."""
    page = client.get("/app/login", **kw)
    return client.post("/app/login", data={"token": token,
                                           "csrf_token": csrf_of(page.get_data(as_text=True))},
                       **kw)


def seed_case(client, services, token: str, org_id: str, *, state: str = "pended",
              overdue_by_hours: float = 3, external_id: str | None = None) -> tuple[str, str]:
    """An order submitted through the API and one case of it in `state` whose decision
    deadline passed `overdue_by_hours` ago (negative: still ahead). Returns (order, case)."""
    from authsvc.adapters.db import repo
    from tests.security.conftest import insert_case

    ext = external_id or f"EHR-{uuid.uuid4().hex[:8].upper()}"
    resp = client.post("/v1/orders", json=order_body("SIM-SILENT-0001", external_id=ext),
                       headers=auth(token, **{"Idempotency-Key": uuid.uuid4().hex}))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    order_id = resp.get_json()["id"]
    case_id = insert_case(services, org_id, order_id, state=state)
    now = dt.datetime.now(dt.UTC)
    due = now - dt.timedelta(hours=overdue_by_hours)
    with services.engine.begin() as conn:
        repo.update_case(conn, case_id, decision_due_at=due, submitted_at=due - dt.timedelta(
            days=7), payer_received_at=due - dt.timedelta(days=7))
    return order_id, case_id
