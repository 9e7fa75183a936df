"""CMS-0057-F prior-authorization metrics (api.md "Reports", Details › Report).

A case's decision is read from its lines' review actions, not its state, so an initial
request that was later superseded by an appeal or an extension still counts as what the payer
first said. Groups are (payer_id, urgency). `requests` counts initial requests (kind
`initial` or `resubmission`) decided in the period; approved = approved, partially approved
or modified; percentages are 0-100 with one decimal over the group's decided requests;
`approved_after_appeal` counts appeal cases granted in the period and `extended` granted
extension cases, both as a share of the group's requests. Decision time runs from
`payer_received_at` to `decided_at`, over the initial requests.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import statistics

import sqlalchemy as sa

from authsvc.adapters.db import repo_cases as rc
from authsvc.domain import cases as cs

COLUMNS = ("payer_id", "urgency", "requests", "approved", "approved_pct", "denied",
           "denied_pct", "approved_after_appeal", "approved_after_appeal_pct", "extended",
           "extended_pct", "avg_decision_hours", "median_decision_hours")
GRANTED = frozenset({cs.APPROVED, cs.PARTIALLY_APPROVED, cs.MODIFIED})
INITIAL_KINDS = frozenset({"initial", "resubmission"})
# The dates a report may cover: wide enough for any real period, narrow enough that the
# date arithmetic (a day before, a day after) never leaves Python's 0001-9999 range.
EARLIEST = dt.date(2000, 1, 1)
LATEST = dt.date(2199, 12, 31)


def in_range(day: dt.date) -> bool:
    return EARLIEST <= day <= LATEST


def default_start(end: dt.date, days: int = 30) -> dt.date:
    """The first day of the default period of `days` days ending on `end`."""
    return max(EARLIEST, end - dt.timedelta(days=days - 1))


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 1) if whole else None


def prior_auth_metrics(conn: sa.Connection, org_id: str, start: dt.date, end: dt.date,
                       payer_id: str | None) -> dict:
    """The report for decisions made from `start` to `end` inclusive (UTC dates), both
    from EARLIEST to LATEST (ValueError otherwise: callers answer 4xx first)."""
    if not (in_range(start) and in_range(end)):
        raise ValueError(f"report dates must be from {EARLIEST} to {LATEST}")
    lo = dt.datetime.combine(start, dt.time(), dt.UTC)
    hi = dt.datetime.combine(end + dt.timedelta(days=1), dt.time(), dt.UTC)
    groups: dict[tuple[str, str], dict] = {}
    for case in rc.decided_cases(conn, org_id, start=lo, end=hi, payer_id=payer_id):
        decision = cs.aggregate(case["review_actions"])
        if decision not in GRANTED and decision != cs.DENIED:
            continue  # cancelled before a decision, not required, ...
        g = groups.setdefault((case["payer_id"], case["urgency"]), {
            "requests": 0, "approved": 0, "denied": 0, "approved_after_appeal": 0,
            "extended": 0, "hours": []})
        kind = case["kind"]
        if kind in INITIAL_KINDS:
            g["requests"] += 1
            g["approved" if decision in GRANTED else "denied"] += 1
            start_at = case["payer_received_at"] or case["submitted_at"]
            if start_at is not None and case["decided_at"] is not None:
                g["hours"].append((case["decided_at"] - start_at).total_seconds() / 3600)
        elif kind.startswith("appeal") and decision in GRANTED:
            g["approved_after_appeal"] += 1
        elif kind == "extension" and decision in GRANTED:
            g["extended"] += 1
    out = []
    for (pid, urgency), g in sorted(groups.items()):
        hours = g.pop("hours")
        n = g["requests"]
        out.append({
            "payer_id": pid, "urgency": urgency, "requests": n,
            "approved": g["approved"], "approved_pct": _pct(g["approved"], n),
            "denied": g["denied"], "denied_pct": _pct(g["denied"], n),
            "approved_after_appeal": g["approved_after_appeal"],
            "approved_after_appeal_pct": _pct(g["approved_after_appeal"], n),
            "extended": g["extended"], "extended_pct": _pct(g["extended"], n),
            "avg_decision_hours": round(statistics.fmean(hours), 1) if hours else None,
            "median_decision_hours": round(statistics.median(hours), 1) if hours else None,
        })
    return {"from": start.isoformat(), "to": end.isoformat(), "payer_id": payer_id,
            "groups": out}


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> object:
    """A CSV cell; a text cell that a spreadsheet would run as a formula (=, +, -, @, tab,
    carriage return first: OWASP "CSV injection") gets a leading `'`, so it stays text."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def to_csv(report: dict) -> str:
    """One row per group with the JSON group's columns; empty cells for null."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for g in report["groups"]:
        writer.writerow([_cell(g[c]) for c in COLUMNS])
    return buf.getvalue()
