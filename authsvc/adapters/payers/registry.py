"""The payers file: which payers exist, where they listen and how we talk to them.

Payer URLs in this file are trusted configuration (no SSRF check, api.md). The file is read
when asked (never at import). Strings in `base_url` may use `${VAR}` and `${VAR:-default}`
(nested defaults allowed) so tests and `make run` can point the `demo` payer at a simulator on
another port; the shipped file says
`${AUTHSVC_SIM_URL:-http://127.0.0.1:${AUTHSVC_SIM_PORT:-8090}}/fhir`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from authsvc.domain.payer import ExchangeRecord, PayerAdapter

DEFAULT_PAYERS_FILE = Path(__file__).resolve().parents[2] / "payers.yaml"

#: The callback secret of the `demo` payer when `AUTHSVC_PAYER_DEMO_SECRET` is unset, so that
#: `make run` works out of the box. Only ever used for the payer whose id is `demo` (the
#: simulator uses the same default); every other payer must have its variable set.
DEMO_DEV_SECRET = "demo-secret-change-me"  # noqa: S105 - documented dev-only default
DEMO_PAYER_ID = "demo"

PROTOCOLS = ("pas-fhir",)
DEFAULT_POLL_SCHEDULE = (60, 300, 900, 3600, 14400)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^{}]*))?\}")
_ALLOWED_KEYS = {
    "id", "name", "protocol", "base_url", "secret_env", "timeout_seconds",
    "poll_schedule_seconds", "cms0057_impacted", "match", "eligibility_path", "org_identifier",
}


class PayerConfigError(ValueError):
    """The payers file is unusable, or a payer's secret is missing."""


@dataclasses.dataclass(frozen=True)
class PayerMatch:
    """How a FHIR Coverage's payor is recognised as this payer (CDS Hooks, api.md)."""

    payor_identifiers: tuple[str, ...] = ()  # "value" or "system|value"
    payor_names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PayerConfig:
    """One payer of the payers file."""

    id: str
    name: str
    protocol: str
    base_url: str  # env references already expanded, no trailing slash
    secret_env: str | None = None
    timeout_seconds: float = 15.0
    poll_schedule_seconds: tuple[int, ...] = DEFAULT_POLL_SCHEDULE  # last step repeats
    cms0057_impacted: bool = True
    match: PayerMatch = PayerMatch()
    eligibility_path: str = "CoverageEligibilityRequest/$submit"  # relative to base_url
    org_identifier: str | None = None  # our org id in the PAS Subscription filter

    def secret(self) -> str:
        """The HMAC secret of this payer's callbacks, read from the environment now.

        Falls back to `DEMO_DEV_SECRET` only for the `demo` payer and only when its variable is
        unset, so a real payer can never run with a known secret.
        """
        value = os.environ.get(self.secret_env) if self.secret_env else None
        if value:
            return value
        if self.id == DEMO_PAYER_ID:
            return DEMO_DEV_SECRET
        raise PayerConfigError(
            f"payer {self.id!r}: callback secret variable {self.secret_env or '(none)'} is not set"
        )

    def webhook_key(self) -> bytes:
        """The HMAC-SHA256 key for Standard Webhooks signatures of this payer's callbacks."""
        return webhook_key_from_secret(self.secret())

    def url(self, path: str) -> str:
        """An absolute URL under the payer's base URL."""
        return f"{self.base_url}/{path.lstrip('/')}"


def webhook_key_from_secret(secret: str) -> bytes:
    """The HMAC key for a payer secret; signer (simulator) and verifier (API) both use this.

    A secret in the Standard Webhooks form `whsec_<base64>` means the decoded bytes (what
    `standardwebhooks.Webhook(str)` does); any other secret is used as its UTF-8 bytes. Pass the
    result to `standardwebhooks.Webhook(key_bytes)`: `Webhook(str)` would base64-decode a plain
    secret such as the dev default and silently get a different key.
    """
    from authsvc.adapters.webhooks import secret_bytes

    try:
        return secret_bytes(secret)
    except ValueError as exc:
        raise PayerConfigError("a whsec_ secret must be base64") from exc


def expand_env(value: str, env: Mapping[str, str] | None = None) -> str:
    """Expand `${VAR}` and `${VAR:-default}` (innermost first, so defaults may nest)."""
    env = os.environ if env is None else env

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        got = env.get(name)
        if got:
            return got
        if default is not None:
            return default
        raise PayerConfigError(f"environment variable {name} is not set (used in the payers file)")

    for _ in range(10):
        expanded = _ENV_REF.sub(repl, value)
        if expanded == value:
            break
        value = expanded
    return value


