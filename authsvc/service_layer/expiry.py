"""Approvals end: an authorization whose validity period has passed becomes `expired`."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from authsvc.adapters.db import repo
from authsvc.adapters.db import tables as t
from authsvc.bootstrap import Services
from authsvc.domain import cases as cs
from authsvc.domain import clock
from authsvc.service_layer import outcomes, timeline

AUTHORIZING = ("A1", "A2", "A6")


def expire_authorizations(services: Services, today: dt.date | None = None,
                          limit: int = 500) -> int:
    """Move decided cases whose every authorized line's `valid_to` passed to `expired`,
    with one `expired` outcome per such line (a new version in the billing feed)."""
    today = today or clock.now().date()
    c, cl = t.cases, t.case_lines
    latest_valid_to = (sa.select(sa.func.max(cl.c.valid_to))
                       .where(cl.c.case_id == c.c.id, cl.c.review_action.in_(AUTHORIZING))
                       .scalar_subquery())
    done = 0
    with services.engine.connect() as conn:
        due = conn.execute(sa.select(c.c.id).where(
            c.c.state.in_(list(cs.AUTHORIZED)), latest_valid_to < today,
        ).limit(limit)).scalars().all()
    for case_id in due:
        now = clock.now()
        with services.engine.begin() as conn:
            case = repo.lock_case(conn, case_id)
            if case is None or case["state"] not in cs.AUTHORIZED:
                continue
            lines = [line for line in repo.case_lines(conn, case_id)
                     if line["review_action"] in AUTHORIZING]
            if not lines or any(line["valid_to"] is None or line["valid_to"] >= today
                                for line in lines):
                continue
            repo.update_case(conn, case_id, state=cs.transition(case["state"], cs.EXPIRED),
                             updated_at=now)
            order = repo.order_row(conn, case["order_id"])
            assert order is not None
            repo.lock_outcome_feed(conn)
            for line in lines:
                outcomes.emit(conn, order=order, case_id=case_id, sequence=line["sequence"],
                              code=line["code"], outcome="expired", decided_at=now,
                              auth_number=line["auth_number"], valid_from=line["valid_from"],
                              valid_to=line["valid_to"])
            timeline.record(conn, org_id=case["org_id"], order_id=case["order_id"],
                              case_id=case_id, at=now, event="authorization_expired",
                              actor="system")
            done += 1
    return done
