"""Repositories: small SQL functions named after what the service layer needs.

Every function takes an open connection (the service layer owns the transaction) and, for
anything a caller can name, the organization id: tenancy is part of every query.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from authsvc.adapters.db import batch
from authsvc.adapters.db import tables as t
from authsvc.domain import ids
from authsvc.domain.payer import ExchangeRecord

Row = dict[str, Any]


def _one(conn: sa.Connection, stmt: sa.Executable) -> Row | None:
    row = conn.execute(stmt).mappings().first()
    return dict(row) if row is not None else None


# ------------------------------------------------------------------ organizations, tokens


def ensure_organization(conn: sa.Connection, org_id: str, now: dt.datetime) -> None:
    if _one(conn, sa.select(t.organizations.c.id).where(t.organizations.c.id == org_id)):
        return
    conn.execute(t.organizations.insert().values(id=org_id, name=org_id, created_at=now))


def active_subscriptions(org_id: Any) -> tuple[sa.ColumnElement[bool], ...]:
    """The organization's live webhook subscriptions (not deleted, not disabled)."""
    s = t.webhook_subscriptions
    return s.c.org_id == org_id, s.c.deleted_at.is_(None), s.c.disabled_at.is_(None)


@functools.cache
def _token_lookup(dialect: str) -> sa.Select:
    """The token row; on PostgreSQL also its organization's live webhook subscriptions
    (`webhook_subscriptions`: [{id, events}]), which order intake needs and would otherwise
    read in a round trip of its own (a fifth of intake's throughput, measured)."""
    a = t.api_tokens
    q = sa.select(a).where(a.c.token_hash == sa.bindparam("token_hash"))
    if dialect != "postgresql":
        return q
    s = t.webhook_subscriptions
    subs = sa.select(sa.func.coalesce(
        sa.func.json_agg(sa.func.json_build_object("id", s.c.id, "events", s.c.events)),
        sa.literal_column("'[]'::json"))).where(*active_subscriptions(a.c.org_id))
    return q.add_columns(subs.scalar_subquery().label("webhook_subscriptions"))


def token_by_hash(conn: sa.Connection, token_hash: str) -> Row | None:
    row = conn.execute(_token_lookup(conn.dialect.name),
                       {"token_hash": token_hash}).mappings().first()
    return dict(row) if row is not None else None


# ------------------------------------------------------------------ orders


def patient_values(org_id: str, patient: dict, now: dt.datetime) -> dict:
    """The parameters of the patient upsert (`upsert_patient`, `patient_upsert_when`)."""
    return {
        "patient_id": ids.new_id("pat"), "patient_org_id": org_id, "patient_mrn": patient["mrn"],
        "patient_given_name": patient["given_name"],
        "patient_family_name": patient["family_name"],
        "patient_birth_date": patient["birth_date"], "patient_sex": patient["sex"],
        "patient_contacts": patient.get("contacts") or [], "patient_updated_at": now,
    }


def upsert_patient(conn: sa.Connection, org_id: str, patient: dict, now: dt.datetime) -> str:
    """One patient row per (organization, MRN); the newest order's details win.

    A single INSERT … ON CONFLICT DO UPDATE … RETURNING: one round trip, and two first
    orders for the same MRN arriving together cannot collide.
    """
    return conn.execute(_patient_upsert(conn.dialect.name),
                        patient_values(org_id, patient, now)).scalar_one()


def patient_upsert_when(guard: sa.ColumnElement[bool]) -> sa.Insert:
    """PostgreSQL: the patient upsert, done only when `guard` holds (order intake sends it
    with its Idempotency-Key claim, `idempotency.run`'s `first_write`: one round trip)."""
    from sqlalchemy.dialects.postgresql import insert

    source = sa.select(*(sa.bindparam(f"patient_{name}", type_=t.patients.c[name].type)
                         for name in _PATIENT_COLUMNS)).where(guard)
    stmt = insert(t.patients).from_select(list(_PATIENT_COLUMNS), source)
    return stmt.on_conflict_do_update(
        index_elements=["org_id", "mrn"],
        set_={name: stmt.excluded[name] for name in _PATIENT_DETAILS},
    ).returning(t.patients.c.id)


_PATIENT_DETAILS = ("given_name", "family_name", "birth_date", "sex", "contacts", "updated_at")
_PATIENT_COLUMNS = ("id", "org_id", "mrn", *_PATIENT_DETAILS)


