"""Who hears about an order event, and sending it exactly once (issue 6).

`plan` runs inside the transaction of the event that causes it (called by `timeline.record`)
and writes one `notifications` row per recipient and channel plus an outbox row for the
sender; it never sends anything itself, so a notification exists exactly when its event
committed. The row is unique on (order_id, event, version, recipient, channel): a repeated
event (a duplicate payer callback never gets this far: the case state machine drops it)
can never make a second row.

`send` is one attempt: claim the row with a lease (a conditional update), render, send with
the notification id as idempotency key, then record the provider's message id and status.
Transient failures retry with backoff through a delayed outbox row; permanent ones (bad
address, 4xx, channel not configured) are recorded as `failed`, shown on the timeline and
never retried. Logs, metrics and queue messages carry ids only, never addresses or text.

The address is copied onto the row when it is planned (`notifications.address`), so editing
the contacts later never redirects a planned message. Opt-outs (an SMS `STOP`, an email
unsubscribe link) are checked when sending, on the keyed hash of that address: a patient or
caregiver row for an opted-out address becomes `suppressed` (reason `opted_out`), shown on
the timeline and counted, never silently dropped. Provider contacts are not affected. A contact
whose entry for that very address now says `channel: none` is suppressed the same way
(reason `channel_none`): the snapshot keeps a message on course, not against a stated wish.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import random
from typing import Any

import sqlalchemy as sa
from prometheus_client import Counter

from authsvc.adapters.db import batch, repo
from authsvc.adapters.db import tables as t
from authsvc.domain import clock, ids
from authsvc.service_layer import failpoints

log = logging.getLogger(__name__)

SENDS = Counter("authsvc_notifications", "Notification send attempts by channel and result",
                ["channel", "result"])  # result: sent | failed | retry | suppressed
PLANNED = Counter("authsvc_notifications_planned", "Notifications planned, by channel",
                  ["channel"])
OPTOUTS = Counter("authsvc_notification_optouts", "Opt-out and opt-in requests applied",
                  ["channel", "action"])  # action: opt_out | opt_in
ALL_ORGS = "*"  # an SMS STOP reaches the sending number every organization shares
OPTED_OUT = "opted_out"
CHANNEL_NONE = "channel_none"
ADDRESS_CHANGED = "address_changed"  # the planned address is no longer the patient's

LEASE = dt.timedelta(seconds=60)
MAX_ATTEMPTS = 10
FAMILY = ("patient", "caregiver")
CHANNELS = ("email", "sms")

#: timeline event → notification event (None: nobody is told)
EVENTS = {
    "order_received": "received",
    "no_auth_required": "no_auth_needed",
    "eligibility_inactive": "coverage_problem",
    "eligibility_member_not_found": "coverage_problem",
    "case_info_requested": "documentation_needed",
    "case_approved": "approved",
    "case_partially_approved": "partially_approved",
    "case_modified": "modified",
    "case_denied": "denied",
    "order_cancelled": "cancelled",
    "decision_overdue": "overdue",
}
FAMILY_EVENTS = ("received", "no_auth_needed", "documentation_needed", "coverage_problem",
                 "approved", "partially_approved", "modified", "denied", "cancelled")
PROVIDER_EVENTS = ("documentation_needed", "no_auth_needed", "coverage_problem", "approved",
                   "partially_approved", "modified", "denied", "cancelled", "overdue")
LINE_OUTCOME = {"A1": "approved", "A2": "partially approved", "A3": "denied", "A4": "pended",
                "A6": "modified", "NA": "no authorization required", "C": "cancelled",
                "CT": "contact the payer"}


def notification_event(event: str, detail: dict | None) -> str | None:
    """The notification an order event causes, if any."""
    if event == "case_opened":
        return "documentation_needed" if (detail or {}).get("state") == "needs_input" else None
    return EVENTS.get(event)


# ------------------------------------------------------------------ planning


def recipients(conn: sa.Connection, org_id: str, order_id: str, kind: str,
               contacts: list | None = None) -> list[dict]:
    """Who hears about `kind`: each patient/caregiver contact on its channel, the provider.
    `contacts`: the patient's contacts when the caller holds them (order intake)."""
    out: list[dict] = []
    if kind in FAMILY_EVENTS:
        if contacts is None:
            contacts = conn.execute(
                sa.select(t.patients.c.contacts).select_from(
                    t.orders.join(t.patients, t.patients.c.id == t.orders.c.patient_id))
                .where(t.orders.c.id == order_id)).scalar() or []
        for index, contact in enumerate(contacts):
            if not isinstance(contact, dict):
                continue
            channel = contact.get("channel")
            if channel not in CHANNELS:  # `none` (or nothing): this contact hears nothing
                continue
            role = contact.get("role") if contact.get("role") in FAMILY else "caregiver"
            language = contact.get("language") if contact.get("language") in ("en", "es") else "en"
            address = contact.get("email" if channel == "email" else "phone")
            out.append({"recipient": f"contact:{index}", "audience": role, "channel": channel,
                        "language": language, "address": address or None,
                        "problem": None if address else f"the contact has no {channel} address"})
    if kind in PROVIDER_EVENTS:
        org = conn.execute(sa.select(t.organizations.c.provider_email,
                                     t.organizations.c.provider_webhook_url)
                           .where(t.organizations.c.id == org_id)).first()
        if org is not None and org.provider_email:
            out.append({"recipient": "provider", "audience": "provider", "channel": "email",
                        "language": "en", "address": org.provider_email, "problem": None})
        if org is not None and org.provider_webhook_url:
            out.append({"recipient": "provider", "audience": "provider", "channel": "webhook",
                        "language": "en", "address": org.provider_webhook_url,
                        "problem": None})
    return out


