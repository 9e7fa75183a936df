"""`authsvc reconcile`: check the "nothing lost" invariants of reliability.md §2 (I2–I7).

Run after quiescence (load stopped, faults removed, a settle wait): every violation is a
piece of work that was lost or duplicated. With a payer simulator URL it also checks the
payer's own ledger: exactly one accepted submission per case (I4).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import urllib.request
from collections import Counter, defaultdict

import sqlalchemy as sa

from authsvc.adapters.db import tables as t
from authsvc.domain import cases as cs
from authsvc.domain import clock


@dataclasses.dataclass(frozen=True)
class Violation:
    invariant: str
    entity: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant} {self.entity}: {self.detail}"


def check(engine: sa.Engine, *, since: dt.datetime | None = None,
          sim_url: str | None = None, settle_seconds: int = 120,
          max_poll_interval: int = 14_400) -> list[Violation]:
    """Every violation of I2–I7 among orders created since `since` (all when None).

    I6 checks the notifications' states; their uniqueness per (order, event, version,
    recipient, channel) is the table's unique constraint."""
    now = clock.now()
    stale = now - dt.timedelta(seconds=settle_seconds)
    out: list[Violation] = []
    o, ol, c, cl = t.orders, t.order_lines, t.cases, t.case_lines
    with engine.connect() as conn:
        order_filter = [o.c.created_at >= since] if since else []
        orders = {r["id"]: dict(r) for r in conn.execute(
            sa.select(o.c.id, o.c.status, o.c.ruleset_version, o.c.eligibility_status,
                      o.c.attention_reason).where(*order_filter)).mappings()}
        ids = list(orders)

        # I2: a determination per line, with the ruleset version, stored with the order.
        lines = conn.execute(sa.select(ol.c.order_id, ol.c.sequence, ol.c.determination)
                             .where(ol.c.order_id.in_(ids))).mappings().all()
        for line in lines:
            if not line["determination"]:
                out.append(Violation("I2", line["order_id"], f"line {line['sequence']}"))
        for oid, order in orders.items():
            if not order["ruleset_version"]:
                out.append(Violation("I2", oid, "no ruleset_version"))

        # I3: no unpublished outbox row older than the sweep window.
        unpublished = conn.execute(sa.select(t.outbox.c.id, t.outbox.c.actor,
                                             t.outbox.c.entity_id).where(
            t.outbox.c.published_at.is_(None), t.outbox.c.available_at < stale)).all()
        for row in unpublished:
            out.append(Violation("I3", row.entity_id, f"outbox {row.actor} never published"))

        # I6: every notification sent, suppressed, failed after its last attempt, or due
        # again; a queued one past its next attempt that nobody holds was lost on the way.
        n = t.notifications
        for row in conn.execute(sa.select(n.c.id, n.c.next_attempt_at, n.c.claimed_until)
                                .where(n.c.order_id.in_(ids), n.c.status == "queued")):
            if row.next_attempt_at is None:
                out.append(Violation("I6", row.id, "queued with no next attempt"))
            elif row.next_attempt_at < stale and (row.claimed_until is None
                                                  or row.claimed_until < stale):
                out.append(Violation("I6", row.id, "queued and never attempted again"))

        # I5: every case final, waiting for a person, or scheduled.
        cases = conn.execute(sa.select(c).where(c.c.order_id.in_(ids))).mappings().all()
        pending_outbox = {r.entity_id for r in conn.execute(
            sa.select(t.outbox.c.entity_id).where(t.outbox.c.published_at.is_(None)))}
        horizon = now + dt.timedelta(seconds=max_poll_interval)
        for case in cases:
            state = case["state"]
            if cs.is_final(state):
                continue
            if state in (cs.NEEDS_INPUT,):
                continue
            if state in (cs.REJECTED, cs.CONTACT_PAYER, cs.ERROR, cs.INFO_REQUESTED):
                if not case["attention_reason"]:
                    out.append(Violation("I5", case["id"], f"{state} without needs_attention"))
                continue
            if state == cs.READY_TO_SUBMIT and case["updated_at"] < stale \
                    and case["id"] not in pending_outbox:
                out.append(Violation("I5", case["id"], "ready_to_submit and not scheduled"))
            elif state == cs.SUBMITTING and case["updated_at"] < stale:
                leased = case["claimed_until"] is not None and case["claimed_until"] > now
                retry = case["next_attempt_at"] is not None and case["next_attempt_at"] > stale
                if not (leased or retry):
                    out.append(Violation("I5", case["id"], "submitting with nothing scheduled"))
            elif state in (cs.SUBMITTED, cs.PENDED):
                if case["next_poll_at"] is None or case["next_poll_at"] > horizon:
                    out.append(Violation("I5", case["id"], f"{state} without a poll"))
            if case["claimed_until"] is not None and case["claimed_until"] < stale \
                    and state == cs.SUBMITTING and case["updated_at"] < stale:
                out.append(Violation("I5", case["id"], "a lease expired long ago"))
        elig = conn.execute(sa.select(t.eligibility_checks).where(
            t.eligibility_checks.c.order_id.in_(ids),
            t.eligibility_checks.c.status == "pending",
            t.eligibility_checks.c.requested_at < stale)).mappings().all()
        for check_row in elig:
            if check_row["id"] not in pending_outbox and (
                    check_row["claimed_until"] is None or check_row["claimed_until"] < now):
                out.append(Violation("I5", check_row["order_id"],
                                     "eligibility pending with nothing scheduled"))

        # I7: versions 1..n per line, and no outcome for an undecided line.
        feed = conn.execute(sa.select(t.outcomes).where(t.outcomes.c.order_id.in_(ids))
                            .order_by(t.outcomes.c.position)).mappings().all()
        versions: dict[tuple[str, int], list[int]] = defaultdict(list)
        for row in feed:
            versions[(row["order_id"], row["sequence"])].append(row["version"])
        for (oid, seq), got in versions.items():
            if got != list(range(1, len(got) + 1)):
                out.append(Violation("I7", oid, f"line {seq} versions {got}"))
        decided = {(r.case_id, r.sequence) for r in conn.execute(
            sa.select(cl.c.case_id, cl.c.sequence).where(cl.c.review_action.is_not(None)))}
        for row in feed:
            if row["case_id"] and row["outcome"] in ("approved", "denied", "modified") \
                    and (row["case_id"], row["sequence"]) not in decided:
                out.append(Violation("I7", row["order_id"],
                                     f"outcome without a decision on line {row['sequence']}"))

    # I4: exactly one accepted submission per case at the payer.
    if sim_url:
        with urllib.request.urlopen(f"{sim_url.rstrip('/')}/sim/submissions",  # noqa: S310
                                    timeout=30) as resp:
            ledger = json.load(resp)["items"]
        accepted = Counter(x["claim_id"] for x in ledger
                           if x["kind"] == "submit" and x["accepted"] and x["claim_id"])
        ours = {case["id"]: case for case in cases}
        for claim_id, n in accepted.items():
            if claim_id in ours and n != 1:
                out.append(Violation("I4", claim_id, f"{n} accepted submissions"))
        for case in ours.values():
            if case["payer_received_at"] is not None and case["kind"] != "manual" \
                    and accepted.get(case["id"], 0) != 1 and case["payer_id"] == "demo":
                out.append(Violation("I4", case["id"], "the payer has no accepted submission"))
    return out