@functools.cache
def _patient_upsert(dialect: str) -> sa.Executable:
    """The upsert statement, built once per dialect (parameters bound at execution)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = insert(t.patients).values(
        {name: sa.bindparam(f"patient_{name}") for name in _PATIENT_COLUMNS})
    return stmt.on_conflict_do_update(
        index_elements=["org_id", "mrn"],
        set_={name: stmt.excluded[name] for name in _PATIENT_DETAILS},
    ).returning(t.patients.c.id)


def insert_order(conn: sa.Connection, values: dict, lines: Sequence[dict]) -> None:
    """Queued (`batch`): the order and its lines go with the transaction's other new rows."""
    batch.add(conn, t.orders, values)
    batch.add(conn, t.order_lines, [{"order_id": values["id"], **line} for line in lines])


def order_row(conn: sa.Connection, order_id: str, org_id: str | None = None) -> Row | None:
    q = sa.select(t.orders).where(t.orders.c.id == order_id)
    if org_id is not None:
        q = q.where(t.orders.c.org_id == org_id)
    return _one(conn, q)


def lock_order(conn: sa.Connection, order_id: str) -> Row | None:
    """Read the order for update (row lock on PostgreSQL; SQLite writers are serialized)."""
    q = sa.select(t.orders).where(t.orders.c.id == order_id)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update()
    return _one(conn, q)


def order_lines(conn: sa.Connection, order_id: str) -> list[Row]:
    rows = conn.execute(sa.select(t.order_lines).where(t.order_lines.c.order_id == order_id)
                        .order_by(t.order_lines.c.sequence)).mappings().all()
    return [dict(r) for r in rows]


def patient_row(conn: sa.Connection, patient_id: str) -> Row | None:
    return _one(conn, sa.select(t.patients).where(t.patients.c.id == patient_id))


def update_order(conn: sa.Connection, order_id: str, **values: Any) -> None:
    conn.execute(t.orders.update().where(t.orders.c.id == order_id).values(**values))


def set_line_determination(conn: sa.Connection, order_id: str, sequence: int,
                           determination: dict) -> None:
    conn.execute(t.order_lines.update().where(
        t.order_lines.c.order_id == order_id, t.order_lines.c.sequence == sequence
    ).values(determination=determination))


def list_orders(conn: sa.Connection, org_id: str, *, status: str | None, mrn: str | None,
                after: tuple[dt.datetime, str] | None, limit: int) -> list[Row]:
    """Newest first, keyset-paginated on (created_at, id)."""
    o = t.orders
    q = sa.select(o).where(o.c.org_id == org_id)
    if status:
        q = q.where(o.c.status == status)
    if mrn:
        q = q.join(t.patients, t.patients.c.id == o.c.patient_id).where(t.patients.c.mrn == mrn)
    if after:
        created, oid = after
        q = q.where(sa.or_(o.c.created_at < created,
                           sa.and_(o.c.created_at == created, o.c.id < oid)))
    q = q.order_by(o.c.created_at.desc(), o.c.id.desc()).limit(limit)
    return [dict(r) for r in conn.execute(q).mappings().all()]


# ------------------------------------------------------------------ eligibility


def insert_eligibility(conn: sa.Connection, values: dict) -> None:
    batch.add(conn, t.eligibility_checks, {"attempts": 0, **values})


def latest_eligibility(conn: sa.Connection, order_id: str) -> Row | None:
    e = t.eligibility_checks
    return _one(conn, sa.select(e).where(e.c.order_id == order_id)
                .order_by(e.c.requested_at.desc(), e.c.id.desc()).limit(1))


def eligibility_row(conn: sa.Connection, check_id: str) -> Row | None:
    return _one(conn, sa.select(t.eligibility_checks).where(t.eligibility_checks.c.id == check_id))


def db_now(conn: sa.Connection) -> dt.datetime:
    """The database's clock, shared by every process (reliability.md F16).

    Leases, due times and the times a step stores (payer_received_at, hence decision_due_at)
    come from it (payer work, notifications, webhook deliveries): a worker whose own clock
    runs minutes ahead does not take a lease that is still live, and one that runs behind
    neither stalls due work nor writes leases that look expired to the others. On SQLite
    (one machine, embedded) it is the system clock, read by Python: SQLite's own `'now'` has
    millisecond precision, so work stored due at 12:00:00.123456 looked not yet due at
    12:00:00.123 and a claim right after it was skipped.
    """
    if conn.dialect.name == "postgresql":
        value = conn.execute(sa.text("SELECT statement_timestamp()")).scalar_one()
        return value.astimezone(dt.UTC)
    return dt.datetime.now(dt.UTC)


