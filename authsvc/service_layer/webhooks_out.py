"""Outbound webhooks for billing systems: subscriptions, signed deliveries, retries.

A delivery row is written in the same transaction as the event it announces (an outcome),
together with an outbox row, so an event is never lost between the database and Redis. The
`deliver_webhook` actor claims a delivery with a lease, signs it per Standard Webhooks and
POSTs it through the SSRF guard. Failures retry on a fixed exponential schedule spanning more
than 24 h; the webhook-id stays the same across retries so the receiver can deduplicate. A
subscription whose deliveries keep failing until a retry budget is spent is disabled with a
visible reason; `redeliver` re-enables it and queues its failed deliveries again.

Order and case events (`order.*`, `case.*`) come from the order timeline: `timeline.record`
calls `announce` in the transaction of the state change, so a delivery exists exactly when
its event committed. Their payloads carry ids, states, codes and times only, never the
patient's name, birth date, member id or any free text (notes, references). When the
organization has no subscription to the event (the usual case on order intake) the whole
cost is one small SELECT per transaction (`subscriptions` memoizes it).
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
from authsvc.domain import cases as cs
from authsvc.domain import clock, ids
from authsvc.domain.errors import NotFound
from authsvc.service_layer import views
from authsvc.service_layer.context import Actor

log = logging.getLogger(__name__)

#: timeline event → order/case webhook events it announces (see `event_types`).
ORDER_EVENTS = ("order.received", "order.eligibility_checked", "order.needs_attention",
                "order.no_auth_required", "order.cancelled")
CASE_EVENTS = ("case.opened", "case.state_changed", "case.needs_attention", "case.decision")
EVENTS = ("outcome.created", *ORDER_EVENTS, *CASE_EVENTS)
#: what each event type means (the OpenAPI description of the `events` enum)
EVENT_DOCS = {
    "outcome.created": "a new version of a line's decision in the billing feed (the feed item)",
    "order.received": "an order was accepted (timeline `order_received`)",
    "order.eligibility_checked": "the payer answered the eligibility check "
                                 "(`eligibility`: active, inactive, member_not_found, error)",
    "order.needs_attention": "the order itself needs a coordinator (`reason`: "
                             "coverage_problem, eligibility_error, not_sent)",
    "order.no_auth_required": "no line of the order needs prior authorization",
    "order.cancelled": "the order was cancelled",
    "case.opened": "a prior-authorization case was opened (initial, extension; `kind`, "
                   "`state`)",
    "case.state_changed": "a case entered a new state (`state`: any case state)",
    "case.needs_attention": "a case needs a coordinator (`reason`: rejected, error, overdue, "
                            "info_requested, contact_payer, denied_review)",
    "case.decision": "the payer decided a case (`state`: approved, partially_approved, "
                     "modified, denied, not_required; `review_actions` per line)",
}
_CASE_STATES = frozenset(cs.STATES)
_DECISIONS = frozenset({cs.APPROVED, cs.PARTIALLY_APPROVED, cs.MODIFIED, cs.DENIED,
                        cs.NOT_REQUIRED})
_ORDER_ATTENTION = {"eligibility_inactive": "coverage_problem",
                    "eligibility_member_not_found": "coverage_problem",
                    "eligibility_error": "eligibility_error", "lines_not_sent": "not_sent"}
#: timeline kinds that may announce something: anything else costs `record` a set lookup.
TIMELINE_KINDS = frozenset({
    "order_received", "no_auth_required", "order_cancelled", "lines_not_sent",
    "case_opened", "extension_requested", "authorization_expired", "decision_overdue",
    *(f"eligibility_{s}" for s in ("active", "inactive", "member_not_found", "error")),
    *(f"case_{s}" for s in cs.STATES),
})
_SUBS_MEMO = "authsvc_webhook_subscriptions"
_subs = rc.t.webhook_subscriptions
#: the live subscriptions (`repo.active_subscriptions`), built once: it runs on most writes.
_ACTIVE = sa.select(_subs.c.id, _subs.c.events).where(
    *repo.active_subscriptions(sa.bindparam("org_id")))
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


def _forget_subscriptions(conn: sa.Connection) -> None:
    if conn.invalidated:  # the connection died: its `info` is gone with it, and reading it
        return  # would raise PendingRollbackError over the real cause (as audit._drop_pending)
    conn.info.pop(_SUBS_MEMO, None)


# A transaction's view of the subscriptions is read once: every transaction starts afresh.
# Forgotten when a transaction ends, not only when one begins: `conn.info` lives as long as
# the pooled DBAPI connection, and an autobegin transaction's first `announce` reads the
# memo before any statement has begun it (so "begin" has not fired yet).
for _event in ("begin", "commit", "rollback"):
    sa.event.listen(sa.engine.Engine, _event, _forget_subscriptions)


def subscriptions(conn: sa.Connection, org_id: str, known: list[dict] | None = None
                  ) -> list[dict]:
    """The organization's live subscriptions, read once per transaction (an order's intake
    records several timeline events; each would otherwise cost a query). `known`: the list
    the caller already read moments ago (the API's token lookup brings it on PostgreSQL);
    a subscription created since is missed exactly as one committed during this
    transaction would be, and one deleted or disabled since is skipped at delivery."""
    if not conn.in_transaction():  # a memo outside a transaction belongs to an earlier one
        conn.info.pop(_SUBS_MEMO, None)
    memo = conn.info.setdefault(_SUBS_MEMO, {})
    subs = memo.get(org_id)
    if subs is None and known is not None:
        subs = memo[org_id] = [{"id": x["id"], "events": x["events"]} for x in known]
    if subs is None:
        subs = memo[org_id] = [{"id": sub_id, "events": events} for sub_id, events in
                               conn.execute(_ACTIVE, {"org_id": org_id})]
    return subs


def _queue(conn: sa.Connection, org_id: str, bodies: dict[str, dict], subs: list[dict],
           now: dt.datetime) -> int:
    """One delivery per (subscription, event type it asked for), plus their outbox rows:
    one statement on PostgreSQL (the deliveries' INSERT feeds the outbox's through a CTE),
    two multi-row INSERTs on SQLite, whatever the number of deliveries."""
    event_ids = {event_type: ids.new_id("msg") for event_type in bodies}
    rows = [{"id": ids.new_id("dlv"), "org_id": org_id, "subscription_id": s["id"],
             "event_type": event_type, "event_id": event_ids[event_type], "payload": body,
             "status": "pending", "attempts": 0, "next_attempt_at": now, "created_at": now}
            for s in subs for event_type, body in bodies.items()
            if event_type in (s["events"] or ())]
    if not rows:
        return 0
    outbox = rc.t.outbox
    if conn.dialect.name == "postgresql":
        d = rc.t.webhook_deliveries
        inserted = d.insert().values(rows).returning(d.c.id, d.c.created_at).cte("dlv")
        conn.execute(outbox.insert().from_select(
            ["actor", "entity_id", "created_at", "available_at", "publish_count"],
            sa.select(sa.literal("deliver_webhook"), inserted.c.id, inserted.c.created_at,
                      inserted.c.created_at, sa.literal(0))))
        return len(rows)
    rc.insert_deliveries(conn, rows)
    conn.execute(outbox.insert(), [
        {"actor": "deliver_webhook", "entity_id": row["id"], "created_at": now,
         "available_at": now, "publish_count": 0} for row in rows])
    return len(rows)


def enqueue_event(conn: sa.Connection, org_id: str, event_type: str, payload: dict) -> int:
    """Queue one delivery per active subscription to `event_type`, in the caller's transaction.

    For `outcome.created`, `payload` may be `{"outcome_id": ...}`: the feed item (with its
    cursor) is read back from the row just inserted. Returns the number of deliveries.
    """
    subs = [s for s in subscriptions(conn, org_id)
            if event_type in (s["events"] or ())]
    if not subs:
        return 0
    now = clock.now()
    return _queue(conn, org_id, {event_type: _payload(conn, event_type, payload, now)}, subs,
                  now)


def event_types(event: str, detail: dict | None) -> dict[str, dict]:
    """The webhook events a timeline event announces, each with its event-specific fields.

    Only ids, states, codes and counts are taken from `detail`, by name: never notes,
    references, names or anything a person typed.
    """
    detail = detail or {}
    out: dict[str, dict] = {}
    if event == "order_received":
        out["order.received"] = {"lines": detail.get("lines"),
                                 "ruleset_version": detail.get("ruleset_version")}
    elif event.startswith("eligibility_"):
        out["order.eligibility_checked"] = {"eligibility": event.removeprefix("eligibility_")}
    elif event == "no_auth_required":
        out["order.no_auth_required"] = {}
    elif event == "order_cancelled":
        out["order.cancelled"] = {}
    elif event in ("case_opened", "extension_requested"):
        extension = event == "extension_requested"
        out["case.opened"] = {
            "kind": "extension" if extension else detail.get("kind", "initial"),
            "state": detail.get("state", cs.READY_TO_SUBMIT),
            "related_case_id": detail.get("extends" if extension else "related_case_id"),
            "sequences": _ints(detail.get("sequences"))}
    elif event == "decision_overdue":
        out["case.needs_attention"] = {"reason": "overdue"}
    else:
        state = "expired" if event == "authorization_expired" else event.removeprefix("case_")
        if state in _CASE_STATES and (event.startswith("case_") or state == "expired"):
            actions = {str(k): v for k, v in (detail.get("review_actions") or {}).items()
                       if isinstance(v, str) or v is None}
            out["case.state_changed"] = {"state": state}
            if state in _DECISIONS:
                out["case.decision"] = {"state": state, "review_actions": actions}
            reason = cs.attention_for(state, actions.values())
            if reason is not None:
                out["case.needs_attention"] = {"reason": reason, "state": state}
    if event in _ORDER_ATTENTION:
        out["order.needs_attention"] = {"reason": _ORDER_ATTENTION[event]}
        if event == "lines_not_sent":
            out["order.needs_attention"]["sequences"] = _ints(detail.get("sequences"))
    return out


def _ints(value: Any) -> list[int]:
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def announce(conn: sa.Connection, *, org_id: str, order_id: str, case_id: str | None,
             event: str, at: dt.datetime, detail: dict | None) -> int:
    """Queue the order/case webhooks a timeline event causes, in its transaction.

    Called by `timeline.record` for every event; returns the number of deliveries. Costs
    nothing for a kind no webhook announces, one memoized SELECT when the organization
    subscribes to none of the kinds it does announce.
    """
    if event not in TIMELINE_KINDS:
        return 0
    subs = subscriptions(conn, org_id)
    if not subs:
        return 0
    wanted = set().union(*((s["events"] or ()) for s in subs))
    fields = {k: v for k, v in event_types(event, detail).items() if k in wanted}
    if not fields:
        return 0
    now = clock.now()
    bodies = {event_type: {"type": event_type, "timestamp": clock.isoformat(now), "data": {
        "order_id": order_id, "case_id": case_id, "event": event,
        "occurred_at": clock.isoformat(at), **extra}}
        for event_type, extra in fields.items()}
    return _queue(conn, org_id, bodies, subs, now)


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
    with services.engine.begin() as conn:
        now = repo.db_now(conn)  # leases and due times on the shared clock (F16)
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
    with services.engine.begin() as conn:
        now = repo.db_now(conn)
        if error is None:
            rc.update_delivery(conn, delivery_id, status="delivered", delivered_at=now,
                               claimed_until=None, last_status_code=status, last_error=None)
            rc.update_subscription(conn, sub["id"], consecutive_failures=0)
            return "delivered"
        failures = _count_failure(conn, sub["id"])
        if attempt <= len(RETRY_SCHEDULE):
            at = now + dt.timedelta(seconds=RETRY_SCHEDULE[attempt - 1])
            rc.update_delivery(conn, delivery_id, claimed_until=None, next_attempt_at=at,
                               last_status_code=status, last_error=error[:300])
            repo.add_outbox(conn, "deliver_webhook", delivery_id, now, available_at=at)
            log.info("webhook delivery failed; retry scheduled",
                     extra={"delivery_id": delivery_id, "attempt": attempt})
            return "retry"
        rc.update_delivery(conn, delivery_id, status="failed", claimed_until=None,
                           next_attempt_at=None, last_status_code=status,
                           last_error=error[:300])
        if failures >= DISABLE_AFTER_FAILURES:
            rc.update_subscription(conn, sub["id"], disabled_at=now, disabled_reason=(
                f"disabled after {failures} consecutive failed attempts; last: {error}")[:300])
            log.warning("webhook subscription disabled", extra={"subscription_id": sub["id"]})
        return "failed"


def _count_failure(conn: sa.Connection, sub_id: str) -> int:
    """Add one to the subscription's consecutive failures in the database (two workers
    failing at once both count: a read-modify-write lost one) and return the new count."""
    s = rc.t.webhook_subscriptions
    count = conn.execute(s.update().where(s.c.id == sub_id).values(
        consecutive_failures=s.c.consecutive_failures + 1).returning(
        s.c.consecutive_failures)).scalar()
    return int(count or 0)


def due_deliveries(services: Services, now: dt.datetime) -> list[str]:
    """Deliveries whose time came but whose message may be gone (for the scheduler sweep)."""
    stale = now - dt.timedelta(seconds=services.settings.sweep_after_seconds)
    with services.engine.connect() as conn:
        return rc.due_deliveries(conn, now, stale)
