"""SQL for the coordinator's worklist, case actions, webhook subscriptions and reports.

Like `repo`, every function takes an open connection and is scoped by organization wherever
a caller can name an id.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from authsvc.adapters.db import tables as t
from authsvc.adapters.db.repo import claim_due
from authsvc.domain import cases as cs

Row = dict[str, Any]

OPEN_STATES = sorted(s for s in cs.STATES if cs.is_open(s))


def _rows(conn: sa.Connection, stmt: sa.Executable) -> list[Row]:
    return [dict(r) for r in conn.execute(stmt).mappings().all()]


def _one(conn: sa.Connection, stmt: sa.Executable) -> Row | None:
    row = conn.execute(stmt).mappings().first()
    return dict(row) if row is not None else None


# ------------------------------------------------------------------ worklist


@dataclasses.dataclass(frozen=True)
class WorklistFilter:
    states: tuple[str, ...] = ()
    payer_id: str | None = None
    urgency: str | None = None
    overdue: bool | None = None
    needs_attention: bool | None = None
    due_before: dt.datetime | None = None
    assignee: str | None = None
    q: str | None = None


def count_by_state(conn: sa.Connection, org_id: str, states: tuple[str, ...]) -> dict[str, int]:
    """How many of the organization's cases are in each of `states` (one grouped query)."""
    c = t.cases
    rows = conn.execute(sa.select(c.c.state, sa.func.count()).where(
        c.c.org_id == org_id, c.c.state.in_(list(states))).group_by(c.c.state)).all()
    return {state: count for state, count in rows}


def worklist(conn: sa.Connection, org_id: str, f: WorklistFilter, now: dt.datetime,
             after: tuple[dt.datetime | None, str] | None, limit: int) -> list[Row]:
    """Cases by `decision_due_at` ascending, nulls last, then id (a stable keyset order).

    The sort key of a row never depends on other rows, so a page boundary stays put while
    cases are inserted: every case present for the whole walk is returned exactly once.
    """
    c, o = t.cases, t.orders
    q = (sa.select(c, o.c.external_id)
         .select_from(c.join(o, o.c.id == c.c.order_id))
         .where(c.c.org_id == org_id))
    if f.states:
        q = q.where(c.c.state.in_(list(f.states)))
    if f.payer_id:
        q = q.where(c.c.payer_id == f.payer_id)
    if f.urgency:
        q = q.where(c.c.urgency == f.urgency)
    overdue = sa.and_(c.c.state.in_(OPEN_STATES), c.c.decision_due_at < now)
    if f.overdue is True:
        q = q.where(overdue)
    elif f.overdue is False:
        q = q.where(sa.not_(overdue) | c.c.decision_due_at.is_(None))
    attention = sa.or_(c.c.attention_reason.is_not(None), overdue)
    if f.needs_attention is True:
        q = q.where(attention)
    elif f.needs_attention is False:
        q = q.where(c.c.attention_reason.is_(None),
                    sa.or_(c.c.decision_due_at.is_(None), sa.not_(overdue)))
    if f.due_before is not None:
        q = q.where(c.c.decision_due_at < f.due_before)
    if f.assignee is not None:
        q = q.where(c.c.assignee == f.assignee)
    if f.q:
        pattern = "%" + f.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        q = q.where(o.c.external_id.ilike(pattern, escape="\\"))
    # Two index-friendly range scans instead of one OR: dated cases after the cursor in
    # (decision_due_at, id) order, then undated ones by id (PostgreSQL sorts NULLs last).
    order = (c.c.decision_due_at.asc(), c.c.id.asc())
    due, case_id = after if after is not None else (None, None)
    rows: list[Row] = []
    if after is None or due is not None:
        dated = q.where(c.c.decision_due_at.is_not(None))
        if due is not None:
            dated = dated.where(sa.tuple_(c.c.decision_due_at, c.c.id) > (due, case_id))
        rows = _rows(conn, dated.order_by(*order).limit(limit))
    if len(rows) < limit:
        undated = q.where(c.c.decision_due_at.is_(None))
        if due is None and case_id is not None:
            undated = undated.where(c.c.id > case_id)
        rows += _rows(conn, undated.order_by(c.c.id.asc()).limit(limit - len(rows)))
    return rows


def last_events(conn: sa.Connection, cases: Sequence[Row]) -> dict[str, Row]:
    """The newest timeline event of each case (one query for a whole page).

    Filtered by order id too: the timeline is indexed by (order_id, id), not by case.
    """
    if not cases:
        return {}
    te = t.timeline_events
    newest = (sa.select(sa.func.max(te.c.id))
              .where(te.c.order_id.in_({r["order_id"] for r in cases}),
                     te.c.case_id.in_([r["id"] for r in cases]))
              .group_by(te.c.case_id))
    rows = _rows(conn, sa.select(te.c.case_id, te.c.at, te.c.event, te.c.actor)
                 .where(te.c.id.in_(newest)))
    return {r["case_id"]: r for r in rows}


