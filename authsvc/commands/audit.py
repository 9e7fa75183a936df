"""`authsvc audit verify`: check the audit trail's hash chain (exit 1 naming the first bad row)."""

from __future__ import annotations

import argparse

from authsvc.config import Settings


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every row fits the chain; else 1, naming the first bad row and the rest."""
    from authsvc.adapters.db import audit
    from authsvc.adapters.db.engine import make_engine

    engine = make_engine(args.database_url or Settings.from_env().database_url)
    try:
        with engine.connect() as conn:
            verdict = audit.verify(conn)
    finally:
        engine.dispose()
    if verdict.ok:
        print(f"audit chain ok: {verdict.checked} rows")
        return 0
    later = len(verdict.bad_ids) - 1
    print(f"audit chain broken at row {verdict.first_bad}: {verdict.reason}; "
          f"{later} later rows cannot be trusted")
    if args.list:
        print(" ".join(str(i) for i in verdict.bad_ids))
    return 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `audit` command group."""
    group = sub.add_parser("audit", help="PHI-access audit trail").add_subparsers(
        dest="audit_cmd", required=True)
    s = group.add_parser("verify", help="check the hash chain; exit 1 naming the first bad row")
    s.add_argument("--database-url", help="default: AUTHSVC_DATABASE_URL")
    s.add_argument("--list", action="store_true", help="also print every untrusted row id")
    s.set_defaults(func=cmd_verify)