def _insert_ignoring_duplicates(conn: sa.Connection, values: dict) -> bool:
    """INSERT … ON CONFLICT DO NOTHING on the notification's unique key; True when inserted."""
    # rowcount is -1 here on psycopg: RETURNING says whether the row went in
    return conn.execute(_insert_once(conn.dialect.name), values).first() is not None


@functools.cache
def _insert_once(dialect: str) -> sa.Executable:
    """The insert, built once per dialect (it runs on every order event, intake included)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    return insert(t.notifications).on_conflict_do_nothing(
        index_elements=["order_id", "event", "version", "recipient", "channel"],
    ).returning(t.notifications.c.id)


def plan(conn: sa.Connection, *, org_id: str, order_id: str, case_id: str | None, event: str,
         at: dt.datetime, detail: dict | None = None, contacts: list | None = None) -> None:
    """Write the notification rows (and their outbox rows) that `event` causes, in its
    transaction; the version counts occurrences of the notification event on the order."""
    from authsvc.adapters.notify import render

    kind = notification_event(event, detail)
    if kind is None:
        return
    targets = recipients(conn, org_id, order_id, kind, contacts)
    if not targets:
        return
    n = t.notifications
    # An order is received once, in its own intake transaction: version 1, nothing to read
    # and nothing its rows could duplicate, so they are queued with the order's other rows.
    first = kind == "received"
    version = 1 if first else 1 + (conn.execute(sa.select(sa.func.max(n.c.version)).where(
        n.c.order_id == order_id, n.c.event == kind)).scalar() or 0)
    for target in targets:
        notification_id = ids.new_id("ntf")
        failed = target["problem"] is not None
        values = {
            "id": notification_id, "org_id": org_id, "order_id": order_id, "case_id": case_id,
            "event": kind, "version": version, "recipient": target["recipient"],
            "audience": target["audience"], "channel": target["channel"],
            "language": target["language"],
            "template": render.template_name(kind, target["audience"], target["channel"],
                                             target["language"]),
            "status": "failed" if failed else "queued", "attempts": 0,
            "next_attempt_at": None if failed else at, "last_error": target["problem"],
            "created_at": at, "address": target["address"],
        }
        if first:
            batch.add(conn, n, values)
        elif not _insert_ignoring_duplicates(conn, values):
            continue
        PLANNED.labels(target["channel"]).inc()
        if failed:
            _timeline(conn, values, "failed", at)
            SENDS.labels(target["channel"], "failed").inc()
        else:
            repo.add_outbox(conn, "send_notification", notification_id, at)


def _timeline(conn: sa.Connection, row: dict, status: str, at: dt.datetime,
              reason: str | None = None) -> None:
    """The order's timeline shows the notification: who (role), how, which template, status."""
    detail = {"notification_id": row["id"], "recipient": row["audience"],
              "channel": row["channel"], "template": row["template"], "status": status}
    if status == "failed":
        detail["attempts"] = row.get("attempts") or 0
    if status == "suppressed":
        detail["reason"] = reason or OPTED_OUT
    repo.add_timeline(conn, org_id=row["org_id"], order_id=row["order_id"], at=at,
                      event=f"notification_{status}", actor="system", case_id=row["case_id"],
                      detail=detail)


