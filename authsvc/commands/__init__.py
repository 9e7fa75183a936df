"""CLI subcommand groups beyond the core processes; each module has `register(subparsers)`.

Add a module here to add a command group to `authsvc` (see authsvc/cli.py).
"""

from __future__ import annotations

import argparse
import importlib

MODULES = [
    "authsvc.commands.reconcile",
    "authsvc.commands.rules",
    "authsvc.commands.audit",
    "authsvc.commands.cds_clients",
    "authsvc.commands.orgs",
]


def register_all(sub: argparse._SubParsersAction) -> None:
    for name in MODULES:
        importlib.import_module(name).register(sub)
