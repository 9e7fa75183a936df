"""Hot reload on real processes: edit rules/demo.yaml, reload, and the next order changes.

The system runs on a copy of rules/ (AUTHSVC_RULES_DIR); nothing is restarted.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import order_body
from tests.e2e.harness import Http, System, wait_for

pytestmark = pytest.mark.e2e
RULES = Path(__file__).resolve().parents[2] / "rules"
MRI = 'codes: {CPT: ["72148", "72149", "72158"]}\n    pa_required: '


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("rules")
    shutil.copy(RULES / "demo.yaml", target / "demo.yaml")
    return target


@pytest.fixture(scope="module")
def system(database_url, redis_url, tmp_path_factory, rules_dir):
    sysm = System(database_url, redis_url, tmp_path_factory.mktemp("e2e-rules"),
                  extra_env={"AUTHSVC_TESTING": "1", "AUTHSVC_RULES_DIR": str(rules_dir)})
    try:
        yield sysm.up()
    finally:
        sysm.stop()


def edit(rules_dir: Path, version: str, mri_pa: str) -> None:
    path = rules_dir / "demo.yaml"
    text = path.read_text()
    head, _, rest = text.partition('version: "')
    old_version = rest.split('"', 1)[0]
    text = text.replace(f'version: "{old_version}"', f'version: "{version}"')
    start = text.index(MRI) + len(MRI)
    end = text.index("\n", start)
    path.write_text(text[:start] + mri_pa + text[end:])


def submit(http: Http) -> dict:
    status, _, order = http.request("POST", "/v1/orders", order_body(
        f"SIM-APPROVE-{uuid.uuid4().hex[:8].upper()}"), {"Idempotency-Key": uuid.uuid4().hex})
    assert status == 201, order
    return order


def test_edit_reload_and_the_next_order_changes_without_a_restart(system, rules_dir):
    clinician = Http(system.api, system.token("e2e-rules", "clinician"))
    admin = Http(system.api, system.token("e2e-rules", "admin"))
    pids = {name: proc.pid for name, proc in system.procs.items()}

    before = submit(clinician)
    assert before["lines"][0]["determination"]["pa_needed"] == "auth-needed"
    assert before["ruleset_version"] == "demo@2026-11-20.1"

    # 1. edit demo.yaml: lumbar MRI no longer needs authorization; bump the version
    version = f"2026-11-26.{uuid.uuid4().hex[:6]}"
    edit(rules_dir, version, "false")
    status, _, body = admin.request("POST", "/v1/admin/rules/reload")
    assert status == 200, body
    # (other tests of the session may have activated payers this copy of rules/ lacks: the
    # reload deactivates them, and says so in `changed`)
    assert body["status"] == "loaded" and body["changed"][0] == f"demo@{version}"
    assert body["active"] == {"demo": f"demo@{version}"}
    time.sleep(2.2)  # every process (both API workers) checks the record at least every 2 s
    after = submit(clinician)
    det = after["lines"][0]["determination"]
    assert after["ruleset_version"] == f"demo@{version}"
    assert (det["pa_needed"], det["rules"]) == ("no-auth", ["demo/imaging/mri-lumbar"])
    final = wait_for(lambda: (o := clinician.request("GET", f"/v1/orders/{after['id']}")[2])
                     ["status"] == "no_auth_required" and o, timeout=60)
    assert final["status"] == "no_auth_required"
    # the earlier order keeps the version it was determined with
    _, _, old = clinician.request("GET", f"/v1/orders/{before['id']}")
    assert old["ruleset_version"] == "demo@2026-11-20.1"

    # 2. a file changed under the same version: refused, the last good version stays
    # every process has followed already (the record is read every 2 s, traffic or not)
    edit(rules_dir, version, "conditional")
    status, _, problem = admin.request("POST", "/v1/admin/rules/reload")
    assert status == 422 and "change `version:`" in problem["errors"][0]["message"]
    time.sleep(2.2)
    _, _, ready = Http(system.api).request("GET", "/readyz")
    assert "version:` did not" in ready["checks"]["rules"] or "refused" in ready["checks"][
        "rules"]
    assert submit(clinician)["lines"][0]["determination"]["pa_needed"] == "no-auth"

    # 3. SIGHUP to `authsvc serve` (the gunicorn master) reloads too; workers keep running
    version2 = f"2026-11-26.{uuid.uuid4().hex[:6]}"
    edit(rules_dir, version2, "conditional")
    os.kill(pids["api"], signal.SIGHUP)

    def preview_pa():  # type: ignore[no-untyped-def]
        status, _, body = clinician.request("POST", "/v1/coverage-requirements", order_body())
        assert status == 200, body
        return body["ruleset_version"] == f"demo@{version2}" and body["lines"][0][
            "determination"]["pa_needed"]

    assert wait_for(preview_pa, timeout=15) == "conditional"
    time.sleep(2.2)  # the other API worker follows within 2 s too
    listing = admin.request("GET", "/v1/admin/rules")[2]
    active = [i for i in listing["items"] if i["active"]]
    assert [i["ruleset_version"] for i in active] == [f"demo@{version2}"]  # demo only now
    assert active[0]["files"] and listing["status"] == "ok"
    assert {i["version"] for i in listing["items"]} >= {"2026-11-20.1", version, version2}

    # SIGHUP to the queue worker and the scheduler: a reload, not a hang-up
    for name in ("worker", "scheduler"):
        os.kill(pids[name], signal.SIGHUP)
    time.sleep(1)
    assert all(system.procs[n].poll() is None for n in ("api", "worker", "scheduler"))
