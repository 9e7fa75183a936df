"""Coverage-requirements preview, rules versions in the database, reload and refusal."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from authsvc.adapters import ruleset_store
from authsvc.adapters.db import tables as t
from authsvc.adapters.rules_engine import RulesEngine
from authsvc.bootstrap import RulesHolder, bootstrap
from authsvc.service_layer import rules_admin
from tests.conftest import auth, order_body

pytestmark = pytest.mark.integration
RULES = Path(__file__).resolve().parents[2] / "rules"


def preview(client, token, body):
    return client.post("/v1/coverage-requirements", json=body, headers=auth(token))


# ------------------------------------------------------------------ preview

def test_preview_equals_the_order_determination_and_stores_nothing(client, tokens, services):
    token = tokens["org-a"]["clinician"]
    body = order_body(lines=[
        {"sequence": 1, "code_system": "CPT", "code": "72148", "quantity": 1,
         "service_start": "2026-12-01"},
        {"sequence": 2, "code_system": "CPT", "code": "99213", "quantity": 1,
         "service_start": "2026-12-01"},
        {"sequence": 3, "code_system": "HCPCS", "code": "E0424", "quantity": 1,
         "service_start": "2026-12-01"},
        {"sequence": 4, "code_system": "CPT", "code": "12345", "quantity": 1,
         "service_start": "2026-12-01"},
    ])
    with services.engine.connect() as conn:
        before = conn.execute(sa.select(sa.func.count()).select_from(t.orders)).scalar()
    resp = preview(client, token, body)
    assert resp.status_code == 200, resp.get_json()
    got = resp.get_json()
    with services.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.orders)).scalar() == before
        assert conn.execute(sa.select(sa.func.count()).select_from(t.outbox)).scalar() is not None
    order = client.post("/v1/orders", json=body,
                        headers=auth(token, **{"Idempotency-Key": uuid.uuid4().hex})).get_json()
    assert got["ruleset_version"] == order["ruleset_version"] == "demo@2026-11-20.1"
    assert got["lines"] == [
        {"sequence": ln["sequence"], "code_system": ln["code_system"], "code": ln["code"],
         "determination": ln["determination"]} for ln in order["lines"]]
    assert [ln["determination"]["pa_needed"] for ln in got["lines"]] == [
        "auth-needed", "no-auth", "auth-needed", "conditional"]


def test_preview_validates_like_an_order_and_checks_roles(client, tokens):
    body = order_body()
    body["lines"][0]["code"] = "7214"
    resp = preview(client, tokens["org-a"]["coordinator"], body)
    assert resp.status_code == 422 and resp.mimetype == "application/problem+json"
    assert {e["field"] for e in resp.get_json()["errors"]} == {"lines[0].code"}
    assert preview(client, tokens["org-a"]["billing"], order_body()).status_code == 403
    assert client.post("/v1/coverage-requirements", json=order_body()).status_code == 401
    resp = client.post("/v1/coverage-requirements", data="{", headers={
        **auth(tokens["org-a"]["admin"]), "Content-Type": "application/json"})
    assert resp.status_code == 400
    assert preview(client, tokens["org-a"]["admin"], order_body()).status_code == 200


# ------------------------------------------------------------------ versions and reload

def _copy_rules(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    target.mkdir()
    shutil.copy(RULES / "demo.yaml", target / "demo.yaml")
    return target


def _edit_demo(directory: Path, version: str, mri_pa: str = "false") -> None:
    path = directory / "demo.yaml"
    text = path.read_text()
    text = text.replace('version: "2026-11-20.1"', f'version: "{version}"')
    marker = "codes: {CPT: [\"72148\", \"72149\", \"72158\"]}\n    pa_required: true"
    assert marker in text
    text = text.replace(marker, marker.replace("pa_required: true", f"pa_required: {mri_pa}"))
    path.write_text(text)


@pytest.fixture()
def fresh_db(settings, services):
    """The session database with ruleset_versions emptied (restored to demo afterwards)."""
    with services.engine.begin() as conn:
        conn.execute(t.ruleset_versions.delete())
    yield services.engine
    with services.engine.begin() as conn:
        conn.execute(t.ruleset_versions.delete())
    rules_admin.reload(services.engine, RULES, services.rules)


def _mri(holder: RulesHolder) -> str:
    from tests.unit.test_rules_engine import line, order

    (d,) = holder.current().determine(order(line("72148")))
    return d.pa_needed


def test_reload_records_versions_and_every_holder_follows(tmp_path, settings, fresh_db):
    rules_dir = _copy_rules(tmp_path)
    s = settings.replace(rules_dir=rules_dir)
    first = bootstrap(s)  # first start: records demo@2026-11-20.1 as active
    other = bootstrap(s)
    try:
        with fresh_db.connect() as conn:
            active = ruleset_store.active_versions(conn)
        assert set(active) == {"demo"} and active["demo"][0] == "2026-11-20.1"
        assert _mri(first.rules) == _mri(other.rules) == "auth-needed"

        version = f"2026-11-26.{uuid.uuid4().hex[:6]}"
        _edit_demo(rules_dir, version)
        # files changed on disk but nothing was reloaded: both keep the active version
        other.rules.check(wait=True)
        assert _mri(other.rules) == "auth-needed" and other.rules.last_error is None

        result = rules_admin.reload(fresh_db, rules_dir, first.rules, source="test")
        assert result.changed == [f"demo@{version}"]
        assert _mri(first.rules) == "no-auth"  # this process at once
        other.rules.check(wait=True)  # the others on their next check (≤ 2 s)
        assert _mri(other.rules) == "no-auth"
        assert other.rules.current().version("demo") == f"demo@{version}"
        # reloading the same files again changes nothing
        assert rules_admin.reload(fresh_db, rules_dir, first.rules).changed == []

        # a file changed while its version did not: refused, the last good version stays
        (rules_dir / "demo.yaml").write_text((rules_dir / "demo.yaml").read_text().replace(
            "pa_required: false", "pa_required: conditional", 1))
        with pytest.raises(rules_admin.ReloadRefused) as refused:
            rules_admin.reload(fresh_db, rules_dir, first.rules)
        assert "change `version:`" in refused.value.errors[0]
        assert _mri(first.rules) == "no-auth"
        assert "reload refused" in first.rules.last_error
        other.rules.check(wait=True)
        assert _mri(other.rules) == "no-auth"
        assert "version:` did not" in other.rules.last_error
        with fresh_db.connect() as conn:
            assert ruleset_store.active_versions(conn)["demo"][0] == version

        # an invalid file: refused with file:line
        (rules_dir / "demo.yaml").write_text("payer_id: demo\nversion: 3\n")
        with pytest.raises(rules_admin.ReloadRefused) as refused:
            rules_admin.reload(fresh_db, rules_dir, first.rules)
        assert "demo.yaml:2:" in refused.value.errors[0]
        assert _mri(first.rules) == "no-auth"
    finally:
        first.close()
        other.close()


def test_a_process_on_other_files_keeps_its_engine_and_says_why(tmp_path, settings, fresh_db):
    rules_dir = _copy_rules(tmp_path)
    svc = bootstrap(settings.replace(rules_dir=rules_dir))
    try:
        with fresh_db.begin() as conn:  # another machine activated a version we do not have
            conn.execute(t.ruleset_versions.update().values(active=False))
            conn.execute(t.ruleset_versions.insert().values(
                payer_id="demo", version="9999", digest="0" * 64, active=True,
                loaded_at=sa.func.now()))
        svc.rules.check(wait=True)
        assert _mri(svc.rules) == "auth-needed"
        assert "demo@9999" in svc.rules.last_error
    finally:
        svc.close()


def test_current_checks_the_database_at_most_every_two_seconds(tmp_path, settings, fresh_db):
    rules_dir = _copy_rules(tmp_path)
    svc = bootstrap(settings.replace(rules_dir=rules_dir))
    calls = []
    real = ruleset_store.active_versions

    def counting(conn):
        calls.append(1)
        return real(conn)

    ruleset_store.active_versions = counting
    try:
        started = time.perf_counter()
        for _ in range(10_000):
            svc.rules.current()
        per_call = (time.perf_counter() - started) / 10_000
        assert len(calls) <= 1 and per_call < 20e-6
    finally:
        ruleset_store.active_versions = real
        svc.close()


def test_admin_endpoints(client, tokens, services, fresh_db):
    admin = auth(tokens["org-a"]["admin"])
    assert client.get("/v1/admin/rules", headers=auth(tokens["org-a"]["clinician"])
                      ).status_code == 403
    resp = client.post("/v1/admin/rules/reload", headers=admin)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["active"] == {"demo": "demo@2026-11-20.1",
                                         "medicare": "medicare@2026-11-26.1"}
    listing = client.get("/v1/admin/rules", headers=admin).get_json()
    item, medicare = listing["items"]
    assert item["active"] and item["ruleset_version"] == "demo@2026-11-20.1"
    assert medicare["active"] and list(medicare["files"]) == ["medicare.yaml"]
    assert list(item["files"]) == ["demo.yaml"] and len(item["files"]["demo.yaml"]) == 64
    assert item["digest"] == services.rules.current().versions()["demo"]["digest"]
    assert listing["in_use"]["demo"] == "demo@2026-11-20.1" and listing["status"] == "ok"
    again = client.post("/v1/admin/rules/reload", headers=admin).get_json()
    assert again["status"] == "unchanged"


def test_admin_reload_refusal_is_a_problem_and_shows_in_readyz(client, tokens, services,
                                                               tmp_path, fresh_db):
    rules_dir = _copy_rules(tmp_path)
    (rules_dir / "demo.yaml").write_text((rules_dir / "demo.yaml").read_text() + "\nbogus: 1\n")
    old_settings = services.settings
    services.settings = old_settings.replace(rules_dir=rules_dir)
    try:
        resp = client.post("/v1/admin/rules/reload", headers=auth(tokens["org-a"]["admin"]))
        assert resp.status_code == 422 and resp.mimetype == "application/problem+json"
        assert "unknown field 'bogus'" in resp.get_json()["errors"][0]["message"]
        ready = client.get("/readyz").get_json()
        assert ready["status"] == "ok" and "reload refused" in ready["checks"]["rules"]
        metrics = client.get("/metrics").get_data(as_text=True)
        assert 'authsvc_rules_reloads_total{outcome="refused"}' in metrics
        assert _mri(services.rules) == "auth-needed"
    finally:
        services.settings = old_settings
        services.rules.swap(services.rules.current())
    assert client.get("/readyz").get_json()["checks"]["rules"] == "ok"


def test_engine_is_built_from_files_matching_the_active_digest(tmp_path, settings, fresh_db):
    rules_dir = _copy_rules(tmp_path)
    svc = bootstrap(settings.replace(rules_dir=rules_dir))
    try:
        assert isinstance(svc.rules.current(), RulesEngine)
        digest = svc.rules.current().versions()["demo"]["digest"]
        with fresh_db.connect() as conn:
            assert ruleset_store.active_versions(conn)["demo"][1] == digest
    finally:
        svc.close()


def test_cli_reload_and_validate_check_the_database(tmp_path, settings, fresh_db, monkeypatch,
                                                    capsys):
    from authsvc.cli import main

    rules_dir = _copy_rules(tmp_path)
    monkeypatch.setenv("AUTHSVC_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("AUTHSVC_RULES_DIR", str(rules_dir))
    assert main(["rules", "reload"]) == 0
    assert "loaded: active demo@2026-11-20.1" in capsys.readouterr().out
    assert main(["rules", "reload"]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert main(["rules", "validate"]) == 0
    assert ": ok: demo@2026-11-20.1" in capsys.readouterr().out
    # the file changes, its version does not: validate and reload both refuse
    path = rules_dir / "demo.yaml"
    path.write_text(path.read_text().replace("Knee MRI requires", "Knee MRI needs"))
    assert main(["rules", "validate"]) == 1
    out = capsys.readouterr().out
    assert f"{path}:1:" in out and "change `version:`" in out
    assert main(["rules", "validate", "--no-db"]) == 0
    capsys.readouterr()
    assert main(["rules", "reload"]) == 1
    assert "change `version:`" in capsys.readouterr().out
    with fresh_db.connect() as conn:
        assert ruleset_store.active_versions(conn)["demo"][0] == "2026-11-20.1"
