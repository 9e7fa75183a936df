"""Payer rules versions: reload (CLI, admin API, SIGHUP) and the list of loaded versions.

A reload validates the rule files and records each payer's version and digest as the active
one in the database, in one transaction; every process then follows that record within 2 s
(:class:`authsvc.bootstrap.RulesHolder`). A refused reload changes nothing: the last good
version stays active and the reason is logged, counted (``authsvc_rules_reloads_total``
{outcome="refused"}) and shown by ``/readyz``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from authsvc.adapters import ruleset_store
from authsvc.adapters.policies import PolicyError, RuleSet, load_ruleset
from authsvc.adapters.rules_engine import RulesEngine
from authsvc.bootstrap import RulesHolder
from authsvc.domain import clock

log = logging.getLogger(__name__)


class ReloadRefused(Exception):
    """The rule files were not loaded; ``errors`` says why (``file:line: message``)."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclasses.dataclass(frozen=True)
class ReloadResult:
    changed: list[str]  # ruleset versions that became active (or were deactivated)
    active: dict[str, str]  # payer → ruleset version now active

    def to_dict(self) -> dict[str, Any]:
        return {"status": "loaded" if self.changed else "unchanged", "changed": self.changed,
                "active": self.active}


def reload(db: sa.Engine, directory: str | os.PathLike[str], holder: RulesHolder | None = None,
           *, source: str = "cli") -> ReloadResult:
    """Validate ``directory`` and make its versions the active ones; raises ReloadRefused.

    ``holder`` (this process's rules) switches at once; other processes follow the database.
    """
    try:
        ruleset = load_ruleset(directory)
    except PolicyError as exc:
        _refused(holder, exc.errors, source)
        raise ReloadRefused(exc.errors) from None
    with db.begin() as conn:
        ruleset_store.lock(conn)
        conflicts = ruleset_store.conflicts(conn, ruleset)
        if not conflicts:
            changed = ruleset_store.record(conn, ruleset, clock.now())
    if conflicts:
        errors = [c.message() for c in conflicts]
        _refused(holder, errors, source)
        raise ReloadRefused(errors)
    ruleset_store.RELOADS.labels("loaded" if changed else "unchanged").inc()
    if holder is not None:
        _swap(holder, ruleset)
    active = {p: i.ruleset_version for p, i in sorted(ruleset.payers.items())}
    log.info("rules reload (%s): %s", source,
             f"now active: {', '.join(changed)}" if changed else "unchanged")
    return ReloadResult(changed=changed, active=active)


def _swap(holder: RulesHolder, ruleset: RuleSet) -> None:
    current = holder.current().ruleset.versions()
    if {p: v["digest"] for p, v in current.items()} != {
            p: i.digest for p, i in ruleset.payers.items()}:
        holder.swap(RulesEngine(ruleset))
    else:
        holder.swap(holder.current())  # clears a stale refusal


def _refused(holder: RulesHolder | None, errors: list[str], source: str) -> None:
    ruleset_store.RELOADS.labels("refused").inc()
    reason = "reload refused, keeping the last good version: " + "; ".join(errors[:3])
    if len(errors) > 3:
        reason += f" (+{len(errors) - 3} more)"
    log.warning("rules reload (%s) refused: %s", source, "; ".join(errors))
    if holder is not None:
        holder.refused(reason)


def loaded_versions(db: sa.Engine, holder: RulesHolder) -> dict[str, Any]:
    """Every recorded version with its digest, and file hashes where this process knows them."""
    engine = holder.current()
    known = {(p, v["policy_version"], v["digest"]): v for p, v in engine.versions().items()}
    files = holder.read_files()
    if isinstance(files, RuleSet):
        for p, v in files.versions().items():
            known.setdefault((p, v["policy_version"], v["digest"]), v)
    with db.connect() as conn:
        rows = ruleset_store.list_versions(conn)
    items = []
    for row in rows:
        info = known.get((row["payer_id"], row["version"], row["digest"]))
        items.append({
            "payer_id": row["payer_id"],
            "version": row["version"],
            "ruleset_version": f"{row['payer_id']}@{row['version']}",
            "digest": row["digest"],
            "active": bool(row["active"]),
            "loaded_at": row["loaded_at"].isoformat().replace("+00:00", "Z"),
            "files": info["files"] if info else None,
            "policies": info["policies"] if info else None,
            "gold_cards": info["gold_cards"] if info else None,
        })
    return {
        "items": items,
        "in_use": {p: v["version"] for p, v in sorted(engine.versions().items())},
        "directory": str(Path(holder.directory)) if holder.directory else None,
        "status": holder.last_error or "ok",
    }
