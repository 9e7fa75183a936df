"""Engine creation and schema migrations (Alembic), the same on PostgreSQL and SQLite."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str, pool_size: int = 5) -> sa.Engine:
    """One engine per process; SQLite gets WAL, foreign keys and a busy timeout."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
            # Let SQLAlchemy issue BEGIN itself so writers take the lock up front.
            dbapi_conn.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = sa.create_engine(url, pool_size=pool_size, max_overflow=10, pool_recycle=1800)
    ping_when_idle(engine)
    begin_with_first_statement(engine)
    return engine


_BEGIN_OWED = "authsvc_begin_owed"


def begin_with_first_statement(engine: sa.Engine) -> None:
    """PostgreSQL: send a transaction's BEGIN in one round trip with its first statement.

    psycopg sends BEGIN alone and waits for its answer before the first statement of every
    transaction: a round trip that does nothing, on every request and every actor's claim.
    Here the driver connection stays in autocommit (psycopg never begins on its own) and the
    transaction SQLAlchemy begins is owed a BEGIN, which goes in a libpq pipeline with the
    transaction's first statement. COMMIT and ROLLBACK are unchanged: psycopg sends them
    whenever the server says a transaction is open. A connection used with
    ``isolation_level="AUTOCOMMIT"`` owes nothing; one whose driver SQLAlchemy switched out
    of autocommit (its isolation-level reset) begins the usual way until it is checked in.
    """
    from psycopg.pq import TransactionStatus

    @sa.event.listens_for(engine, "connect")
    def _driver_autocommit(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.autocommit = True

    @sa.event.listens_for(engine, "checkin")
    def _back_to_autocommit(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        if dbapi_conn is not None and not dbapi_conn.closed and not dbapi_conn.autocommit \
                and dbapi_conn.info.transaction_status == TransactionStatus.IDLE:
            dbapi_conn.autocommit = True

    @sa.event.listens_for(engine, "begin")
    def _owe_begin(conn):  # type: ignore[no-untyped-def]
        conn.info[_BEGIN_OWED] = \
            conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT"

    def _owed(cursor, context) -> bool:  # type: ignore[no-untyped-def]
        try:
            info = context.root_connection.info
        except NotImplementedError:  # the dialect's own first-connect queries
            return False
        if not info.pop(_BEGIN_OWED, False):
            return False
        driver = cursor.connection
        return bool(driver.autocommit) and \
            driver.info.transaction_status == TransactionStatus.IDLE

    def _begin_and(cursor, context, *statement) -> bool | None:  # type: ignore[no-untyped-def]
        """Run the statement in one pipeline with the BEGIN it owes (None: nothing owed, the
        dialect runs it as usual)."""
        if not _owed(cursor, context):
            return None
        with cursor.connection.pipeline():
            cursor.connection.execute("BEGIN")
            cursor.execute(*statement)
        return True

    @sa.event.listens_for(engine, "do_execute")
    def _execute(cursor, statement, parameters, context):  # type: ignore[no-untyped-def]
        return _begin_and(cursor, context, statement, parameters)

    @sa.event.listens_for(engine, "do_execute_no_params")
    def _execute_no_params(cursor, statement, context):  # type: ignore[no-untyped-def]
        return _begin_and(cursor, context, statement)

    @sa.event.listens_for(engine, "do_executemany")
    def _executemany(cursor, statement, parameters, context):  # type: ignore[no-untyped-def]
        if _owed(cursor, context):
            cursor.connection.execute("BEGIN")  # its own round trip: executemany is rare here
        return None


#: A pooled connection idle longer than this is pinged before it is handed out.
IDLE_PING_SECONDS = 5.0


def ping_when_idle(engine: sa.Engine, idle_seconds: float = IDLE_PING_SECONDS) -> None:
    """Pre-ping only connections that sat idle, not every checkout.

    `pool_pre_ping` costs a round trip on every checkout (two per API request: the token
    lookup and the work); under load a connection goes back out milliseconds after it came
    in, so that ping buys nothing. An idle connection (a quiet night, a database restart
    while nobody was asking) is still checked before use; a connection that breaks while busy
    fails its statement, the pool invalidates every connection made before it, and the API
    answers 503 with Retry-After (the request is not half-written: its transaction is gone).
    """

    @sa.event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn, record) -> None:  # type: ignore[no-untyped-def]
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn, record, _proxy) -> None:  # type: ignore[no-untyped-def]
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < idle_seconds:
            return
        try:
            with dbapi_conn.cursor() as cur:
                cur.execute("SELECT 1")
            if not dbapi_conn.autocommit:
                dbapi_conn.rollback()
        except Exception as exc:  # the pool retries the checkout on a new connection
            raise sa.exc.DisconnectionError(type(exc).__name__) from exc


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database to the newest schema (`authsvc db upgrade`)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
