"""`/docs` (Swagger UI) runs a CDN's script on the same origin as the dashboard, whose
session cookie has Path=/: the script's version is pinned, and production serves no `/docs`
at all (the machine-readable `/openapi.json` stays, as api.md and S12 say)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.integration


def test_docs_loads_a_pinned_swagger_ui_version(app):
    resp = app.test_client().get("/docs")
    assert resp.status_code == 200
    sources = re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', resp.get_data(
        as_text=True))
    cdn = [s for s in sources if "swagger-ui-dist" in s]
    assert cdn, sources
    assert all(re.search(r"/swagger-ui-dist@[0-9]+\.[0-9]+\.[0-9]+/", s) for s in cdn), cdn


def test_production_serves_no_docs_page_but_keeps_openapi_json(settings, services,
                                                               monkeypatch):
    from authsvc.api import create_app

    for name in ("AUTHSVC_CORS_ORIGINS", "AUTHSVC_TLS_VERIFY", "FLASK_DEBUG", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    db = settings.database_url if settings.database_url.startswith("postgresql") else \
        "postgresql+psycopg://app@127.0.0.1:5432/authsvc"
    prod = settings.replace(production=True, public_url="https://authsvc.example",
                            redis_url=settings.redis_url or "redis://127.0.0.1:6379/0",
                            database_url=db, provider_webhook_secret="m" * 48,
                            notify_secret="n" * 48)
    if not (prod.redis_url or "").startswith(("redis://127.", "unix:")):
        pytest.skip("test Redis is not on loopback")
    app = create_app(prod, services)
    client = app.test_client()
    assert client.get("/docs").status_code == 404
    assert not [r for r in app.url_map.iter_rules() if r.rule.startswith("/docs")]
    spec = client.get("/openapi.json")
    assert spec.status_code == 200 and "/v1/orders" in spec.get_json()["paths"]
