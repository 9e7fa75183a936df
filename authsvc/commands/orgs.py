"""`authsvc orgs contact --org ORG [--email E] [--webhook-url U]`: where the organization's
provider notifications go (api.md › Notifications). Webhook URLs pass the SSRF check first."""

from __future__ import annotations

import argparse
import re
import sys

from authsvc.config import Settings

EMAIL_RE = re.compile(r"[^@\s]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}")


def cmd_contact(args: argparse.Namespace) -> int:
    """Set (or with an empty value, clear) the provider email and webhook URL; exit 2 on bad
    input. Prints the webhook signing secret when a webhook URL is set."""
    import sqlalchemy as sa

    from authsvc.adapters import ssrf
    from authsvc.adapters.db import repo
    from authsvc.adapters.db import tables as t
    from authsvc.adapters.db.engine import make_engine
    from authsvc.adapters.notify import webhook
    from authsvc.domain import clock

    settings = Settings.from_env()
    values: dict[str, str | None] = {}
    if args.email is not None:
        if args.email and not EMAIL_RE.fullmatch(args.email):
            print("--email is not an email address", file=sys.stderr)
            return 2
        values["provider_email"] = args.email or None
    if args.webhook_url is not None:
        if args.webhook_url:
            try:
                ssrf.check_url(args.webhook_url, settings.webhook_allowlist)
            except ssrf.Refused as exc:
                print(f"--webhook-url refused: {exc}", file=sys.stderr)
                return 2
        values["provider_webhook_url"] = args.webhook_url or None
    engine = make_engine(settings.database_url)
    try:
        with engine.begin() as conn:
            repo.ensure_organization(conn, args.org, clock.now())
            if values:
                conn.execute(t.organizations.update().where(t.organizations.c.id == args.org)
                             .values(**values))
            row = conn.execute(sa.select(t.organizations).where(
                t.organizations.c.id == args.org)).mappings().one()
    finally:
        engine.dispose()
    print(f"organization {args.org}: provider email {row['provider_email'] or '-'}, "
          f"webhook {row['provider_webhook_url'] or '-'}")
    if row["provider_webhook_url"]:
        print("webhook signing secret (Standard Webhooks):")
        print(webhook.org_secret(settings.provider_webhook_secret, args.org))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `orgs` command group."""
    group = sub.add_parser("orgs", help="organizations").add_subparsers(dest="orgs_cmd",
                                                                        required=True)
    s = group.add_parser("contact", help="the provider contact for notifications")
    s.add_argument("--org", required=True)
    s.add_argument("--email", help="provider email ('' clears it)")
    s.add_argument("--webhook-url", help="provider webhook URL ('' clears it)")
    s.set_defaults(func=cmd_contact)
