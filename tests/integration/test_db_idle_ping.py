"""Pooled PostgreSQL connections: pinged after sitting idle, not on every checkout."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from authsvc.adapters.db.engine import ping_when_idle


def _engine(database_url: str, idle_seconds: float) -> sa.Engine:
    if not database_url.startswith("postgresql"):
        pytest.skip("pool pinging is configured for PostgreSQL only (SQLite has no server)")
    engine = sa.create_engine(database_url, pool_size=1, max_overflow=0)
    ping_when_idle(engine, idle_seconds=idle_seconds)
    return engine


@pytest.fixture()
def pg_engine(database_url):
    engine = _engine(database_url, 0.2)
    yield engine
    engine.dispose()


@pytest.fixture()
def busy_engine(database_url):
    engine = _engine(database_url, 60)
    yield engine
    engine.dispose()


def _backend_pid(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()


def _terminate(database_url: str, pid: int) -> None:
    admin = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        conn.commit()
    admin.dispose()


def test_a_connection_killed_while_idle_is_replaced_before_use(pg_engine, database_url):
    before = _backend_pid(pg_engine)
    _terminate(database_url, before)
    time.sleep(0.4)  # idle longer than the ping threshold
    after = _backend_pid(pg_engine)  # no error: the ping found it dead, the pool reconnected
    assert after != before


def test_a_busy_connection_is_not_pinged(busy_engine, database_url):
    """Back within the idle window, the pooled connection is handed out as is: a connection
    killed in that window fails its statement once (the API answers 503), then the pool
    recovers on the next checkout."""
    before = _backend_pid(busy_engine)
    _terminate(database_url, before)
    with pytest.raises(sa.exc.OperationalError), busy_engine.begin() as conn:
        conn.execute(sa.text("SELECT 1"))
    assert _backend_pid(busy_engine) != before
