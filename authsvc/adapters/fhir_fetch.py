"""Reading what a CDS Hooks request did not prefetch from the EHR's FHIR server.

Why so guarded: `fhirServer` is chosen by the caller, so the service only ever talks to
servers the organization's administrator listed for that client (`authsvc cds-clients add
--fhir-server`), never follows a redirect (a listed server could point us anywhere), and
bounds every call in time and size (the hook must answer in seconds). Nothing read here is
logged: it is PHI.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

import requests

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 3.0
TOTAL_SECONDS = 5.0  # one request, headers to last byte
MAX_BYTES = 2 * 1024 * 1024
FHIR_JSON = "application/fhir+json"


class FetchFailed(Exception):
    """The FHIR server did not give a usable answer (the hook then answers 412)."""


def normalize_base(url: str) -> str:
    """A base URL as compared with the allow-list: no trailing slash, lower-case scheme+host."""
    url = (url or "").strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{path}"


class FhirFetcher:
    """Reads resources from one FHIR server on behalf of one CDS client, if allowed."""

    def __init__(self, base_url: str | None, authorization: Any,
                 allowed: Sequence[str], *, session: requests.Session | None = None,
                 before_first_use: Callable[[], None] | None = None):
        self.base = normalize_base(base_url) if isinstance(base_url, str) else ""
        self._allowed = {normalize_base(u) for u in allowed if isinstance(u, str)}
        token = authorization.get("access_token") if isinstance(authorization, dict) else None
        self._token = token if isinstance(token, str) and token else None
        self._session = session or requests.Session()
        self._session.trust_env = False  # no proxies or netrc from the environment
        self._before = before_first_use  # e.g. spend the JWT's jti before calling anyone

    @property
    def usable(self) -> bool:
        """A server was named, carries a token and is on the client's allow-list."""
        return bool(self.base) and self._token is not None and self.base in self._allowed

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """`GET [base]/Type/id`; None when the server says it does not exist."""
        if not _safe_token(resource_type) or not _safe_token(resource_id):
            return None
        data = self._get(f"{self.base}/{resource_type}/{quote(resource_id, safe='')}", None)
        if data is None:
            return None
        if data.get("resourceType") != resource_type:
            raise FetchFailed("unexpected resource type")
        return data

    def search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """`GET [base]/Type?params`: the matching resources of the first page."""
        if not _safe_token(resource_type):
            return []
        data = self._get(f"{self.base}/{resource_type}", params)
        if data is None:
            return []
        if data.get("resourceType") != "Bundle":
            raise FetchFailed("a search did not answer a Bundle")
        return [e["resource"] for e in data.get("entry") or []
                if isinstance(e, dict) and isinstance(e.get("resource"), dict)
                and e["resource"].get("resourceType") == resource_type]

    def _get(self, url: str, params: dict[str, str] | None) -> dict[str, Any] | None:
        if not self.usable:
            raise FetchFailed("the FHIR server is not allowed for this client")
        if self._before is not None:
            before, self._before = self._before, None
            before()
        started = time.monotonic()
        try:
            resp = self._session.get(
                url, params=params, allow_redirects=False, stream=True,
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                headers={"Accept": FHIR_JSON, "Authorization": f"Bearer {self._token}"})
        except requests.RequestException as exc:
            raise FetchFailed(f"FHIR server unreachable ({type(exc).__name__})") from None
        with resp:
            if resp.status_code in (404, 410):
                return None
            if resp.status_code != 200:
                raise FetchFailed(f"FHIR server answered HTTP {resp.status_code}")
            body = bytearray()
            try:
                for chunk in resp.iter_content(65536):
                    body += chunk
                    if len(body) > MAX_BYTES:
                        raise FetchFailed("FHIR answer too large")
                    if time.monotonic() - started > TOTAL_SECONDS:
                        raise FetchFailed("FHIR server too slow")
            except requests.RequestException as exc:
                raise FetchFailed(f"FHIR read failed ({type(exc).__name__})") from None
        try:
            data = json.loads(bytes(body))
        except ValueError:
            raise FetchFailed("FHIR answer is not JSON") from None
        if not isinstance(data, dict):
            raise FetchFailed("FHIR answer is not a resource")
        return data


def _safe_token(value: str) -> bool:
    """A FHIR type or id: letters, digits, `-` and `.` only (no path tricks)."""
    return (isinstance(value, str) and 0 < len(value) <= 64
            and all(c.isascii() and (c.isalnum() or c in "-.") for c in value))
