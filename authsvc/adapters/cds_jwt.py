"""Verifying the JWT an EHR sends with every CDS Hooks call (CDS Hooks 2.0 › Trusting CDS clients).

Why each check: the algorithm is pinned to RS384/ES384 before anything is decoded (no
`none`, no HS256 keyed with a public key); the issuer must be a client an administrator
registered for an organization (`authsvc cds-clients add`), and its keys come from that
registration only (a stored JWKS, or its `jwks_url` fetched without redirects, bounded in
time and cached); `aud` must be the full URL of the service called, so a token minted for
another service or host is useless here; `exp` at most five minutes ahead limits the damage
of a leaked token; a `jti` is accepted once (table `cds_jtis`), so a captured call cannot
be replayed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import random
import threading
import time
from typing import Any

import jwt
import requests
import sqlalchemy as sa

from authsvc.adapters.db import tables as t

log = logging.getLogger(__name__)

ALGORITHMS = ("RS384", "ES384")
MAX_LIFETIME = dt.timedelta(minutes=5)
LEEWAY_SECONDS = 30
JWKS_TTL_SECONDS = 300.0
JWKS_REFETCH_SECONDS = 30.0  # an unknown kid refetches the JWKS at most this often
JWKS_TIMEOUT = (2.0, 3.0)
JWKS_MAX_BYTES = 256 * 1024


class JwtRejected(Exception):
    """The call is not authenticated; `reason` is short, safe to audit and to answer."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class CdsClient:
    """A registered CDS client: the organization it acts for and the servers it may name."""

    id: str
    org_id: str
    iss: str
    fhir_servers: tuple[str, ...]
    jti: str = ""
    expires_at: dt.datetime | None = None


# ------------------------------------------------------------------ keys


_lock = threading.Lock()
_url_cache: dict[str, tuple[float, float, dict[str, Any]]] = {}  # url -> (expires, fetched, jwks)
_keyset_cache: dict[str, jwt.PyJWKSet] = {}  # digest of a JWKS -> parsed keys


def _fetch_jwks(url: str) -> dict[str, Any]:
    try:
        resp = requests.get(url, timeout=JWKS_TIMEOUT, allow_redirects=False, stream=True,
                            headers={"Accept": "application/json"})
    except requests.RequestException as exc:
        raise JwtRejected(f"jwks_unreachable:{type(exc).__name__}") from None
    with resp:
        if resp.status_code != 200:
            raise JwtRejected(f"jwks_http_{resp.status_code}")
        raw = resp.raw.read(JWKS_MAX_BYTES + 1, decode_content=True)
    if len(raw) > JWKS_MAX_BYTES:
        raise JwtRejected("jwks_too_large")
    try:
        data = json.loads(raw)
    except ValueError:
        raise JwtRejected("jwks_not_json") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwtRejected("jwks_malformed")
    return data


def _jwks_for(row: dict[str, Any], *, refresh: bool = False) -> dict[str, Any]:
    if row.get("jwks"):
        return row["jwks"] if isinstance(row["jwks"], dict) else json.loads(row["jwks"])
    url = row.get("jwks_url")
    if not url:
        raise JwtRejected("client_has_no_keys")
    now = time.monotonic()
    with _lock:
        cached = _url_cache.get(url)
    if cached and now < cached[0] and not (refresh and now - cached[1] > JWKS_REFETCH_SECONDS):
        return cached[2]
    data = _fetch_jwks(url)
    with _lock:
        _url_cache[url] = (now + JWKS_TTL_SECONDS, now, data)
    return data


def _keyset(jwks: dict[str, Any]) -> jwt.PyJWKSet:
    digest = hashlib.sha256(json.dumps(jwks, sort_keys=True).encode()).hexdigest()
    with _lock:
        got = _keyset_cache.get(digest)
    if got is not None:
        return got
    try:
        keyset = jwt.PyJWKSet.from_dict(jwks)
    except jwt.PyJWTError:
        raise JwtRejected("jwks_unusable") from None
    with _lock:
        if len(_keyset_cache) > 256:
            _keyset_cache.clear()
        _keyset_cache[digest] = keyset
    return keyset


def _pick(keyset: jwt.PyJWKSet, kid: str | None, alg: str) -> list[Any]:
    """Candidate keys for this token: the one with its kid, else every key of the right type."""
    want_kty = "RSA" if alg.startswith("RS") else "EC"
    keys = []
    for k in keyset.keys:
        if kid is not None and k.key_id != kid:
            continue
        if k.key_type != want_kty:
            continue
        if k._jwk_data.get("use") not in (None, "sig"):
            continue
        if k._jwk_data.get("alg") not in (None, alg):
            continue
        keys.append(k.key)
    return keys


