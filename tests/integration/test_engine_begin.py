"""PostgreSQL: a transaction's BEGIN travels with its first statement
(`adapters/db/engine.begin_with_first_statement`). The driver stays in autocommit, so the
danger is a statement that runs outside the transaction it belongs to: these tests would see
it as a row another connection can read before COMMIT, or one left after a ROLLBACK."""

from __future__ import annotations

import secrets

import pytest
import sqlalchemy as sa

from authsvc.adapters.db.engine import make_engine


@pytest.fixture()
def pg(settings):
    """A one-connection engine on the suite's PostgreSQL (every use reuses one connection,
    so a state left behind by one use shows in the next) and a scratch table."""
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("the BEGIN pipelining is PostgreSQL's (SQLite: BEGIN IMMEDIATE, as before)")
    engine = make_engine(settings.database_url, pool_size=1)
    md = sa.MetaData()
    table = sa.Table(f"eb_{secrets.token_hex(3)}", md,
                     sa.Column("id", sa.Integer, primary_key=True))
    md.create_all(engine)
    yield engine, table
    md.drop_all(engine)
    engine.dispose()


def _ids(engine: sa.Engine, table: sa.Table) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(table.c.id).order_by(table.c.id)).scalars())


def test_the_first_statement_is_inside_the_transaction(pg, services):
    engine, table = pg
    other = services.engine  # another pool: another connection
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 1})
        assert conn.connection.driver_connection.autocommit  # psycopg never begins itself
        assert _ids(other, table) == []  # not committed yet: it is in a transaction
    assert _ids(other, table) == [1]


def test_a_failure_rolls_back_the_first_statement_too(pg):
    engine, table = pg
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(table.insert(), {"id": 2})
        conn.execute(table.insert(), {"id": 2})
    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.execute(table.insert(), {"id": 3})
        raise RuntimeError("the request failed after its first write")
    assert _ids(engine, table) == []


def test_a_failing_first_statement_leaves_the_connection_usable(pg):
    engine, table = pg
    with pytest.raises(sa.exc.ProgrammingError), engine.begin() as conn:
        conn.execute(sa.text("SELECT no_such_column FROM pg_class"))
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 4})
    assert _ids(engine, table) == [4]


def test_savepoints_and_autocommit_reads_keep_their_meaning(pg, services):
    engine, table = pg
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # a single read outside any transaction: no BEGIN sent, nothing left open
        assert conn.execute(sa.text("SELECT txid_current_if_assigned()")).scalar() is None
    with engine.begin() as conn:
        with conn.begin_nested():
            conn.execute(table.insert(), {"id": 5})
        with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():
            conn.execute(table.insert(), {"id": 5})
        conn.execute(table.insert(), {"id": 6})
        assert _ids(services.engine, table) == []  # the connection is back in a transaction
    assert _ids(engine, table) == [5, 6]