# ------------------------------------------------------------------ content


def _date(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, dt.date) else value


def context(conn: sa.Connection, row: dict, public_url: str) -> dict:
    """What the templates may show for this notification (read at send time)."""
    order = repo.order_row(conn, row["order_id"])
    assert order is not None
    org = conn.execute(sa.select(t.organizations.c.name)
                       .where(t.organizations.c.id == row["org_id"])).scalar()
    order_lines = repo.order_lines(conn, row["order_id"])
    dets = [line["determination"] or {} for line in order_lines]
    case = repo.case_row(conn, row["case_id"]) if row["case_id"] else None
    lines: list[dict] = []
    for line in repo.case_lines(conn, row["case_id"]) if row["case_id"] else []:
        lines.append({
            "sequence": line["sequence"], "code_system": line["code_system"],
            "code": line["code"], "requested": line["quantity"],
            "outcome": LINE_OUTCOME.get(line["review_action"] or ""),
            "review_action": line["review_action"],
            "approved": line["authorized_quantity"], "approved_code": line["code"],
            "auth_number": line["auth_number"], "valid_from": _date(line["valid_from"]),
            "valid_to": _date(line["valid_to"]), "denial_code": line["denial_code"],
            "denial_text": line["denial_text"],
        })
    granted = [x for x in lines if x["review_action"] in ("A1", "A2", "A6")]
    denied = [x for x in lines if x["review_action"] == "A3"]
    codes: list[str | None] = []
    for x in denied:
        if x["denial_code"] not in codes:
            codes.append(x["denial_code"])
    changes = [x for x in lines if x["review_action"] == "A6" or (
        x["approved"] is not None and x["approved"] != x["requested"])]
    return {
        "org_name": org or row["org_id"], "order_id": order["id"],
        "patient_id": order["patient_id"],
        "external_id": order["external_id"], "case_id": row["case_id"],
        "link": f"{public_url}/v1/orders/{order['id']}",
        "pa_needed": any(d.get("pa_needed") in ("auth-needed", "conditional") for d in dets),
        "documents": sorted({doc for d in dets for doc in d.get("doc_needed") or ()}),
        "coverage": order["eligibility_status"],
        "lines": lines, "changes": changes, "reason_codes": codes or [None],
        "valid_from": granted[0]["valid_from"] if granted else None,
        "valid_to": granted[0]["valid_to"] if granted else None,
        "decision_due_at": clock.isoformat(case["decision_due_at"]) if case else None,
        "sent_to_payer": bool(case and case["submitted_at"]),
    }


def webhook_payload(row: dict, ctx: dict, text: str) -> dict:
    """The provider webhook body: ids, codes and decisions (no patient details)."""
    return {"type": f"notification.{row['event']}", "timestamp": clock.isoformat(clock.now()),
            "data": {"notification_id": row["id"], "event": row["event"],
                     "version": row["version"], "order_id": ctx["order_id"],
                     "external_id": ctx["external_id"], "case_id": ctx["case_id"],
                     "lines": [{k: v for k, v in x.items() if k != "approved_code"}
                               for x in ctx["lines"]],
                     "changes": [{"sequence": x["sequence"], "requested": x["requested"],
                                  "authorized": x["approved"]} for x in ctx["changes"]],
                     "text": text, "link": ctx["link"]}}