# ------------------------------------------------------------------ case detail


def case_timeline(conn: sa.Connection, case_id: str) -> list[Row]:
    te = t.timeline_events
    return _rows(conn, sa.select(te).where(te.c.case_id == case_id).order_by(te.c.at, te.c.id))


def case_notes(conn: sa.Connection, case_id: str) -> list[Row]:
    n = t.case_notes
    return _rows(conn, sa.select(n).where(n.c.case_id == case_id)
                 .order_by(n.c.created_at, n.c.id))


def add_note(conn: sa.Connection, values: dict) -> None:
    conn.execute(t.case_notes.insert().values(**values))


def exchange_bodies(conn: sa.Connection, case_id: str) -> dict[int, Row]:
    x = t.payer_exchanges
    rows = _rows(conn, sa.select(x.c.id, x.c.url, x.c.request_body, x.c.response_body)
                 .where(x.c.case_id == case_id))
    return {r["id"]: r for r in rows}


def info_requests(conn: sa.Connection, case_id: str) -> list[Row]:
    ir = t.info_requests
    return _rows(conn, sa.select(ir).where(ir.c.case_id == case_id)
                 .order_by(ir.c.requested_at, ir.c.id))


def answer_info_requests(conn: sa.Connection, case_id: str, now: dt.datetime) -> str | None:
    """Mark the case's open info requests answered; returns the oldest one's id."""
    ir = t.info_requests
    open_ids = conn.execute(sa.select(ir.c.id).where(ir.c.case_id == case_id,
                                                     ir.c.answered_at.is_(None))
                            .order_by(ir.c.requested_at)).scalars().all()
    if open_ids:
        conn.execute(ir.update().where(ir.c.id.in_(open_ids)).values(answered_at=now))
    return open_ids[0] if open_ids else None


def insert_attachment(conn: sa.Connection, values: dict) -> None:
    conn.execute(t.attachments.insert().values(**values))


def attachments_of_case(conn: sa.Connection, case_id: str) -> list[Row]:
    a = t.attachments
    return _rows(conn, sa.select(a.c.id, a.c.filename, a.c.content_type, a.c.size, a.c.sha256,
                                 a.c.loinc, a.c.created_by, a.c.created_at, a.c.sent_at)
                 .where(a.c.case_id == case_id).order_by(a.c.created_at, a.c.id))


def attachment(conn: sa.Connection, org_id: str, case_id: str, attachment_id: str) -> Row | None:
    a = t.attachments
    return _one(conn, sa.select(a).where(a.c.id == attachment_id, a.c.case_id == case_id,
                                         a.c.org_id == org_id))


def open_linked_case(conn: sa.Connection, case_id: str) -> Row | None:
    """A newer case linked to this one that is still open (one appeal at a time)."""
    c = t.cases
    return _one(conn, sa.select(c.c.id, c.c.state).where(
        c.c.related_case_id == case_id, c.c.state.in_(OPEN_STATES)).limit(1))


# ------------------------------------------------------------------ webhooks


def insert_subscription(conn: sa.Connection, values: dict) -> None:
    conn.execute(t.webhook_subscriptions.insert().values(consecutive_failures=0, **values))


def subscription(conn: sa.Connection, org_id: str | None, sub_id: str) -> Row | None:
    s = t.webhook_subscriptions
    q = sa.select(s).where(s.c.id == sub_id, s.c.deleted_at.is_(None))
    if org_id is not None:
        q = q.where(s.c.org_id == org_id)
    return _one(conn, q)


def subscriptions(conn: sa.Connection, org_id: str, after: str | None, limit: int) -> list[Row]:
    s = t.webhook_subscriptions
    q = sa.select(s).where(s.c.org_id == org_id, s.c.deleted_at.is_(None))
    if after:
        q = q.where(s.c.id > after)
    return _rows(conn, q.order_by(s.c.id).limit(limit))


def active_subscriptions(conn: sa.Connection, org_id: str) -> list[Row]:
    s = t.webhook_subscriptions
    return _rows(conn, sa.select(s.c.id, s.c.events).where(
        s.c.org_id == org_id, s.c.deleted_at.is_(None), s.c.disabled_at.is_(None)))


def update_subscription(conn: sa.Connection, sub_id: str, **values: Any) -> None:
    s = t.webhook_subscriptions
    conn.execute(s.update().where(s.c.id == sub_id).values(**values))


