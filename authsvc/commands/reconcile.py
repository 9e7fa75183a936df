"""`authsvc reconcile [--since TIME] [--sim-url URL]`: exit 1 on any lost or duplicated work."""

from __future__ import annotations

import argparse
import datetime as dt

from authsvc.config import Settings


def cmd_reconcile(args: argparse.Namespace) -> int:
    from authsvc.adapters.db.engine import make_engine
    from authsvc.service_layer.reconcile import check

    since = dt.datetime.fromisoformat(args.since.replace("Z", "+00:00")) if args.since else None
    engine = make_engine(Settings.from_env().database_url)
    try:
        violations = check(engine, since=since, sim_url=args.sim_url,
                           settle_seconds=args.settle_seconds)
    finally:
        engine.dispose()
    for v in violations:
        print(v)
    print(f"reconcile: {len(violations)} violation(s)")
    return 1 if violations else 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("reconcile", help="check the nothing-lost invariants (exit 1 on any)")
    s.add_argument("--since", help="RFC 3339 time: only orders created since then")
    s.add_argument("--sim-url", help="the payer simulator, to check its ledger (I4)")
    s.add_argument("--settle-seconds", type=int, default=120)
    s.set_defaults(func=cmd_reconcile)
