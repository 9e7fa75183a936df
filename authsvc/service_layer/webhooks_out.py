"""Outbound webhooks for billing systems: subscriptions, signed deliveries, retries.

A delivery row is written in the same transaction as the event it announces (an outcome),
together with an outbox row, so an event is never lost between the database and Redis. The
`deliver_webhook` actor claims a delivery with a lease, signs it per Standard Webhooks and
POSTs it through the SSRF guard. Failures retry on a fixed exponential schedule spanning more
than 24 h; the webhook-id stays the same across retries so the receiver can deduplicate. A
subscription whose deliveries keep failing until a retry budget is spent is disabled with a
visible reason; `redeliver` re-enables it and queues its failed deliveries again.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from authsvc.adapters import ssrf, webhooks
from authsvc.adapters.db import repo
from authsvc.adapters.db import repo_cases as rc
from authsvc.bootstrap import Services
from authsvc.domain import clock, ids
from authsvc.domain.errors import NotFound
from authsvc.service_layer import views
from authsvc.service_layer.context import Actor

log = logging.getLogger(__name__)

EVENTS = ("outcome.created",)
#: seconds to wait before each retry (Standard Webhooks' schedule): 8 attempts over ~27.6 h.
RETRY_SCHEDULE = [5, 300, 1800, 7200, 18000, 36000, 36000]
#: consecutive failed attempts (across deliveries) after which a subscription is disabled,
#: checked when a delivery has spent its whole schedule.
DISABLE_AFTER_FAILURES = len(RETRY_SCHEDULE) + 1
LEASE = dt.timedelta(seconds=60)
TIMEOUT_SECONDS = 10.0


def new_secret() -> str:
    """`whsec_` + base64 of 24 random bytes (the Standard Webhooks format)."""
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def subscription_view(row: dict, *, secret: str | None = None) -> dict:
    status = "active"
    if row.get("deleted_at"):
        status = "deleted"
    elif row.get("disabled_at"):
        status = "disabled"
    view = {
        "id": row["id"], "url": row["url"], "events": list(row["events"]), "status": status,
        "created_at": clock.isoformat(row["created_at"]),
        "disabled_at": clock.isoformat(row["disabled_at"]),
        "disabled_reason": row["disabled_reason"],
        "consecutive_failures": row["consecutive_failures"] or 0,
        "links": {"self": f"/v1/subscriptions/{row['id']}",
                  "deliveries": f"/v1/subscriptions/{row['id']}/deliveries"},
    }
    if secret is not None:
        view["secret"] = secret
    return view


def create_subscription(services: Services, actor: Actor, conn: sa.Connection, url: str,
                        events: list[str]) -> dict:
    """Register a webhook; raises `ssrf.Refused` for a URL it must not call."""
    ssrf.check_url(url, services.settings.webhook_allowlist)
    now = clock.now()
    secret = new_secret()
    sub_id = ids.new_id("sub")
    rc.insert_subscription(conn, {"id": sub_id, "org_id": actor.org_id, "url": url,
                                  "events": sorted(set(events)), "secret": secret,
                                  "created_at": now})
    repo.add_audit(conn, at=now, org_id=actor.org_id, token_id=actor.token_id, role=actor.role,
                   action="create", entity_type="subscription", entity_id=sub_id,
                   outcome="success", request_id=actor.request_id, source_ip=actor.source_ip)
    row = rc.subscription(conn, actor.org_id, sub_id)
    assert row is not None
    return subscription_view(row, secret=secret)


def get_subscription(conn: sa.Connection, actor: Actor, sub_id: str) -> dict:
    row = rc.subscription(conn, actor.org_id, sub_id)
    if row is None:
        raise NotFound("subscription")
    return subscription_view(row)


def list_subscriptions(conn: sa.Connection, actor: Actor, after: str | None,
                       limit: int) -> dict:
    rows = rc.subscriptions(conn, actor.org_id, after, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return {"items": [subscription_view(r) for r in rows],
            "next_cursor": rows[-1]["id"] if more and rows else None}


def delete_subscription(conn: sa.Connection, actor: Actor, sub_id: str) -> None:
    """Soft delete; pending deliveries stop (they are marked failed, kept in the log)."""
    row = rc.subscription(conn, actor.org_id, sub_id)
    if row is None:
        raise NotFound("subscription")
    now = clock.now()
    rc.update_subscription(conn, sub_id, deleted_at=now)
    d = rc.t.webhook_deliveries
    conn.execute(d.update().where(d.c.subscription_id == sub_id, d.c.status == "pending")
                 .values(status="failed", last_error="subscription deleted"))
    repo.add_audit(conn, at=now, org_id=actor.org_id, token_id=actor.token_id, role=actor.role,
                   action="update", entity_type="subscription", entity_id=sub_id,
                   outcome="success", request_id=actor.request_id, source_ip=actor.source_ip,
                   reason="delete")


def delivery_log(conn: sa.Connection, actor: Actor, sub_id: str, after: str | None,
                 limit: int) -> dict:
    if rc.subscription(conn, actor.org_id, sub_id) is None:
        raise NotFound("subscription")
    rows = rc.deliveries(conn, sub_id, after, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    items = [{
        "id": r["id"], "event_type": r["event_type"], "webhook_id": r["event_id"],
        "status": r["status"], "attempts": r["attempts"],
        "next_attempt_at": clock.isoformat(r["next_attempt_at"]) if r["status"] == "pending"
        else None,
        "last_status_code": r["last_status_code"], "last_error": r["last_error"],
        "created_at": clock.isoformat(r["created_at"]),
        "delivered_at": clock.isoformat(r["delivered_at"]),
    } for r in rows]
    return {"items": items, "next_cursor": rows[-1]["id"] if more and rows else None}


def redeliver(conn: sa.Connection, actor: Actor, sub_id: str,
              delivery_ids: Iterable[str] | None) -> dict:
    """Re-enable the subscription and queue its failed (or the named) deliveries again."""
    row = rc.subscription(conn, actor.org_id, sub_id)
    if row is None:
        raise NotFound("subscription")
    now = clock.now()
    if row["disabled_at"] is not None:
        rc.update_subscription(conn, sub_id, disabled_at=None, disabled_reason=None,
                               consecutive_failures=0)
    queued = rc.reopen_deliveries(conn, sub_id, now, delivery_ids)
    for delivery_id in queued:
        repo.add_outbox(conn, "deliver_webhook", delivery_id, now)
    repo.add_audit(conn, at=now, org_id=actor.org_id, token_id=actor.token_id, role=actor.role,
                   action="update", entity_type="subscription", entity_id=sub_id,
                   outcome="success", request_id=actor.request_id, source_ip=actor.source_ip,
                   reason="redeliver")
    return {"subscription": subscription_view({**row, "disabled_at": None,
                                               "disabled_reason": None,
                                               "consecutive_failures": 0}),
            "queued": queued}


# ------------------------------------------------------------------ events


def _payload(conn: sa.Connection, event_type: str, payload: dict, now: dt.datetime) -> dict:
    data = payload
    if event_type == "outcome.created" and "outcome_id" in payload:
        row = rc.outcome_by_id(conn, payload["outcome_id"])
        data = views.outcome_item(row) if row is not None else payload
    return {"type": event_type, "timestamp": clock.isoformat(now), "data": data}


def enqueue_event(conn: sa.Connection, org_id: str, event_type: str, payload: dict) -> int:
    """Queue one delivery per active subscription to `event_type`, in the caller's transaction.

    For `outcome.created`, `payload` may be `{"outcome_id": ...}`: the feed item (with its
    cursor) is read back from the row just inserted. Returns the number of deliveries.
    """
    subs = [s for s in rc.active_subscriptions(conn, org_id) if event_type in (s["events"] or ())]
    if not subs:
        return 0
    now = clock.now()
    body = _payload(conn, event_type, payload, now)
    event_id = ids.new_id("msg")
    rows = [{"id": ids.new_id("dlv"), "org_id": org_id, "subscription_id": s["id"],
             "event_type": event_type, "event_id": event_id, "payload": body,
             "status": "pending", "attempts": 0, "next_attempt_at": now, "created_at": now}
            for s in subs]
    rc.insert_deliveries(conn, rows)
    for row in rows:
        repo.add_outbox(conn, "deliver_webhook", row["id"], now)
    return len(rows)


# ------------------------------------------------------------------ delivery


def _send(url: str, secret: str, event_id: str, payload: Any,
          allowlist: Iterable[str]) -> tuple[int | None, str | None]:
    body = json.dumps(payload, separators=(",", ":")).encode()
    hdrs = webhooks.headers(secret, event_id, body)
    try:
        status = ssrf.post(url, body, hdrs, allowlist, timeout=TIMEOUT_SECONDS)
    except ssrf.Refused as exc:
        return None, f"refused: {exc}"
    except (OSError, ValueError) as exc:  # http.client errors derive from these
        return None, f"connection failed: {type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001 - http.client.HTTPException and friends
        return None, f"bad response: {type(exc).__name__}"
    if 200 <= status < 300:
        return status, None
    return status, f"HTTP {status}"


def deliver(services: Services, delivery_id: str) -> str:
    """One attempt of one delivery; returns `delivered`, `retry`, `failed` or `skipped`."""
    now = clock.now()
    with services.engine.begin() as conn:
        row = rc.delivery(conn, delivery_id)
        if row is None:
            return "skipped"
        sub = rc.subscription(conn, None, row["subscription_id"])
        if sub is None or sub["disabled_at"] is not None:
            return "skipped"  # deleted (marked failed) or disabled: waits for redelivery
        if not rc.claim_delivery(conn, delivery_id, now, LEASE):
            return "skipped"
        attempt = row["attempts"] + 1
    status, error = _send(sub["url"], sub["secret"], row["event_id"], row["payload"],
                          services.settings.webhook_allowlist)
    now = clock.now()
    with services.engine.begin() as conn:
        if error is None:
            rc.update_delivery(conn, delivery_id, status="delivered", delivered_at=now,
                               claimed_until=None, last_status_code=status, last_error=None)
            rc.update_subscription(conn, sub["id"], consecutive_failures=0)
            return "delivered"
        failures = (rc.subscription(conn, None, sub["id"]) or sub)["consecutive_failures"] + 1
        sub_values: dict[str, Any] = {"consecutive_failures": failures}
        if attempt <= len(RETRY_SCHEDULE):
            at = now + dt.timedelta(seconds=RETRY_SCHEDULE[attempt - 1])
            rc.update_delivery(conn, delivery_id, claimed_until=None, next_attempt_at=at,
                               last_status_code=status, last_error=error[:300])
            repo.add_outbox(conn, "deliver_webhook", delivery_id, now, available_at=at)
            rc.update_subscription(conn, sub["id"], **sub_values)
            log.info("webhook delivery failed; retry scheduled",
                     extra={"delivery_id": delivery_id, "attempt": attempt})
            return "retry"
        rc.update_delivery(conn, delivery_id, status="failed", claimed_until=None,
                           next_attempt_at=None, last_status_code=status,
                           last_error=error[:300])
        if failures >= DISABLE_AFTER_FAILURES:
            sub_values.update(disabled_at=now, disabled_reason=(
                f"disabled after {failures} consecutive failed attempts; last: {error}")[:300])
            log.warning("webhook subscription disabled", extra={"subscription_id": sub["id"]})
        rc.update_subscription(conn, sub["id"], **sub_values)
        return "failed"


def due_deliveries(services: Services, now: dt.datetime) -> list[str]:
    """Deliveries whose time came but whose message may be gone (for the scheduler sweep)."""
    stale = now - dt.timedelta(seconds=services.settings.sweep_after_seconds)
    with services.engine.connect() as conn:
        return rc.due_deliveries(conn, now, stale)
