"""The billing feed on PostgreSQL under concurrent writers: a consumer that stores its cursor
never misses (or double-counts) an outcome, even when transactions would commit out of
position order. The advisory lock in `repo.lock_outcome_feed` is what makes it so; a control
run without it shows the gap the lock prevents. (The races need PostgreSQL; the last two
tests, the route's fast read path against the read model and its audit row, run on both.)"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
import uuid

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import repo
from authsvc.adapters.db import tables as t
from authsvc.domain import clock
from authsvc.service_layer import outcomes, views
from tests.conftest import auth
from tests.integration.test_cases_factory import new_order

pytestmark = pytest.mark.integration

ORG = "org-a"


@pytest.fixture()
def _postgres_only(services):
    if services.engine.dialect.name != "postgresql":
        pytest.skip("commit-order races need PostgreSQL (SQLite serializes writers)")


@pytest.fixture()
def order(client, tokens) -> dict:
    new = new_order(client, tokens[ORG]["coordinator"], f"FEED-{uuid.uuid4().hex[:8]}")
    with client.application.extensions["authsvc"].engine.connect() as conn:
        row = repo.order_row(conn, new["id"])
    assert row is not None
    return row


def _tail(services) -> int:
    with services.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.coalesce(sa.func.max(t.outcomes.c.position), 0))
                            .where(t.outcomes.c.org_id == ORG)).scalar()


def _read(services, cursor: str | None) -> tuple[list[dict], str]:
    """A page as `GET /v1/outcomes` reads it (`outcomes.feed_page`, the route's fast path)."""
    with services.engine.connect() as conn:
        page = outcomes.feed_page(conn, ORG, cursor, 200)
    return page["items"], page["next_cursor"]


def _write(services, order: dict, sequence: int, hold: float, *, lock: bool,
           inserted: threading.Event | None = None) -> None:
    with services.engine.begin() as conn:
        if lock:
            repo.lock_outcome_feed(conn)
        outcomes.emit(conn, order=order, case_id=None, sequence=sequence, code="72148",
                      outcome="approved", decided_at=clock.now(), auth_number=f"A{sequence}")
        if inserted is not None:
            inserted.set()
        time.sleep(hold)


@pytest.mark.usefixtures("_postgres_only")
def test_without_the_lock_a_stored_cursor_would_skip_a_row(services, order):
    """Control: the race is real. A takes a smaller position but commits after B."""
    start = views.encode_cursor({"p": _tail(services)})
    a_in = threading.Event()
    a = threading.Thread(target=_write, args=(services, order, 101, 1.0),
                         kwargs={"lock": False, "inserted": a_in})
    a.start()
    assert a_in.wait(10)
    _write(services, order, 102, 0.0, lock=False)  # B commits first, bigger position
    seen, cursor = _read(services, start)
    assert [i["sequence"] for i in seen] == [102]
    a.join(10)
    later, _ = _read(services, cursor)
    assert later == [], "A committed behind the cursor: lost to this consumer"
    everything, _ = _read(services, start)
    assert sorted(i["sequence"] for i in everything) == [101, 102]


@pytest.mark.usefixtures("_postgres_only")
def test_with_the_lock_the_later_writer_waits_and_nothing_is_skipped(services, order):
    start = views.encode_cursor({"p": _tail(services)})
    a_in = threading.Event()
    a = threading.Thread(target=_write, args=(services, order, 201, 1.0),
                         kwargs={"lock": True, "inserted": a_in})
    a.start()
    assert a_in.wait(10)
    b = threading.Thread(target=_write, args=(services, order, 202, 0.0), kwargs={"lock": True})
    b.start()
    time.sleep(0.3)
    seen, cursor = _read(services, start)
    assert seen == []  # A holds the feed; B waits for it instead of committing ahead
    a.join(10)
    b.join(10)
    rest, _ = _read(services, cursor)
    assert [i["sequence"] for i in rest] == [201, 202]


@pytest.mark.usefixtures("_postgres_only")
def test_concurrent_writers_and_a_polling_consumer_see_each_outcome_once(services, order):
    start = views.encode_cursor({"p": _tail(services)})
    writers, per_writer = 4, 12
    done = threading.Event()
    consumed: list[str] = []

    def consumer() -> None:
        cursor = start
        while True:
            finished = done.is_set()
            items, cursor = _read(services, cursor)
            consumed.extend(i["id"] for i in items)
            if finished and not items:
                return
            time.sleep(0.005)

    def writer(w: int) -> None:
        rnd = random.Random(w)
        for i in range(per_writer):
            _write(services, order, 1000 + w * 100 + i, rnd.uniform(0, 0.02), lock=True)

    reader = threading.Thread(target=consumer)
    reader.start()
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    done.set()
    reader.join(60)
    everything, _ = _read(services, start)
    assert len(consumed) == len(set(consumed)) == writers * per_writer
    assert set(consumed) == {i["id"] for i in everything}


@pytest.mark.usefixtures("_postgres_only")
def test_the_feed_over_http_after_concurrent_writes(client, tokens, services, order):
    threads = [threading.Thread(target=_write, args=(services, order, 3000 + i, 0.01),
                                kwargs={"lock": True}) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    items, after = [], None
    token = tokens[ORG]["billing"]
    while True:
        q = "/v1/outcomes?limit=50" + (f"&after={after}" if after else "")
        page = client.get(q, headers=auth(token)).get_json()
        items += page["items"]
        if not page["items"]:
            break
        after = page["next_cursor"]
    mine = [i for i in items if i["order_id"] == order["id"] and i["sequence"] >= 3000]
    assert sorted(i["sequence"] for i in mine) == list(range(3000, 3006))
    assert len({i["id"] for i in items}) == len(items)


def test_the_fast_feed_is_the_read_model_item_for_item(client, tokens, services, order):
    """`feed_page` (the route) shows exactly what `views.outcome_item` shows, for every kind
    of outcome: denial reasons, missing dates and quantities, cursors byte for byte."""
    start = views.encode_cursor({"p": _tail(services)})
    day = dt.date(2026, 12, 1)
    with services.engine.begin() as conn:
        repo.lock_outcome_feed(conn)
        for seq, kind, extra in (
                (4001, "approved", {"auth_number": "A-1", "authorized_quantity": 2,
                                    "valid_from": day, "valid_to": day}),
                (4002, "denied", {"denial_code": "0F", "denial_text": "Not medically necessary"}),
                (4003, "no_auth_required", {}),
                (4004, "cancelled", {"auth_number": "A-4"}),
                (4005, "denied", {"denial_text": "text only"})):
            outcomes.emit(conn, order=order, case_id=None, sequence=seq, code="72148",
                          outcome=kind, decided_at=clock.now(), **extra)
    with services.engine.connect() as conn:
        fast = outcomes.feed_page(conn, ORG, start, 200)
        model = reference_feed(conn, ORG, start, 200)
        empty = outcomes.feed_page(conn, ORG, fast["next_cursor"], 200)
    assert [i["sequence"] for i in fast["items"]] == [4001, 4002, 4003, 4004, 4005]
    assert fast == model
    assert fast["items"][1]["denial_reason"] == {"code": "0F",
                                                "text": "Not medically necessary"}
    assert fast["items"][0]["decided_at"].endswith("Z")
    assert empty == {"items": [], "next_cursor": fast["next_cursor"]}
    token = tokens[ORG]["billing"]
    resp = client.get(f"/v1/outcomes?after={start}", headers=auth(token))
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    assert resp.get_json() == model
    for bad in ("%%%", views.encode_cursor({"p": "1"}), views.encode_cursor([1])):
        resp = client.get(f"/v1/outcomes?after={bad}", headers=auth(token))
        assert resp.status_code == 400 and resp.mimetype == "application/problem+json"


def test_one_audit_row_per_feed_page(client, tokens, services):
    """The route audits the page in its own transaction; the generic hook adds nothing."""
    import uuid as _uuid

    rid = _uuid.uuid4().hex
    resp = client.get("/v1/outcomes?limit=5", headers=auth(tokens[ORG]["billing"],
                                                           **{"X-Request-Id": rid}))
    assert resp.status_code == 200
    a = t.audit_events
    with services.engine.connect() as conn:
        rows = conn.execute(sa.select(a.c.action, a.c.entity_type, a.c.outcome, a.c.org_id,
                                      a.c.role).where(a.c.request_id == rid)).all()
    assert [tuple(r) for r in rows] == [("search", "outcome", "success", ORG, "billing")]


@pytest.mark.parametrize("position", [2**31, 2**63, 10**30, -1])
def test_a_forged_cursor_beyond_any_position_is_a_400_not_a_500(client, tokens, position):
    resp = client.get("/v1/outcomes", query_string={"after": views.encode_cursor(
        {"p": position})}, headers=auth(tokens[ORG]["billing"]))
    assert resp.status_code == 400 and resp.mimetype == "application/problem+json"


def reference_feed(conn, org_id: str, after: str, limit: int) -> dict:
    """The feed page built the plain way (repo rows through views.outcome_item): the model
    the route's fast path must equal."""
    position = views.decode_cursor(after)["p"]
    items = [views.outcome_item(r) for r in repo.outcomes_after(conn, org_id, position, limit)]
    return {"items": items, "next_cursor": items[-1]["cursor"] if items else after}


def test_an_unreadable_cursor_names_the_after_parameter(client, tokens):
    resp = client.get("/v1/outcomes?after=not-a-cursor",
                      headers=auth(tokens[ORG]["billing"]))
    assert resp.status_code == 400 and resp.mimetype == "application/problem+json"
    assert [e["field"] for e in resp.get_json()["errors"]] == ["after"]