def default_payers_path(env: Mapping[str, str] | None = None) -> Path:
    """`AUTHSVC_PAYERS_FILE`, else the file shipped in the package."""
    env = os.environ if env is None else env
    return Path(env.get("AUTHSVC_PAYERS_FILE") or DEFAULT_PAYERS_FILE)


def load_payers(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None) -> dict[str, PayerConfig]:
    """Read and check the payers file; a bad file fails loudly at start, not at first use."""
    file = Path(path) if path is not None else default_payers_path(env)
    try:
        with file.open(encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except OSError as exc:
        raise PayerConfigError(f"cannot read payers file {file}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PayerConfigError(f"payers file {file} is not valid YAML") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("payers"), list) or not doc["payers"]:
        raise PayerConfigError(f"payers file {file}: expected a non-empty `payers:` list")
    payers: dict[str, PayerConfig] = {}
    for index, raw in enumerate(doc["payers"]):
        cfg = _payer_from_dict(raw, f"payers[{index}]", env)
        if cfg.id in payers:
            raise PayerConfigError(f"payers file {file}: duplicate payer id {cfg.id!r}")
        payers[cfg.id] = cfg
    return payers


def _payer_from_dict(raw: Any, where: str, env: Mapping[str, str] | None) -> PayerConfig:
    if not isinstance(raw, dict):
        raise PayerConfigError(f"{where}: expected a mapping")
    unknown = sorted(set(raw) - _ALLOWED_KEYS)
    if unknown:
        raise PayerConfigError(f"{where}: unknown keys {', '.join(unknown)}")
    for key in ("id", "name", "protocol", "base_url"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise PayerConfigError(f"{where}.{key}: required string")
    if raw["protocol"] not in PROTOCOLS:
        raise PayerConfigError(f"{where}.protocol: must be one of {', '.join(PROTOCOLS)}")
    base_url = expand_env(raw["base_url"], env).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", base_url):
        raise PayerConfigError(f"{where}.base_url: must be an http(s) URL")
    timeout = raw.get("timeout_seconds", 15)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 300:
        raise PayerConfigError(f"{where}.timeout_seconds: a number in (0, 300]")
    schedule = raw.get("poll_schedule_seconds", list(DEFAULT_POLL_SCHEDULE))
    if (not isinstance(schedule, list) or not schedule
            or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in schedule)):
        raise PayerConfigError(f"{where}.poll_schedule_seconds: a non-empty list of positive ints")
    impacted = raw.get("cms0057_impacted", True)
    if not isinstance(impacted, bool):
        raise PayerConfigError(f"{where}.cms0057_impacted: true or false")
    secret_env = raw.get("secret_env")
    if secret_env is not None and (not isinstance(secret_env, str)
                                   or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", secret_env)):
        raise PayerConfigError(f"{where}.secret_env: an environment variable name")
    return PayerConfig(
        id=raw["id"].strip(),
        name=raw["name"].strip(),
        protocol=raw["protocol"],
        base_url=base_url,
        secret_env=secret_env,
        timeout_seconds=float(timeout),
        poll_schedule_seconds=tuple(schedule),
        cms0057_impacted=impacted,
        match=_match_from(raw.get("match"), f"{where}.match"),
        eligibility_path=_opt_str(raw, "eligibility_path", where)
        or "CoverageEligibilityRequest/$submit",
        org_identifier=_opt_str(raw, "org_identifier", where),
    )


def _opt_str(raw: dict[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise PayerConfigError(f"{where}.{key}: a string")
    return value


def _match_from(raw: Any, where: str) -> PayerMatch:
    if raw is None:
        return PayerMatch()
    if not isinstance(raw, dict) or set(raw) - {"payor_identifiers", "payor_names"}:
        raise PayerConfigError(f"{where}: only payor_identifiers and payor_names")
    out: dict[str, tuple[str, ...]] = {}
    for key in ("payor_identifiers", "payor_names"):
        values = raw.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise PayerConfigError(f"{where}.{key}: a list of strings")
        out[key] = tuple(values)
    return PayerMatch(**out)


def build_adapter(config: PayerConfig,
                  recorder: Callable[[ExchangeRecord], None]) -> PayerAdapter:
    """The adapter speaking this payer's protocol; `recorder` receives every HTTP exchange."""
    if config.protocol == "pas-fhir":
        from authsvc.adapters.payers.pas_fhir import PasFhirAdapter

        return PasFhirAdapter(config, recorder)
    raise PayerConfigError(f"payer {config.id!r}: unsupported protocol {config.protocol!r}")
