"""The PHI-access audit trail: append-only rows linked by a SHA-256 hash chain.

Why a chain: the application role may INSERT and SELECT audit rows but never UPDATE or
DELETE them (migration 0003 on PostgreSQL, triggers on SQLite); the chain makes any change
made around that (a superuser, a restored backup, a hand edit) visible to `verify`, which
names the first row that no longer fits and every row after it.

Each row's `hash` is SHA-256 over its `prev_hash` and the canonical JSON of its fields
(`CHAIN_FIELDS`, times as UTC microseconds); `prev_hash` is the previous row's `hash`
(`GENESIS` for the first). Writers are serialized so the chain has one head: a
transaction-scoped advisory lock on PostgreSQL (held until commit, so row ids follow chain
order), `BEGIN IMMEDIATE` on SQLite. Rows hold identifiers only, never clinical content.

`append` only queues the row on the connection; it is chained and inserted by a `commit`
listener, right before the transaction commits. So the chain lock is always the last lock a
transaction takes and is held only for the commit itself: callers may audit in the middle of a
transaction (before row locks or the outcome feed's lock) without a lock-order deadlock, and a
rolled-back transaction leaves no audit row, exactly as it leaves no other row. (Rows queued
inside a SAVEPOINT that is rolled back are still written: audit outside savepoints.)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import sqlalchemy as sa

from authsvc.adapters.db import batch
from authsvc.adapters.db import tables as t

CHAIN_FIELDS = ("at", "org_id", "token_id", "role", "action", "entity_type", "entity_id",
                "patient_id", "outcome", "request_id", "source_ip", "reason")
GENESIS = "0" * 64
LOCK_KEY = 7204312  # next to the outcome feed's 7204311
OUTCOMES = ("success", "denied", "error")
# The request id of the last row appended in this context: lets the API's hook tell whether a
# request was already audited by its handler (it then adds no generic row).
_last_request_id: ContextVar[str | None] = ContextVar("audit_last_request_id", default=None)
_LIMITS = {c.name: c.type.length for c in t.audit_events.columns
           if isinstance(c.type, sa.String) and c.type.length}


def _canonical_time(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(values: dict[str, Any]) -> bytes:
    """The bytes a row's hash covers: its chained fields as sorted, compact JSON."""
    data = {}
    for name in CHAIN_FIELDS:
        value = values.get(name)
        data[name] = _canonical_time(value) if isinstance(value, dt.datetime) else value
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def row_hash(prev_hash: str, values: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + canonical(values)).hexdigest()


def _lock(conn: sa.Connection) -> None:
    # The queued rows go first, in their own statement: their foreign-key checks may wait on
    # another transaction's row lock, which must never happen while holding the chain lock.
    batch.flush(conn)
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%(k)s)", {"k": LOCK_KEY})


def _head(conn: sa.Connection) -> str:
    a = t.audit_events
    last = conn.execute(sa.select(a.c.hash).order_by(a.c.id.desc()).limit(1)).scalar()
    return last or GENESIS


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    """Only chained columns, strings cut to their column length (an audit write never fails
    on a long value, and what is hashed is exactly what is stored)."""
    unknown = set(values) - set(CHAIN_FIELDS)
    if unknown:
        raise TypeError(f"not audit fields: {sorted(unknown)}")
    out: dict[str, Any] = {}
    for name in CHAIN_FIELDS:
        value = values.get(name)
        if isinstance(value, str) and name in _LIMITS:
            value = value[:_LIMITS[name]]
        if name == "at" and isinstance(value, dt.datetime):
            # Stored precision is microseconds on both backends; hash what reads back.
            value = value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)
        out[name] = value
    if out["at"] is None:
        out["at"] = dt.datetime.now(dt.UTC)
    return out


_PENDING = "authsvc_audit_pending"
_INSERT = t.audit_events.insert()  # one statement object: compiled once, cached by SQLAlchemy


def append(conn: sa.Connection, **values: Any) -> None:
    """Queue one audit row in the caller's transaction; it is chained and written at commit."""
    row = _clean(values)
    conn.info.setdefault(_PENDING, []).append(row)
    if row["request_id"]:
        _last_request_id.set(row["request_id"])


def _write_pending(conn: sa.Connection) -> None:
    """Run at commit (`batch.before_commit`): lock the chain, read its head, insert the
    queued rows."""
    rows = conn.info.pop(_PENDING, None)
    if not rows:
        return
    _lock(conn)
    if conn.dialect.name == "postgresql":
        # Head and hash inside the INSERT. Its snapshot is taken when it starts on the server,
        # after the lock statement finished (also when both go in the commit's pipeline),
        # so the head it reads is the committed one.
        for row in rows:
            conn.execute(_PG_APPEND, {**row, "canonical": canonical(row).decode("ascii")})
        return
    prev = _head(conn)
    for row in rows:
        row["prev_hash"] = prev
        row["hash"] = prev = row_hash(prev, row)
        conn.execute(_INSERT, row)


