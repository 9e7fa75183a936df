"""`authsvc cds-clients add`: register an EHR's CDS Hooks client for an organization.

Why a command and not an API: registering a client decides whose signed calls act for an
organization and which FHIR servers the service will reach on its behalf; that is an
administrator's act on the server, like creating tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from authsvc.config import Settings


def _load_jwks(path: str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and "keys" not in data and data.get("kty"):
        data = {"keys": [data]}  # a single JWK is accepted as a one-key set
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise ValueError("the JWKS file must hold {\"keys\": [...]} with at least one key")
    import jwt

    jwt.PyJWKSet.from_dict(data)  # refuses unusable keys now rather than at the first call
    for key in data["keys"]:
        if any(k in key for k in ("d", "p", "q", "dp", "dq", "qi", "k")):
            raise ValueError("the JWKS holds private or symmetric key material; give the "
                             "public keys only")
    return data


def _url(value: str, what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError(f"{what} must be an absolute http(s) URL")
    return value.rstrip("/")


def cmd_add(args: argparse.Namespace) -> int:
    """Insert the client; prints its id. Exit 1 (nothing stored) on a bad argument."""
    import sqlalchemy as sa

    from authsvc.adapters.db import tables as t
    from authsvc.adapters.db.engine import make_engine
    from authsvc.domain import clock, ids

    try:
        jwks = _load_jwks(args.jwks_file) if args.jwks_file else None
        jwks_url = _url(args.jwks_url, "--jwks-url") if args.jwks_url else None
        servers = [_url(u, "--fhir-server") for u in args.fhir_server or ()]
    except (OSError, ValueError) as exc:
        print(f"cds-clients add: {exc}", file=sys.stderr)
        return 1
    client_id = ids.new_id("cdc")
    engine = make_engine(args.database_url or Settings.from_env().database_url)
    try:
        with engine.begin() as conn:
            conn.execute(t.cds_clients.insert().values(
                id=client_id, org_id=args.org, iss=args.iss, jwks=jwks, jwks_url=jwks_url,
                fhir_servers=servers, created_at=clock.now()))
    except sa.exc.IntegrityError:
        print(f"cds-clients add: issuer {args.iss!r} is already registered", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(client_id)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `cds-clients` command group."""
    group = sub.add_parser("cds-clients", help="CDS Hooks clients (EHRs)").add_subparsers(
        dest="cds_cmd", required=True)
    s = group.add_parser("add", help="register an EHR's CDS Hooks client for an organization")
    s.add_argument("--org", required=True)
    s.add_argument("--iss", required=True, help="the JWT issuer the EHR signs with")
    keys = s.add_mutually_exclusive_group(required=True)
    keys.add_argument("--jwks-file", help="a JSON Web Key Set file (public keys)")
    keys.add_argument("--jwks-url", help="where the EHR publishes its JWKS")
    s.add_argument("--fhir-server", action="append", default=[],
                   help="a FHIR base URL the service may read from for this client (repeat)")
    s.add_argument("--database-url", help="default: AUTHSVC_DATABASE_URL")
    s.set_defaults(func=cmd_add)
