"""Dashboard settings, read from the environment when the app is built.

- `AUTHSVC_DASHBOARD_IDLE_SECONDS` (900): a session unused this long is refused.
- `AUTHSVC_DASHBOARD_MAX_SECONDS` (43200 = 12 h): a session this old is refused however
  active it was (sign in again).
- `AUTHSVC_SECRET_KEY` (development: generated once into `var/dashboard-secret-key`): signs
  the session cookie; required (32+ characters) in production.
- `AUTHSVC_DASHBOARD_SECURE_COOKIE` (auto): `1`/`0`; auto = Secure unless the public URL is
  plain http on a loopback host (`make run`, tests).

Why a key file and not a key per process: `authsvc serve` runs several gunicorn workers and
each builds its own app, so a key generated per process would make a cookie signed by one
worker unreadable by the next. Production requires `AUTHSVC_SECRET_KEY` and a Secure
cookie; without them the API still starts but `/app/` answers 503 (the reason is logged).
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from authsvc.config import Settings

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class DashboardConfigError(RuntimeError):
    """A setting that would make the dashboard unsafe or unusable."""


@dataclasses.dataclass(frozen=True)
class DashboardConfig:
    idle_seconds: int
    secret_key: str
    secure_cookie: bool
    max_seconds: int = 12 * 3600
    # why the dashboard must not serve (production without a key, or with an insecure
    # cookie): the API still starts, /app/ answers 503 and the reason is logged
    unusable: str | None = None

    @property
    def cookie_name(self) -> str:
        # `__Host-`: the browser accepts it only Secure, with Path=/ and no Domain.
        return "__Host-authsvc_dash" if self.secure_cookie else "authsvc_dash"

    @classmethod
    def from_env(cls, settings: Settings, env: Mapping[str, str] | None = None) -> DashboardConfig:
        env = os.environ if env is None else env
        raw_idle = env.get("AUTHSVC_DASHBOARD_IDLE_SECONDS", "900")
        try:
            idle = int(raw_idle)
        except ValueError:
            raise DashboardConfigError("AUTHSVC_DASHBOARD_IDLE_SECONDS must be a whole number "
                                       "of seconds") from None
        if not 1 <= idle <= 24 * 3600:
            raise DashboardConfigError("AUTHSVC_DASHBOARD_IDLE_SECONDS must be 1 to 86400")
        raw_max = env.get("AUTHSVC_DASHBOARD_MAX_SECONDS", str(12 * 3600))
        if not re.fullmatch(r"[0-9]{1,6}", raw_max) or not 1 <= int(raw_max) <= 7 * 86400:
            raise DashboardConfigError("AUTHSVC_DASHBOARD_MAX_SECONDS must be a whole number "
                                       "of seconds from 1 to 604800")
        longest = int(raw_max)
        raw_secure = env.get("AUTHSVC_DASHBOARD_SECURE_COOKIE", "auto").lower()
        if raw_secure in ("1", "true", "yes"):
            secure = True
        elif raw_secure in ("0", "false", "no"):
            secure = False
        else:
            url = urlsplit(settings.public_url)
            secure = not (url.scheme == "http" and (url.hostname or "") in LOOPBACK)
        key = env.get("AUTHSVC_SECRET_KEY", "")
        if settings.production:
            unusable = None
            if len(key) < 32:
                unusable = "AUTHSVC_SECRET_KEY (at least 32 characters) is required in production"
            elif not secure:
                unusable = "the dashboard cookie must be Secure in production"
            if unusable:
                return cls(idle_seconds=idle, secret_key="", secure_cookie=True,
                           max_seconds=longest, unusable=unusable)
        if not key:
            key = _dev_key(Path(settings.var_dir))
        return cls(idle_seconds=idle, secret_key=key, secure_cookie=secure,
                   max_seconds=longest)


def _dev_key(var_dir: Path) -> str:
    """One generated key per `var/`, shared by every worker process (0600, created once)."""
    var_dir.mkdir(parents=True, exist_ok=True)
    path = var_dir / "dashboard-secret-key"
    if not path.exists():
        tmp = var_dir / f".dashboard-secret-key.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
        try:
            os.link(tmp, path)  # atomic: the first process wins, the others read its key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()