def _address(conn: sa.Connection, row: dict) -> str | None:
    """Where the notification goes: the address copied when it was planned; rows planned
    before that column existed (NULL) still look the contact up."""
    if row.get("address"):
        return row["address"]
    if row["recipient"] == "provider":
        org = conn.execute(sa.select(t.organizations.c.provider_email,
                                     t.organizations.c.provider_webhook_url)
                           .where(t.organizations.c.id == row["org_id"])).first()
        if org is None:
            return None
        return org.provider_email if row["channel"] == "email" else org.provider_webhook_url
    index = int(row["recipient"].split(":", 1)[1])
    contacts = conn.execute(
        sa.select(t.patients.c.contacts).select_from(
            t.orders.join(t.patients, t.patients.c.id == t.orders.c.patient_id))
        .where(t.orders.c.id == row["order_id"])).scalar() or []
    if index >= len(contacts) or not isinstance(contacts[index], dict):
        return None
    contact = contacts[index]
    if contact.get("channel") != row["channel"]:
        return None  # the contact changed its channel (e.g. to `none`) since the event
    return contact.get("email" if row["channel"] == "email" else "phone")


# ------------------------------------------------------------------ sending


def claim(conn: sa.Connection, notification_id: str, now: dt.datetime,
          lease: dt.timedelta = LEASE) -> bool:
    """Conditional update that takes the lease; the rowcount says whether we won."""
    return repo.claim_due(conn, t.notifications, notification_id, "queued", now, lease)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with equal jitter: at least half the step, so retries spread."""
    step = min(cap, base * (2 ** max(0, attempt - 1)))
    return step / 2 + random.uniform(0, step / 2)  # noqa: S311 - jitter, not security


def unsubscribe_url(settings: Any, row: dict, address: str) -> str:
    """The signed link that stops this organization's emails to this address."""
    from authsvc.adapters.notify import optout

    token = optout.make_token(
        settings.notify_secret, org_id=row["org_id"], channel="email",
        hashed=optout.address_hash(settings.notify_secret, "email", address),
        notification_id=row["id"], language=row["language"])
    return f"{settings.public_url}/v1/notifications/unsubscribe?token={token}"