def _pg_append() -> sa.Executable:
    """INSERT … SELECT with prev_hash = the chain's head and hash = SHA-256 over prev_hash,
    a newline and the row's canonical JSON (ASCII), exactly as `row_hash` computes it."""
    a = t.audit_events
    head = sa.func.coalesce(
        sa.select(a.c.hash).order_by(a.c.id.desc()).limit(1).scalar_subquery(), GENESIS)
    digest = sa.func.encode(sa.func.sha256(sa.func.convert_to(
        head.concat("\n").concat(sa.bindparam("canonical", type_=sa.Text)), "UTF8")), "hex")
    values = [sa.bindparam(name, type_=a.c[name].type) for name in CHAIN_FIELDS]
    return a.insert().from_select([*CHAIN_FIELDS, "prev_hash", "hash"],
                                  sa.select(*values, head, digest))


_PG_APPEND = _pg_append()


def _drop_pending(conn: sa.Connection) -> None:
    if conn.invalidated:  # the connection died: its `info` is gone with it, and reading
        return  # it would raise PendingRollbackError over the real (OperationalError) cause
    conn.info.pop(_PENDING, None)


batch.before_commit(lambda conn: bool(conn.info.get(_PENDING)), _write_pending)
sa.event.listen(sa.engine.Engine, "rollback", _drop_pending)
sa.event.listen(sa.engine.Engine, "begin", _drop_pending)


def last_request_id() -> str | None:
    """The request id of the last row this context appended (None when none)."""
    return _last_request_id.get()


def forget_request() -> None:
    """Start a new request: nothing audited for it yet."""
    _last_request_id.set(None)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What `verify` found: `first_bad` is None when the whole chain holds."""

    checked: int
    first_bad: int | None
    bad_ids: tuple[int, ...]
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad is None


def _rows(conn: sa.Connection, batch: int = 2000) -> Iterator[dict[str, Any]]:
    a = t.audit_events
    after = 0
    while True:
        rows = conn.execute(sa.select(a).where(a.c.id > after).order_by(a.c.id)
                            .limit(batch)).mappings().all()
        if not rows:
            return
        for r in rows:
            yield dict(r)
        after = rows[-1]["id"]


def verify(conn: sa.Connection) -> Verdict:
    """Walk the chain in id order; the first row whose link or hash is wrong and every row
    after it are reported (a broken link makes everything later unprovable)."""
    expected_prev = GENESIS
    checked = 0
    first_bad: int | None = None
    reason: str | None = None
    bad: list[int] = []
    for row in _rows(conn):
        checked += 1
        if first_bad is not None:
            bad.append(row["id"])
            continue
        if row["prev_hash"] != expected_prev:
            first_bad, reason = row["id"], "prev_hash does not match the previous row"
        elif row["hash"] != row_hash(row["prev_hash"] or "", row):
            first_bad, reason = row["id"], "hash does not match the row's fields"
        if first_bad is not None:
            bad.append(row["id"])
        expected_prev = row["hash"]
    return Verdict(checked=checked, first_bad=first_bad, bad_ids=tuple(bad), reason=reason)


def backfill(conn: sa.Connection) -> int:
    """Chain rows written before the chain existed (hash NULL); run by migration 0003 as the
    schema owner. Returns how many rows it hashed."""
    a = t.audit_events
    prev = GENESIS
    done = 0
    for row in list(_rows(conn)):
        if row["hash"] is None:
            values = _clean({k: row[k] for k in CHAIN_FIELDS})
            new_hash = row_hash(prev, values)
            conn.execute(a.update().where(a.c.id == row["id"])
                         .values(prev_hash=prev, hash=new_hash))
            prev = new_hash
            done += 1
        else:
            prev = row["hash"]
    return done


def search(conn: sa.Connection, org_id: str, *, patient_id: str | None,
           start: dt.datetime | None, end: dt.datetime | None, after_id: int,
           limit: int) -> list[dict[str, Any]]:
    """Audit rows of one organization, oldest first, for `GET /v1/audit`."""
    a = t.audit_events
    q = sa.select(a).where(a.c.org_id == org_id, a.c.id > after_id)
    if patient_id is not None:
        q = q.where(a.c.patient_id == patient_id)
    if start is not None:
        q = q.where(a.c.at >= start)
    if end is not None:
        q = q.where(a.c.at < end)
    return [dict(r) for r in conn.execute(q.order_by(a.c.id).limit(limit)).mappings().all()]