def claim_due(conn: sa.Connection, table: sa.Table, row_id: str, status: str,
              now: dt.datetime, lease: dt.timedelta) -> bool:
    """Claim a unit of work (an eligibility check, a notification, a webhook delivery): one
    conditional UPDATE that takes a free lease on a row in `status` whose next attempt is
    due, counting the attempt; the rowcount says whether this worker won."""
    res = conn.execute(table.update().where(
        table.c.id == row_id, table.c.status == status,
        sa.or_(table.c.claimed_until.is_(None), table.c.claimed_until < now),
        sa.or_(table.c.next_attempt_at.is_(None), table.c.next_attempt_at <= now),
    ).values(claimed_until=now + lease, attempts=table.c.attempts + 1))
    return res.rowcount == 1


def claim_eligibility(conn: sa.Connection, check_id: str, now: dt.datetime,
                      lease: dt.timedelta) -> bool:
    return claim_due(conn, t.eligibility_checks, check_id, "pending", now, lease)


def update_eligibility(conn: sa.Connection, check_id: str, **values: Any) -> None:
    conn.execute(t.eligibility_checks.update().where(t.eligibility_checks.c.id == check_id)
                 .values(**values))


# ------------------------------------------------------------------ cases


def insert_case(conn: sa.Connection, values: dict, lines: Sequence[dict]) -> None:
    conn.execute(t.cases.insert().values(version=1, submission_unknown=False, attempts=0,
                                         poll_attempts=0, **values))
    conn.execute(t.case_lines.insert(), [{"case_id": values["id"], **line} for line in lines])


def case_row(conn: sa.Connection, case_id: str, org_id: str | None = None) -> Row | None:
    q = sa.select(t.cases).where(t.cases.c.id == case_id)
    if org_id is not None:
        q = q.where(t.cases.c.org_id == org_id)
    return _one(conn, q)


def lock_case(conn: sa.Connection, case_id: str) -> Row | None:
    q = sa.select(t.cases).where(t.cases.c.id == case_id)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update()
    return _one(conn, q)


def case_lines(conn: sa.Connection, case_id: str) -> list[Row]:
    rows = conn.execute(sa.select(t.case_lines).where(t.case_lines.c.case_id == case_id)
                        .order_by(t.case_lines.c.sequence)).mappings().all()
    return [dict(r) for r in rows]


def cases_of_order(conn: sa.Connection, order_id: str) -> list[Row]:
    rows = conn.execute(sa.select(t.cases).where(t.cases.c.order_id == order_id)
                        .order_by(t.cases.c.created_at, t.cases.c.id)).mappings().all()
    return [dict(r) for r in rows]


def claim_case(conn: sa.Connection, case_id: str, from_states: Iterable[str], to_state: str,
               now: dt.datetime, lease: dt.timedelta, *, due_column: str | None = None) -> bool:
    """Claim a step of a case: conditional state check + free lease + due time, sets a lease."""
    c = t.cases
    conds = [
        c.c.id == case_id, c.c.state.in_(list(from_states)),
        sa.or_(c.c.claimed_until.is_(None), c.c.claimed_until < now),
    ]
    if due_column:
        col = c.c[due_column]
        conds.append(sa.or_(col.is_(None), col <= now))
    values: dict[str, Any] = {"state": to_state, "claimed_until": now + lease,
                              "version": c.c.version + 1, "updated_at": now}
    if to_state == "submitting":
        values["attempts"] = c.c.attempts + 1
    res = conn.execute(c.update().where(*conds).values(**values))
    return res.rowcount == 1


def update_case(conn: sa.Connection, case_id: str, **values: Any) -> None:
    c = t.cases
    conn.execute(c.update().where(c.c.id == case_id).values(version=c.c.version + 1, **values))


def update_case_line(conn: sa.Connection, case_id: str, sequence: int, **values: Any) -> None:
    cl = t.case_lines
    conn.execute(cl.update().where(cl.c.case_id == case_id, cl.c.sequence == sequence)
                 .values(**values))


