"""Browser tests of the coordinators' dashboard: Playwright driving Debian's chromium.

Never `playwright install`: the browser is /usr/bin/chromium (`make test` installs it with
apt when missing). The system under test is real: `System` starts the API (gunicorn), the
worker, the scheduler and the payer simulator as processes.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from tests.e2e.harness import Http, System

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "var" / "test-artifacts"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail("chromium is missing: run `make test` (it installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def context(browser):
    ctx = browser.new_context(viewport={"width": 1366, "height": 900}, locale="en-US")
    ctx.set_default_timeout(15_000)
    yield ctx
    ctx.close()


@pytest.fixture()
def page(context):
    pg = context.new_page()
    pg.on("dialog", lambda dialog: dialog.accept())  # the actions' confirmations
    return pg


@pytest.fixture(scope="module")
def system(database_url, redis_url, tmp_path_factory):
    sysm = System(database_url, redis_url, tmp_path_factory.mktemp("browser"))
    try:
        yield sysm.up()
    finally:
        sysm.stop()


@pytest.fixture(scope="module")
def org() -> str:
    return f"dash-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def org_tokens(system, org) -> dict[str, str]:
    return {role: system.token(org, role) for role in ("clinician", "coordinator", "admin")}


@pytest.fixture(scope="module")
def clinician_api(system, org_tokens) -> Http:
    return Http(system.api, org_tokens["clinician"])


@pytest.fixture(scope="module")
def coordinator_api(system, org_tokens) -> Http:
    return Http(system.api, org_tokens["coordinator"])
