"""Static security checks of `make test` (called from tests/run.py next to ruff).

bandit over authsvc/ (medium severity and confidence and up; config in pyproject.toml) must be
clean. pip-audit runs when its advisory source answers: from a machine without it (every
dependency comes back "could not be audited") it says so and does not fail the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def bandit_and_pip_audit(root: Path, env: Mapping[str, str]) -> int:
    """0 when bandit is clean and pip-audit found nothing (or could not ask); else 1."""
    bindir = Path(sys.executable).parent
    bandit = subprocess.run([str(bindir / "bandit"), "-q", "-r", "authsvc", "-ll", "-ii",
                             "-c", "pyproject.toml"], cwd=root, env=dict(env))
    if bandit.returncode != 0:
        print("bandit found problems", file=sys.stderr)
        return 1
    try:
        audit = subprocess.run([str(bindir / "pip-audit"), "-l", "--progress-spinner", "off",
                                "-f", "json"], cwd=root, env=dict(env), capture_output=True,
                               text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"pip-audit skipped: {type(exc).__name__}", flush=True)
        return 0
    try:
        report = json.loads(audit.stdout or "{}")
    except ValueError:
        print("pip-audit skipped: advisory source unreachable", flush=True)
        return 0
    deps = report.get("dependencies", [])
    vulnerable = [d for d in deps if d.get("vulns")]
    audited = [d for d in deps if "skip_reason" not in d]
    if vulnerable:
        for dep in vulnerable:
            ids = ", ".join(v["id"] for v in dep["vulns"])
            print(f"pip-audit: {dep['name']} {dep.get('version')}: {ids}", file=sys.stderr)
        return 1
    if not audited:
        print("pip-audit skipped: advisory source unreachable (no dependency could be "
              "audited)", flush=True)
    else:
        print(f"pip-audit: {len(audited)} dependencies, no known vulnerabilities", flush=True)
    return 0