def _deliver(services: Any, row: dict, address: str, ctx: dict) -> str:
    from authsvc.adapters.notify import Permanent, render

    settings = services.settings
    headers: dict[str, str] = {}
    if row["channel"] == "email" and row["audience"] in FAMILY:
        url = unsubscribe_url(settings, row, address)
        ctx = {**ctx, "unsubscribe_url": url}
        headers = {"List-Unsubscribe": f"<{url}>",  # RFC 2369, one-click per RFC 8058
                   "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    message = render.render(row["event"], row["audience"], row["channel"], row["language"], ctx)
    _check_still_wanted(services, row, address)
    if row["channel"] == "email":
        if not settings.smtp_url:
            raise Permanent("email is not configured (AUTHSVC_SMTP_URL)")
        from authsvc.adapters.notify import email

        return email.send(settings.smtp_url, address, message.subject, message.text,
                          message.html, row["id"], headers=headers)
    if row["channel"] == "sms":
        if not settings.sms_url:
            raise Permanent("SMS is not configured (AUTHSVC_SMS_URL)")
        from authsvc.adapters.notify import sms

        return sms.send(settings.sms_url, address, message.text, row["id"])
    if row["channel"] == "webhook":
        from authsvc.adapters.notify import webhook

        secret = webhook.org_secret(settings.provider_webhook_secret, row["org_id"])
        return webhook.send(address, secret, row["id"], webhook_payload(row, ctx, message.text),
                            settings.webhook_allowlist)
    raise Permanent(f"unknown channel {row['channel']}")


class _SilencedMeanwhile(Exception):  # noqa: N818 - not an error: a reason to stop
    """The recipient opted out (or the address changed) after the claim: not sent."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _check_still_wanted(services: Any, row: dict, address: str) -> None:
    """Ask again right before the message leaves: a STOP or an unsubscribe that arrived
    after the claim's transaction (while the message was being rendered, or while an earlier
    attempt waited for its retry) stops it. What remains is the time the provider call itself
    takes (docs/operations.md › Notifications)."""
    if row["audience"] not in FAMILY:
        return
    with services.engine.connect() as conn:
        reason = _silenced(conn, services.settings.notify_secret, row, address)
    if reason is not None:
        raise _SilencedMeanwhile(reason)


def _suppress(conn: sa.Connection, row: dict, reason: str, now: dt.datetime) -> None:
    n = t.notifications
    conn.execute(n.update().where(n.c.id == row["id"]).values(
        status="suppressed", claimed_until=None, next_attempt_at=None, last_error=reason))
    _timeline(conn, row, "suppressed", now, reason)


def _count_suppressed(row: dict, reason: str) -> str:
    SENDS.labels(row["channel"], "suppressed").inc()
    log.info("notification suppressed", extra={"notification_id": row["id"],
                                                "channel": row["channel"], "reason": reason})
    return "suppressed"


def send(services: Any, notification_id: str) -> str:
    """One attempt at one notification: `sent`, `retry`, `failed`, `suppressed` (the
    address opted out) or `skipped` (nothing to do: done already, not due, or leased)."""
    from authsvc.adapters.notify import Permanent, SendError, Transient

    n = t.notifications
    with services.engine.begin() as conn:
        now = repo.db_now(conn)  # leases and due times on the shared clock (F16)
        lease = dt.timedelta(seconds=services.settings.lease_seconds)
        if not claim(conn, notification_id, now, lease):
            return "skipped"  # sent, failed, not due, or another worker holds the lease
        row = dict(conn.execute(sa.select(n).where(n.c.id == notification_id)).mappings().one())
        address = _address(conn, row)
        reason = _silenced(conn, services.settings.notify_secret, row, address)
        if reason is not None:
            _suppress(conn, row, reason, now)
        else:
            ctx = context(conn, row, services.settings.public_url) if address else {}
    if reason is not None:  # counted once committed
        return _count_suppressed(row, reason)
    error: SendError | None = None
    provider_id: str | None = None
    if not address:
        error = Permanent(f"no {row['channel']} address for the recipient")
    else:
        try:
            provider_id = _deliver(services, row, address, ctx)
        except _SilencedMeanwhile as late:
            with services.engine.begin() as conn:
                _suppress(conn, row, late.reason, clock.now())
            return _count_suppressed(row, late.reason)
        except SendError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - a template or adapter bug is not retried forever
            error = Transient(f"unexpected: {type(exc).__name__}")
    failpoints.hit("NOTIFY_AFTER_SEND_BEFORE_COMMIT")
    with services.engine.begin() as conn:
        now = repo.db_now(conn)
        if error is None:
            conn.execute(n.update().where(n.c.id == notification_id).values(
                status="sent", sent_at=now, provider_message_id=provider_id,
                claimed_until=None, next_attempt_at=None, last_error=None))
            _timeline(conn, row, "sent", now)
            if row["audience"] in FAMILY:  # a disclosure of PHI: the audit trail records it
                repo.add_audit(conn, at=now, org_id=row["org_id"], role="system",
                               action="notify", entity_type="notification",
                               entity_id=notification_id, patient_id=ctx.get("patient_id"),
                               outcome="success")
            SENDS.labels(row["channel"], "sent").inc()
            return "sent"
        reason = str(error)[:300]
        if isinstance(error, Transient) and row["attempts"] < MAX_ATTEMPTS:
            at = now + dt.timedelta(seconds=backoff(row["attempts"],
                                                    services.settings.retry_base_seconds,
                                                    services.settings.retry_cap_seconds))
            conn.execute(n.update().where(n.c.id == notification_id).values(
                claimed_until=None, next_attempt_at=at, last_error=reason))
            repo.add_outbox(conn, "send_notification", notification_id, now, available_at=at)
            SENDS.labels(row["channel"], "retry").inc()
            log.info("notification send failed; retry scheduled",
                     extra={"notification_id": notification_id, "attempt": row["attempts"]})
            return "retry"
        conn.execute(n.update().where(n.c.id == notification_id).values(
            status="failed", claimed_until=None, next_attempt_at=None, last_error=reason))
        _timeline(conn, row, "failed", now)
        SENDS.labels(row["channel"], "failed").inc()
        log.warning("notification failed", extra={"notification_id": notification_id,
                                                  "channel": row["channel"]})
        return "failed"


def due(services: Any, now: dt.datetime, limit: int = 1000) -> list[str]:
    """Queued notifications whose message may be gone: due, lease free (for the sweeper)."""
    stale = now - dt.timedelta(seconds=services.settings.sweep_after_seconds)
    n = t.notifications
    with services.engine.connect() as conn:
        return list(conn.execute(sa.select(n.c.id).where(
            n.c.status == "queued",
            sa.or_(sa.and_(n.c.claimed_until.is_(None), n.c.next_attempt_at < stale),
                   n.c.claimed_until < now),
        ).order_by(n.c.next_attempt_at).limit(limit)).scalars().all())


# ------------------------------------------------------------------ opt-outs


def _silenced(conn: sa.Connection, secret: str, row: dict, address: str | None) -> str | None:
    """Why a patient/caregiver row must not go out (None: it may): the address opted out,
    the contact's entry for this address has since been set to `channel: none`, or the
    address planned is no longer among the patient's contacts for this channel (corrected:
    a queued or retrying message does not go to the old one)."""
    if not address or row["audience"] not in FAMILY:
        return None
    if opted_out(conn, secret, row["org_id"], row["channel"], address):
        return OPTED_OUT
    if row.get("address"):
        from authsvc.adapters.notify import optout

        field = "email" if row["channel"] == "email" else "phone"
        want = optout.normalize(row["channel"], address)
        channels = {contact.get("channel") for contact in _contacts(conn, row["order_id"])
                    if isinstance(contact, dict) and isinstance(contact.get(field), str)
                    and optout.normalize(row["channel"], contact[field]) == want}
        if "none" in channels:
            return CHANNEL_NONE
        if row["channel"] not in channels:  # corrected since planning: the old address
            return ADDRESS_CHANGED  # may be someone else's now, the new one was not planned
    return None


def _contacts(conn: sa.Connection, order_id: str) -> list:
    contacts = conn.execute(
        sa.select(t.patients.c.contacts).select_from(
            t.orders.join(t.patients, t.patients.c.id == t.orders.c.patient_id))
        .where(t.orders.c.id == order_id)).scalar()
    return contacts if isinstance(contacts, list) else []


def opted_out(conn: sa.Connection, secret: str, org_id: str, channel: str,
              address: str) -> bool:
    """Whether `address` asked this organization (or, for SMS, every one) for silence."""
    from authsvc.adapters.notify import optout

    o = t.notification_optouts
    hashed = optout.address_hash(secret, channel, address)
    return conn.execute(sa.select(o.c.id).where(
        o.c.org_id.in_((org_id, ALL_ORGS)), o.c.channel == channel,
        o.c.address_hash == hashed).limit(1)).first() is not None


def _insert_optout(conn: sa.Connection, values: dict) -> bool:
    o = t.notification_optouts
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    stmt = insert(o).values(**values).on_conflict_do_nothing(
        index_elements=["org_id", "channel", "address_hash"]).returning(o.c.id)
    return conn.execute(stmt).first() is not None


def opt_out(conn: sa.Connection, *, org_id: str, channel: str, hashed: str, reason: str,
            at: dt.datetime, notification_id: str | None = None,
            request_id: str | None = None, source_ip: str | None = None) -> bool:
    """Store an opt-out (idempotent) and audit it; True when it is new."""
    optout_id = ids.new_id("opt")
    new = _insert_optout(conn, {"id": optout_id, "org_id": org_id, "channel": channel,
                                "address_hash": hashed, "reason": reason[:40],
                                "notification_id": notification_id, "created_at": at})
    repo.add_audit(conn, at=at, org_id=None if org_id == ALL_ORGS else org_id,
                   role="contact", action="opt_out", entity_type="notification_optout",
                   entity_id=notification_id or (optout_id if new else None),
                   outcome="success", request_id=request_id, source_ip=source_ip,
                   reason=f"{reason}{'' if new else ':already'}"[:100])
    OPTOUTS.labels(channel, "opt_out").inc()
    return new


def opt_in(conn: sa.Connection, *, org_id: str, channel: str, hashed: str, reason: str,
           at: dt.datetime, request_id: str | None = None,
           source_ip: str | None = None) -> bool:
    """Remove an opt-out (an SMS START) and audit it; True when there was one."""
    o = t.notification_optouts
    removed = conn.execute(o.delete().where(o.c.org_id == org_id, o.c.channel == channel,
                                            o.c.address_hash == hashed)).rowcount
    repo.add_audit(conn, at=at, org_id=None if org_id == ALL_ORGS else org_id,
                   role="contact", action="opt_in", entity_type="notification_optout",
                   entity_id=None, outcome="success", request_id=request_id,
                   source_ip=source_ip, reason=f"{reason}{'' if removed else ':none'}"[:100])
    OPTOUTS.labels(channel, "opt_in").inc()
    return bool(removed)


def sms_auth_token(settings: Any) -> str | None:
    """The token inbound texts are signed with: AUTHSVC_SMS_AUTH_TOKEN, else the password
    of AUTHSVC_SMS_URL (Twilio signs with the account's auth token)."""
    if settings.sms_auth_token:
        return settings.sms_auth_token
    if settings.sms_url:
        import urllib.parse

        try:
            password = urllib.parse.urlsplit(settings.sms_url).password
        except ValueError:
            return None
        return urllib.parse.unquote(password) if password else None
    return None


def sms_reply(services: Any, phone: str, body: str, at: dt.datetime,
              request_id: str | None = None, source_ip: str | None = None) -> str | None:
    """An inbound text: `STOP` (and its synonyms) opts the number out of every
    organization's texts, `START`/`UNSTOP` opts it back in; anything else is ignored (and
    not stored). Returns `opt_out`, `opt_in` or None."""
    from authsvc.adapters.notify import optout

    word = optout.keyword(body)
    if word is None:
        return None
    hashed = optout.address_hash(services.settings.notify_secret, "sms", phone)
    reason = "sms_" + "_".join(body.strip().rstrip(".!").lower().split())
    with services.engine.begin() as conn:
        if word == "stop":
            opt_out(conn, org_id=ALL_ORGS, channel="sms", hashed=hashed, reason=reason, at=at,
                    request_id=request_id, source_ip=source_ip)
            return "opt_out"
        opt_in(conn, org_id=ALL_ORGS, channel="sms", hashed=hashed, reason=reason, at=at,
               request_id=request_id, source_ip=source_ip)
        return "opt_in"


def org_name(conn: sa.Connection, org_id: str) -> str:
    return conn.execute(sa.select(t.organizations.c.name).where(
        t.organizations.c.id == org_id)).scalar() or org_id


# ------------------------------------------------------------------ reading


def admin_list(conn: sa.Connection, org_id: str, order_id: str | None, after: str | None,
               limit: int) -> dict:
    """The organization's notifications, oldest first: never the text or the address."""
    n = t.notifications
    q = sa.select(n).where(n.c.org_id == org_id)
    if order_id:
        q = q.where(n.c.order_id == order_id)
    if after:
        q = q.where(n.c.id > after)
    rows = conn.execute(q.order_by(n.c.id).limit(limit + 1)).mappings().all()
    more = len(rows) > limit
    rows = rows[:limit]
    items = [{
        "id": r["id"], "order_id": r["order_id"], "case_id": r["case_id"], "event": r["event"],
        "version": r["version"], "audience": r["audience"], "channel": r["channel"],
        "language": r["language"], "template": r["template"], "status": r["status"],
        "attempts": r["attempts"], "last_error": r["last_error"],
        "created_at": clock.isoformat(r["created_at"]), "sent_at": clock.isoformat(r["sent_at"]),
    } for r in rows]
    return {"items": items, "next_cursor": rows[-1]["id"] if more and rows else None}