# ------------------------------------------------------------------ verification


CLIENT_TTL_SECONDS = 10.0
_clients: dict[str, tuple[float, dict[str, Any]]] = {}  # iss -> (expires, row)


def client_row(engine: sa.Engine, iss: str) -> dict[str, Any] | None:
    """The registered client of an issuer; kept 10 s per process (a hook call then needs no
    read of its own). Unknown issuers are never cached, so a new client works at once."""
    now = time.monotonic()
    with _lock:
        cached = _clients.get(iss)
    if cached and now < cached[0]:
        return cached[1]
    c = t.cds_clients
    with engine.connect() as conn:
        row = conn.execute(sa.select(c).where(c.c.iss == iss)).mappings().first()
    if row is None:
        return None
    with _lock:
        if len(_clients) > 1024:
            _clients.clear()
        _clients[iss] = (now + CLIENT_TTL_SECONDS, dict(row))
    return dict(row)


def authenticate(engine: sa.Engine, token: str | None, audience: str, *,
                 now: dt.datetime | None = None) -> CdsClient:
    """The registered client whose valid, fresh JWT this is, or JwtRejected.

    The jti is not spent here: the caller calls `spend_jti` in the transaction that stores
    the call's work (before anything is stored or fetched), so a jti is accepted once.
    """
    if not token:
        raise JwtRejected("missing_token")
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise JwtRejected("malformed_token") from None
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise JwtRejected("algorithm_not_allowed")
    iss = unverified.get("iss")
    if not isinstance(iss, str) or not iss or len(iss) > 500:
        raise JwtRejected("missing_iss")
    row = client_row(engine, iss)
    if row is None:
        raise JwtRejected("unknown_issuer")
    kid = header.get("kid") if isinstance(header.get("kid"), str) else None
    claims = _decode(token, row, alg, kid, audience, iss)
    now = now or dt.datetime.now(dt.UTC)
    if claims["exp"] - now.timestamp() > (MAX_LIFETIME.total_seconds() + LEEWAY_SECONDS):
        raise JwtRejected("exp_too_far")
    exp = dt.datetime.fromtimestamp(claims["exp"], dt.UTC)
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > 200:
        raise JwtRejected("bad_jti")
    return CdsClient(id=row["id"], org_id=row["org_id"], iss=iss,
                     fhir_servers=tuple(row.get("fhir_servers") or ()), jti=jti,
                     expires_at=exp + dt.timedelta(seconds=LEEWAY_SECONDS))


def _decode(token: str, row: dict[str, Any], alg: str, kid: str | None, audience: str,
            iss: str) -> dict[str, Any]:
    last = "no_matching_key"
    for attempt in range(2):
        keyset = _keyset(_jwks_for(row, refresh=attempt == 1))
        keys = _pick(keyset, kid, alg)
        for key in keys:
            try:
                return jwt.decode(
                    token, key=key, algorithms=[alg], audience=audience, issuer=iss,
                    leeway=LEEWAY_SECONDS,
                    options={"require": ["iss", "sub", "aud", "exp", "jti"]})
            except jwt.InvalidSignatureError:
                last = "bad_signature"
            except jwt.ExpiredSignatureError:
                raise JwtRejected("expired") from None
            except jwt.InvalidAudienceError:
                raise JwtRejected("wrong_audience") from None
            except jwt.InvalidIssuerError:
                raise JwtRejected("wrong_issuer") from None
            except jwt.MissingRequiredClaimError as exc:
                raise JwtRejected(f"missing_{exc.claim}") from None
            except jwt.ImmatureSignatureError:
                raise JwtRejected("not_yet_valid") from None
            except (jwt.PyJWTError, ValueError, TypeError):
                last = "invalid_token"
        if keys or not row.get("jwks_url"):
            break  # a key was tried (a refetch would not help), or keys are stored
    raise JwtRejected(last)


def spend_jti(conn: sa.Connection, client: CdsClient, *,
              now: dt.datetime | None = None) -> None:
    """Record the call's jti in the caller's transaction; JwtRejected when it was used.

    On PostgreSQL a concurrent call with the same jti waits on the unique index until the
    first commits, then fails here; the caller rolls back and answers 401.
    """
    j = t.cds_jtis
    try:
        conn.execute(j.insert().values(iss=client.iss, jti=client.jti,
                                       expires_at=client.expires_at))
    except sa.exc.IntegrityError:
        raise JwtRejected("replayed_jti") from None
    if random.random() < 0.01:  # noqa: S311 - housekeeping, not security
        conn.execute(j.delete().where(j.c.expires_at < (now or dt.datetime.now(dt.UTC))))
