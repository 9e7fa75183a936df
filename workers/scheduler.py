"""The scheduler process: outbox relay, sweeper, polls, deadlines and payer subscriptions.

Redis is only transport. The relay publishes committed outbox rows; the sweeper rebuilds
every pending step from the database (after a flushed Redis or a dead worker), so nothing
waits on a message that no longer exists.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

import sqlalchemy as sa

from authsvc.adapters.broker import enqueue
from authsvc.adapters.db import repo
from authsvc.adapters.db import tables as t
from authsvc.bootstrap import Services
from authsvc.domain import cases as cs
from authsvc.domain import clock
from authsvc.service_layer import expiry, failpoints, payer_work, timeline

log = logging.getLogger(__name__)
ATTACHMENT_SWEEP_S = 3600.0  # orphaned attachment files: at most an hour on disk


class Scheduler:
    def __init__(self, services: Services, broker) -> None:  # type: ignore[no-untyped-def]
        self.services = services
        self.broker = broker
        self._recent: dict[tuple[str, str], float] = {}
        self._stop = threading.Event()

    # -------------------------------------------------------------- relay
    def relay_once(self, batch: int = 500) -> int:
        now = clock.now()
        with self.services.engine.begin() as conn:
            rows = repo.pending_outbox(conn, now, batch)
            for row in rows:
                enqueue(self.broker, row["actor"], row["entity_id"])
            failpoints.hit("RELAY_AFTER_ENQUEUE")
            if rows:
                repo.mark_published(conn, [r["id"] for r in rows], now)
        return len(rows)

    # -------------------------------------------------------------- sweeps
    def _send(self, actor: str, entity_id: str, window: float) -> bool:
        key = (actor, entity_id)
        mono = time.monotonic()
        if mono - self._recent.get(key, -1e9) < window:
            return False
        enqueue(self.broker, actor, entity_id)
        self._recent[key] = mono
        return True

    def sweep_once(self) -> int:
        """Re-enqueue work whose message may be gone (flushed Redis, dead worker)."""
        s = self.services.settings
        now = clock.now()
        stale = now - dt.timedelta(seconds=s.sweep_after_seconds)
        c, e = t.cases, t.eligibility_checks
        lease_free = sa.or_(c.c.claimed_until.is_(None), c.c.claimed_until < now)
        sent = 0
        with self.services.engine.connect() as conn:
            submit = conn.execute(sa.select(c.c.id).where(sa.or_(
                sa.and_(c.c.state == cs.READY_TO_SUBMIT, c.c.updated_at < stale),
                sa.and_(c.c.state == cs.SUBMITTING, c.c.claimed_until < now),
                sa.and_(c.c.state == cs.SUBMITTING, c.c.claimed_until.is_(None),
                        c.c.next_attempt_at < stale),
            )).limit(1000)).scalars().all()
            polls = conn.execute(sa.select(c.c.id).where(
                c.c.state.in_([cs.SUBMITTED, cs.PENDED]), c.c.next_poll_at <= now, lease_free,
            ).limit(1000)).scalars().all()
            elig = conn.execute(sa.select(e.c.id).where(e.c.status == "pending", sa.or_(
                e.c.claimed_until < now,
                sa.and_(e.c.claimed_until.is_(None),
                        sa.func.coalesce(e.c.next_attempt_at, e.c.requested_at) < stale),
            )).limit(1000)).scalars().all()
            x = t.payer_exchanges
            cancelled_ok = sa.select(x.c.id).where(x.c.case_id == c.c.id, x.c.kind == "cancel",
                                                   x.c.http_status == 200).exists()
            cancels = conn.execute(sa.select(c.c.id).where(
                c.c.state == cs.CANCELLED, c.c.submitted_at.is_not(None),
                c.c.updated_at < stale, ~cancelled_ok,
            ).limit(1000)).scalars().all()
        window = float(s.sweep_after_seconds)
        for case_id in submit:
            sent += self._send("submit_case", case_id, window)
        for case_id in polls:
            sent += self._send("poll_case", case_id, min(window, 10.0))
        for check_id in elig:
            sent += self._send("run_eligibility", check_id, window)
        for case_id in cancels:
            sent += self._send("cancel_case", case_id, window * 10)
        from authsvc.service_layer import webhooks_out

        for delivery_id in webhooks_out.due_deliveries(self.services, now):
            sent += self._send("deliver_webhook", delivery_id, window)
        from authsvc.service_layer import notifications

        for notification_id in notifications.due(self.services, now):  # issue 6
            sent += self._send("send_notification", notification_id, window)
        if len(self._recent) > 100_000:
            self._recent.clear()
        return sent

    def deadlines_once(self) -> int:
        """Raise the overdue alert on open cases whose decision deadline passed, once per
        deadline: a `decision_overdue` timeline event (provider notice, webhook) and
        needs_attention `overdue`, unless the case already needs attention for a more
        specific reason (an information request, a rejection), which stays. A coordinator
        who resolves it does not see it again for the same deadline; a new deadline (the
        payer received an update) can raise it again."""
        now = clock.now()
        c = t.cases
        open_states = [s for s in cs.STATES if cs.is_open(s)]
        with self.services.engine.begin() as conn:
            rows = conn.execute(sa.select(
                c.c.id, c.c.org_id, c.c.order_id, c.c.attention_reason,
            ).where(
                c.c.state.in_(open_states), c.c.decision_due_at < now,
                sa.or_(c.c.overdue_raised_at.is_(None),
                       c.c.overdue_raised_at < c.c.decision_due_at),
            ).limit(1000)).mappings().all()
            for row in rows:
                attention = {} if row["attention_reason"] else {
                    "attention_reason": "overdue", "attention_since": now}
                repo.update_case(conn, row["id"], overdue_raised_at=now, updated_at=now,
                                 **attention)
                timeline.record(conn, org_id=row["org_id"], order_id=row["order_id"],
                                case_id=row["id"], at=now, event="decision_overdue",
                                actor="system")
        return len(rows)

    def attachment_files_once(self) -> dict[str, int]:
        """Remove attachment files a crash left without a committed row (patient documents
        must not linger on disk), when attachments are stored in a folder."""
        from authsvc.service_layer import case_actions

        folder = self.services.settings.attachments_dir
        if folder is None:
            return {"files": 0, "temporaries": 0}
        removed = case_actions.sweep_attachment_files(self.services.engine, folder)
        if any(removed.values()):
            log.info("removed %d orphaned attachment files and %d temporaries",
                     removed["files"], removed["temporaries"])
        return removed

    # -------------------------------------------------------------- loop
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        s = self.services.settings
        registered: set[str] = set()
        last_sweep = last_subscribe = last_expiry = last_files = -1e9
        log.info("scheduler started")
        while not self._stop.is_set():
            try:
                moved = self.relay_once()
                mono = time.monotonic()
                if len(registered) < len(self.services.payers) and mono - last_subscribe > 10:
                    last_subscribe = mono
                    registered |= payer_work.register_subscriptions(
                        self.services, set(self.services.payers) - registered)
                if mono - last_sweep >= 2.0:
                    self.sweep_once()
                    self.deadlines_once()
                    last_sweep = mono
                if mono - last_expiry >= 60.0:
                    expiry.expire_authorizations(self.services)
                    last_expiry = mono
                if s.attachments_dir is not None and mono - last_files >= ATTACHMENT_SWEEP_S:
                    last_files = mono
                    self.attachment_files_once()
            except Exception as exc:  # noqa: BLE001 - keep the loop alive; the DB holds the work
                log.warning("scheduler iteration failed: %s", type(exc).__name__)
                moved = 0
                self._stop.wait(1.0)
            if not moved:
                self._stop.wait(s.relay_interval_seconds)
