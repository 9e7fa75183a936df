"""Queued inserts: rows a transaction writes but does not read back, sent together.

Why: on PostgreSQL every statement is a round trip, and a round trip costs about as much CPU
(driver, SQLAlchemy, server) as the work in it. Order intake writes eight kinds of row (the
order, its lines, its timeline event, notifications, the eligibility check, outbox rows, the
idempotency record) that nothing reads in the same transaction; one statement carries them.

`add(conn, table, rows)` only queues. The queue is flushed before the connection's next
statement (so a later read in the transaction sees the rows, and a SAVEPOINT or a
ROLLBACK TO SAVEPOINT applies to them exactly as to rows inserted one by one) and at commit;
a rollback drops it. On PostgreSQL a flush is one statement: a data-modifying CTE per
(table, columns) group reading `json_populate_recordset`, so the server parses the values with
the tables' own column types; on SQLite (no network) it is an executemany per group.

At commit on PostgreSQL, the flush, the writers registered with `before_commit` (the audit
chain) and the COMMIT itself go in one libpq pipeline: one round trip where they took four.
They still run one after the other on the server, each statement with its own snapshot, and
the first error (a constraint, a lost connection) is raised from the commit as usual.

Only for rows that cannot conflict (fresh ids, append-only tables): a constraint violation
surfaces at the flush, not at the `add` call.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
import sqlalchemy as sa

_PENDING = "authsvc_batch_pending"
_SQL: dict[tuple, str] = {}  # statement text per groups' signature: built once
# (has something to write?, write it): run at commit after the queued rows, in this order
_WRITERS: list[tuple[Callable[[sa.Connection], bool], Callable[[sa.Connection], None]]] = []


def add(conn: sa.Connection, table: sa.Table, rows: dict[str, Any] | Iterable[dict[str, Any]]
        ) -> None:
    """Queue rows for `table` in the caller's transaction (every row with the same keys)."""
    queue = conn.info.setdefault(_PENDING, [])
    for row in [rows] if isinstance(rows, dict) else rows:
        unknown = [key for key in row if key not in table.c]
        if unknown:
            raise KeyError(f"not columns of {table.name}: {unknown}")
        queue.append((table, row))


def pending(conn: sa.Connection) -> int:
    """How many rows are queued (tests and asserts)."""
    return 0 if conn.invalidated else len(conn.info.get(_PENDING) or ())


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _groups(queue: list) -> list[tuple[sa.Table, tuple[str, ...], list[dict]]]:
    """Consecutive rows of one table with the same keys, in queue order (parents first)."""
    out: list[tuple[sa.Table, tuple[str, ...], list[dict]]] = []
    for table, row in queue:
        keys = tuple(row)
        if out and out[-1][0] is table and out[-1][1] == keys:
            out[-1][2].append(row)
        else:
            out.append((table, keys, [row]))
    return out


def _pg_sql(signature: tuple) -> str:
    """WITH g0 AS (INSERT INTO t (cols) SELECT cols FROM json_populate_recordset(NULL::t,
    %(g0)s::json)), g1 AS (…) SELECT 1"""
    sql = _SQL.get(signature)
    if sql is None:
        parts = []
        for i, (name, cols) in enumerate(signature):
            # identifiers only, from the schema (`add` checked every key is a column); the
            # values travel as the bound JSON parameter
            col_list = ", ".join(f'"{c}"' for c in cols)
            parts.append(f'g{i} AS (INSERT INTO "{name}" ({col_list}) SELECT {col_list} '  # noqa: S608
                         f'FROM json_populate_recordset(NULL::"{name}", %(g{i})s::json))')
        sql = _SQL[signature] = "WITH " + ", ".join(parts) + " SELECT 1"
    return sql


def flush(conn: sa.Connection) -> None:
    """Send the queued rows now: one statement on PostgreSQL."""
    if conn.invalidated:
        return
    queue = conn.info.pop(_PENDING, None)
    if not queue:
        return
    groups = _groups(queue)
    if conn.dialect.name != "postgresql":
        for table, _keys, rows in groups:
            conn.execute(table.insert(), rows)
        return
    signature = tuple((table.name, keys) for table, keys, _rows in groups)
    conn.exec_driver_sql(_pg_sql(signature), {
        f"g{i}": json.dumps(rows, default=_json_value) for i, (_t, _k, rows) in enumerate(groups)})


def before_commit(has_pending: Callable[[sa.Connection], bool],
                  write: Callable[[sa.Connection], None]) -> None:
    """Register a writer that runs at every commit, after the queued rows (audit's chain)."""
    _WRITERS.append((has_pending, write))


def _commit(conn: sa.Connection) -> None:
    """The `commit` listener: queued rows, then the writers, then (PostgreSQL) COMMIT, in
    one pipeline; SQLAlchemy's own COMMIT that follows finds no transaction and sends
    nothing."""
    if conn.invalidated:
        return
    if conn.dialect.name != "postgresql":
        flush(conn)
        for _has_pending, write in _WRITERS:
            write(conn)
        return
    writers = [write for has_pending, write in _WRITERS if has_pending(conn)]
    if not writers and not conn.info.get(_PENDING):
        return
    driver = conn.connection.driver_connection
    if driver.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
        # nothing sent yet (psycopg begins the transaction with the first statement), or an
        # AUTOCOMMIT connection: the plain path, SQLAlchemy's COMMIT follows
        flush(conn)
        for write in writers:
            write(conn)
        return
    try:
        with driver.pipeline():
            flush(conn)
            for write in writers:
                write(conn)
            driver.execute("COMMIT")
    except psycopg.Error as exc:
        # SQLAlchemy's mapping (sa.exc.IntegrityError, …) and its disconnect handling, as
        # for an error from its own COMMIT
        conn._handle_dbapi_exception(exc, "COMMIT", None, None, None)  # noqa: SLF001


def _before_execute(conn: sa.Connection, *_args: Any) -> None:
    if not conn.invalidated and conn.info.get(_PENDING):
        flush(conn)


def _drop(conn: sa.Connection) -> None:
    if not conn.invalidated:
        conn.info.pop(_PENDING, None)


sa.event.listen(sa.engine.Engine, "before_execute", _before_execute)
sa.event.listen(sa.engine.Engine, "commit", _commit)
sa.event.listen(sa.engine.Engine, "rollback", _drop)
sa.event.listen(sa.engine.Engine, "begin", _drop)