def insert_deliveries(conn: sa.Connection, rows: Sequence[dict]) -> None:
    if rows:
        conn.execute(t.webhook_deliveries.insert(), list(rows))


def delivery(conn: sa.Connection, delivery_id: str) -> Row | None:
    d = t.webhook_deliveries
    return _one(conn, sa.select(d).where(d.c.id == delivery_id))


def claim_delivery(conn: sa.Connection, delivery_id: str, now: dt.datetime,
                   lease: dt.timedelta) -> bool:
    return claim_due(conn, t.webhook_deliveries, delivery_id, "pending", now, lease)


def update_delivery(conn: sa.Connection, delivery_id: str, **values: Any) -> None:
    d = t.webhook_deliveries
    conn.execute(d.update().where(d.c.id == delivery_id).values(**values))


def deliveries(conn: sa.Connection, sub_id: str, after: str | None, limit: int) -> list[Row]:
    """The delivery log of a subscription, newest first (ids are time-ordered)."""
    d = t.webhook_deliveries
    q = sa.select(d.c.id, d.c.event_type, d.c.event_id, d.c.status, d.c.attempts,
                  d.c.next_attempt_at, d.c.last_status_code, d.c.last_error, d.c.created_at,
                  d.c.delivered_at).where(d.c.subscription_id == sub_id)
    if after:
        q = q.where(d.c.id < after)
    return _rows(conn, q.order_by(d.c.id.desc()).limit(limit))


def reopen_deliveries(conn: sa.Connection, sub_id: str, now: dt.datetime,
                      delivery_ids: Iterable[str] | None) -> list[str]:
    """Make failed (or the named) deliveries pending again, due now; returns their ids.

    A delivery a worker holds a live lease on is being sent right now and is left alone:
    resetting its lease would let a second worker POST it again while the first still is
    (its own outcome, delivered or a retry, follows). One conditional UPDATE, so a claim
    that lands meanwhile is never overwritten."""
    d = t.webhook_deliveries
    q = d.update().where(d.c.subscription_id == sub_id,
                         sa.or_(d.c.claimed_until.is_(None), d.c.claimed_until < now))
    if delivery_ids is None:
        q = q.where(d.c.status.in_(["failed", "pending"]))
    else:
        q = q.where(d.c.id.in_(list(delivery_ids)))
    return sorted(conn.execute(q.values(status="pending", next_attempt_at=now,
                                        claimed_until=None, attempts=0)
                               .returning(d.c.id)).scalars().all())


def due_deliveries(conn: sa.Connection, now: dt.datetime, before: dt.datetime,
                   limit: int = 1000) -> list[str]:
    """Pending deliveries due since `before` with a free lease and a live subscription."""
    d, s = t.webhook_deliveries, t.webhook_subscriptions
    q = (sa.select(d.c.id).select_from(d.join(s, s.c.id == d.c.subscription_id))
         .where(d.c.status == "pending", d.c.next_attempt_at < before,
                sa.or_(d.c.claimed_until.is_(None), d.c.claimed_until < now),
                s.c.deleted_at.is_(None), s.c.disabled_at.is_(None))
         .limit(limit))
    return list(conn.execute(q).scalars().all())


def outcome_by_id(conn: sa.Connection, outcome_id: str) -> Row | None:
    return _one(conn, sa.select(t.outcomes).where(t.outcomes.c.id == outcome_id))


# ------------------------------------------------------------------ reports


def decided_cases(conn: sa.Connection, org_id: str, *, start: dt.datetime, end: dt.datetime,
                  payer_id: str | None) -> list[Row]:
    """Cases decided in [start, end) with their lines' review actions (for the report)."""
    c, cl = t.cases, t.case_lines
    q = (sa.select(c.c.id, c.c.kind, c.c.payer_id, c.c.urgency, c.c.state,
                   c.c.payer_received_at, c.c.submitted_at, c.c.decided_at)
         .where(c.c.org_id == org_id, c.c.decided_at >= start, c.c.decided_at < end))
    if payer_id:
        q = q.where(c.c.payer_id == payer_id)
    cases = _rows(conn, q)
    if not cases:
        return []
    actions: dict[str, list[str | None]] = {}
    ids = [r["id"] for r in cases]
    for chunk in range(0, len(ids), 1000):
        part = ids[chunk:chunk + 1000]
        for row in conn.execute(sa.select(cl.c.case_id, cl.c.review_action)
                                .where(cl.c.case_id.in_(part))):
            actions.setdefault(row.case_id, []).append(row.review_action)
    for r in cases:
        r["review_actions"] = actions.get(r["id"], [])
    return cases