def record_exchanges(conn: sa.Connection, records: Iterable[ExchangeRecord], *, payer_id: str,
                     org_id: str | None, order_id: str | None, case_id: str | None) -> None:
    rows = [{
        "org_id": org_id, "order_id": order_id, "case_id": case_id, "payer_id": payer_id,
        "kind": r.kind, "direction": r.direction, "url": r.url, "http_status": r.http_status,
        "started_at": r.started_at, "finished_at": r.finished_at,
        "request_body": r.request_body, "response_body": r.response_body,
        "error": (r.error or None) and r.error[:500],
    } for r in records]
    if rows:
        conn.execute(t.payer_exchanges.insert(), rows)


def exchanges_of_case(conn: sa.Connection, case_id: str) -> list[Row]:
    x = t.payer_exchanges
    rows = conn.execute(sa.select(x.c.id, x.c.kind, x.c.direction, x.c.http_status,
                                  x.c.started_at, x.c.finished_at, x.c.error)
                        .where(x.c.case_id == case_id).order_by(x.c.id)).mappings().all()
    return [dict(r) for r in rows]


# ------------------------------------------------------------------ outbox


def add_outbox(conn: sa.Connection, actor: str, entity_id: str, now: dt.datetime,
               available_at: dt.datetime | None = None) -> None:
    batch.add(conn, t.outbox, {"actor": actor, "entity_id": entity_id, "created_at": now,
                               "available_at": available_at or now, "publish_count": 0})


def pending_outbox(conn: sa.Connection, now: dt.datetime, limit: int) -> list[Row]:
    o = t.outbox
    q = (sa.select(o.c.id, o.c.actor, o.c.entity_id)
         .where(o.c.published_at.is_(None), o.c.available_at <= now)
         .order_by(o.c.id).limit(limit))
    if conn.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    return [dict(r) for r in conn.execute(q).mappings().all()]


def mark_published(conn: sa.Connection, outbox_ids: Sequence[int], now: dt.datetime) -> None:
    o = t.outbox
    conn.execute(o.update().where(o.c.id.in_(list(outbox_ids)))
                 .values(published_at=now, publish_count=o.c.publish_count + 1))


# ------------------------------------------------------------------ outcomes


def lock_outcome_feed(conn: sa.Connection) -> None:
    """Serialize outcome writers so feed positions are assigned in commit order.

    Without it, two transactions could commit out of position order and a consumer that
    already read past the later position would never see the earlier one.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7204311)"))


def next_outcome_version(conn: sa.Connection, order_id: str, sequence: int) -> int:
    o = t.outcomes
    current = conn.execute(sa.select(sa.func.max(o.c.version)).where(
        o.c.order_id == order_id, o.c.sequence == sequence)).scalar()
    return (current or 0) + 1


def insert_outcome(conn: sa.Connection, values: dict) -> None:
    conn.execute(t.outcomes.insert().values(**values))


def outcomes_after(conn: sa.Connection, org_id: str, position: int, limit: int) -> list[Row]:
    o = t.outcomes
    q = (sa.select(o).where(o.c.org_id == org_id, o.c.position > position)
         .order_by(o.c.position).limit(limit))
    return [dict(r) for r in conn.execute(q).mappings().all()]


def outcomes_of_order(conn: sa.Connection, order_id: str) -> list[Row]:
    o = t.outcomes
    rows = conn.execute(sa.select(o).where(o.c.order_id == order_id)
                        .order_by(o.c.position)).mappings().all()
    return [dict(r) for r in rows]


# ------------------------------------------------------------------ timeline, audit


def add_timeline(conn: sa.Connection, *, org_id: str, order_id: str, at: dt.datetime,
                 event: str, actor: str, case_id: str | None = None,
                 detail: dict | None = None) -> None:
    batch.add(conn, t.timeline_events, {
        "org_id": org_id, "order_id": order_id, "case_id": case_id, "at": at, "event": event,
        "actor": actor, "detail": detail})


def timeline(conn: sa.Connection, order_id: str) -> list[Row]:
    te = t.timeline_events
    rows = conn.execute(sa.select(te).where(te.c.order_id == order_id)
                        .order_by(te.c.at, te.c.id)).mappings().all()
    return [dict(r) for r in rows]


def add_audit(conn: sa.Connection, **values: Any) -> None:
    """Append to the hash-chained audit trail (see authsvc/adapters/db/audit.py)."""
    from authsvc.adapters.db import audit

    audit.append(conn, **values)
