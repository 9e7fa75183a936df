"""The database record of payer ruleset versions (table ``ruleset_versions``) and its metrics.

The database is the record of which version of each payer's policies is in force: a reload
writes it, every process reads it (at most every 2 s) and loads the files whose digest
matches. A (payer, version) pair keeps the digest it was first loaded with for ever, so a
file that changed under an unchanged ``version:`` is recognised and refused.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa
from prometheus_client import Counter, Gauge

from authsvc.adapters.db import tables as t
from authsvc.adapters.policies import RuleSet

#: Reloads by outcome: loaded (something new became active), unchanged, refused.
RELOADS = Counter("authsvc_rules_reloads", "Payer rules reloads by outcome", ["outcome"])
#: 1 while this process keeps its last good version because of a refused or unusable version.
REFUSED = Gauge("authsvc_rules_refused",
                "1 while payer rule files are refused and the last good version is kept",
                multiprocess_mode="max")

_LOCK_KEY = 7204312  # pg advisory lock serializing reloads (outcome feed uses 7204311)


@dataclasses.dataclass(frozen=True)
class Conflict:
    """A payer version whose files changed since it was first loaded."""

    payer_id: str
    version: str
    stored_digest: str
    digest: str
    files: tuple[str, ...]

    def message(self) -> str:
        return (f"{', '.join(self.files)}: payer {self.payer_id} version {self.version!r} was "
                f"loaded before with other contents (digest {self.stored_digest[:12]}…, now "
                f"{self.digest[:12]}…); change `version:` when you change a policy file")


def lock(conn: sa.Connection) -> None:
    """Serialize writers of the version record (SQLite serializes with BEGIN IMMEDIATE)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})"))


def active_versions(conn: sa.Connection) -> dict[str, tuple[str, str]]:
    """{payer_id: (version, digest)} of every active version: what every process must load."""
    v = t.ruleset_versions
    rows = conn.execute(sa.select(v.c.payer_id, v.c.version, v.c.digest).where(v.c.active))
    return {r.payer_id: (r.version, r.digest) for r in rows}


def conflicts(conn: sa.Connection, ruleset: RuleSet) -> list[Conflict]:
    """Payer versions of ``ruleset`` recorded before with another digest."""
    v = t.ruleset_versions
    out = []
    for payer_id, idx in sorted(ruleset.payers.items()):
        stored = conn.execute(sa.select(v.c.digest).where(
            v.c.payer_id == payer_id, v.c.version == idx.version)).scalar()
        if stored is not None and stored != idx.digest:
            out.append(Conflict(payer_id, idx.version, stored, idx.digest,
                                tuple(sorted(idx.files))))
    return out


def record(conn: sa.Connection, ruleset: RuleSet, now: dt.datetime, *,
           only_unmanaged: bool = False) -> list[str]:
    """Mark each payer's version of ``ruleset`` active (inserting it when new).

    Payers the files no longer name are deactivated, unless ``only_unmanaged`` (process
    start-up), which records only payers that have no active version yet. The caller has
    checked :func:`conflicts` under :func:`lock`. Returns the ruleset versions that changed.
    """
    v = t.ruleset_versions
    active = active_versions(conn)
    changed = []
    for payer_id, idx in sorted(ruleset.payers.items()):
        if only_unmanaged and payer_id in active:
            continue
        if active.get(payer_id) == (idx.version, idx.digest):
            continue
        exists = conn.execute(sa.select(v.c.id).where(
            v.c.payer_id == payer_id, v.c.version == idx.version)).scalar()
        if exists is None:
            conn.execute(v.insert().values(payer_id=payer_id, version=idx.version,
                                           digest=idx.digest, active=False, loaded_at=now))
        conn.execute(v.update().where(v.c.payer_id == payer_id)
                     .values(active=v.c.version == idx.version))
        conn.execute(v.update().where(v.c.payer_id == payer_id, v.c.version == idx.version)
                     .values(loaded_at=now))
        changed.append(idx.ruleset_version)
    if not only_unmanaged:
        gone = [p for p in active if p not in ruleset.payers]
        if gone:
            conn.execute(v.update().where(v.c.payer_id.in_(gone)).values(active=False))
            changed += [f"{p}@{active[p][0]} (deactivated)" for p in gone]
    return changed


def list_versions(conn: sa.Connection) -> list[dict[str, Any]]:
    """Every recorded version, newest load first within each payer."""
    v = t.ruleset_versions
    rows = conn.execute(sa.select(v).order_by(v.c.payer_id, v.c.loaded_at.desc(), v.c.id.desc()))
    return [dict(r._mapping) for r in rows]
