"""`authsvc rules …`: check payer policy files before they go live."""

from __future__ import annotations

import argparse

from authsvc.config import Settings


def cmd_validate(args: argparse.Namespace) -> int:
    from authsvc.adapters.policies import PolicyError, load_ruleset

    directory = args.dir or str(Settings.from_env().rules_dir)
    try:
        load_ruleset(directory)
    except PolicyError as exc:
        for message in exc.errors:
            print(message)
        return 1
    print(f"{directory}: ok")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    rules = sub.add_parser("rules", help="payer policy files").add_subparsers(
        dest="rules_cmd", required=True)
    s = rules.add_parser("validate", help="check policy files; file:line: message per error")
    s.add_argument("dir", nargs="?")
    s.set_defaults(func=cmd_validate)
