"""Shared fixtures: a fresh database per test session (PostgreSQL or SQLite), real Redis,
settings, services, a Flask test client and API tokens for two organizations."""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from authsvc.config import ROOT, Settings

FIXTURES = ROOT.parent / "shared" / "fixtures"
# Every FHIR resource we build, and every answer the simulator sends, is validated in tests.
os.environ["AUTHSVC_FHIR_VALIDATE"] = "1"
DEMO_SECRET = "whsec_dGVzdC1zZWNyZXQtZm9yLWF1dGhzdmMtdGVzdHM="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _test_urls() -> tuple[str, str]:
    db = os.environ.get("AUTHSVC_TEST_DATABASE_URL")
    redis_url = os.environ.get("AUTHSVC_TEST_REDIS_URL")
    if not db or not redis_url:
        raise RuntimeError("run the suite with `make test` (it sets AUTHSVC_TEST_DATABASE_URL "
                           "and AUTHSVC_TEST_REDIS_URL)")
    return db, redis_url


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database of its own for this session, migrated to head."""
    from authsvc.adapters.db.engine import upgrade

    base, _ = _test_urls()
    if base.startswith("postgresql"):
        name = f"authsvc_t_{secrets.token_hex(4)}"
        admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        url = base.rsplit("/", 1)[0] + "/" + name
        upgrade(url)
        yield url
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    else:
        path = Path(tempfile.mkdtemp(prefix="authsvc-db-")) / "test.db"
        url = f"sqlite:///{path}"
        upgrade(url)
        yield url


@pytest.fixture()
def sinks():
    """A real SMTP server (aiosmtpd) and the HTTP SMS sink, for notification tests."""
    from authsvc.adapters.notify.sinks import SmsSink, SmtpSink

    smtp = SmtpSink(port=free_port()).start()
    sms = SmsSink(port=0).start()
    yield smtp, sms
    smtp.stop()
    sms.stop()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _test_urls()[1]


@pytest.fixture(scope="session")
def sim_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str, tmp_path_factory, sim_port: int) -> Settings:
    os.environ["AUTHSVC_PAYER_DEMO_SECRET"] = DEMO_SECRET
    os.environ["AUTHSVC_SIM_URL"] = f"http://127.0.0.1:{sim_port}"
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_REDIS_URL": redis_url,
        "AUTHSVC_VAR_DIR": str(tmp_path_factory.mktemp("var")),
        "AUTHSVC_RETRY_BASE_SECONDS": "0.2",
        "AUTHSVC_LEASE_SECONDS": "20",
    }
    return Settings.from_env(env)


@pytest.fixture(scope="session")
def services(settings: Settings):
    from authsvc.bootstrap import bootstrap

    svc = bootstrap(settings)
    yield svc
    svc.close()


@pytest.fixture(scope="session")
def app(settings: Settings, services):
    from authsvc.api import create_app

    return create_app(settings, services)


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def tokens(services) -> dict[str, dict[str, str]]:
    """{org: {role: token}} for two organizations, every role."""
    from authsvc.api.auth import ROLES, create_token

    out: dict[str, dict[str, str]] = {}
    with services.engine.begin() as conn:
        for org in ("org-a", "org-b"):
            out[org] = {}
            for role in ROLES:
                _, token = create_token(conn, org, role, name=f"{org}-{role}")
                out[org][role] = token
    return out


def auth(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def order_body(member_id: str = "SIM-APPROVE-0001", **overrides) -> dict:
    """A realistic order: lumbar MRI for low back pain (api.md example)."""
    body = {
        "external_id": "EHR-ORD-1001",
        "urgency": "standard",
        "patient": {
            "mrn": "MRN-0001", "given_name": "Ana", "family_name": "Diaz",
            "birth_date": "1984-03-02", "sex": "female",
            "contacts": [{"role": "patient", "email": "ana@example.org", "phone": "+15555550101",
                          "channel": "sms", "language": "es"}],
        },
        "coverage": {"payer_id": "demo", "member_id": member_id, "group_number": "G-100"},
        "requester": {"npi": "1003000126", "name": "Dr. Rivera"},
        "performer": {"npi": "1245319599", "name": "Valley Imaging"},
        "place_of_service": "22",
        "diagnoses": ["M54.50"],
        "lines": [{"sequence": 1, "code_system": "CPT", "code": "72148", "quantity": 1,
                   "service_start": "2026-12-01", "service_end": "2026-12-31"}],
        "notes": "Low back pain 8 weeks, failed conservative therapy.",
    }
    body.update(overrides)
    return body
