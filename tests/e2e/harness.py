"""Start authsvc's real processes (serve, worker, scheduler, payer-sim) on free ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import DEMO_SECRET, free_port


class Http:
    """A tiny JSON client over urllib (no mocks, real sockets)."""

    def __init__(self, base: str, token: str | None = None):
        self.base = base
        self.token = token

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None,
                timeout: float = 30) -> tuple[int, dict, Any]:
        data = json.dumps(body).encode() if body is not None else None
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        hdrs.update(headers or {})
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
                raw = resp.read()
                return resp.status, dict(resp.headers), json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, dict(exc.headers), json.loads(raw) if raw else None


class System:
    """The whole system as separate processes, logs under `logdir`."""

    def __init__(self, database_url: str, redis_url: str, logdir: Path,
                 extra_env: dict[str, str] | None = None):
        self.logdir = logdir
        self.api_port = free_port()
        self.sim_port = free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.sim = f"http://127.0.0.1:{self.sim_port}"
        self.env = {
            **os.environ,
            "AUTHSVC_DATABASE_URL": database_url,
            "AUTHSVC_REDIS_URL": redis_url,
            "AUTHSVC_VAR_DIR": str(logdir / "var"),
            "AUTHSVC_PORT": str(self.api_port),
            "AUTHSVC_PUBLIC_URL": self.api,
            "AUTHSVC_SIM_PORT": str(self.sim_port),
            "AUTHSVC_SIM_URL": self.sim,
            "AUTHSVC_SIM_PEND_SECONDS": "1",
            "AUTHSVC_PAYER_DEMO_SECRET": DEMO_SECRET,
            "AUTHSVC_RETRY_BASE_SECONDS": "0.3",
            "AUTHSVC_LEASE_SECONDS": "8",
            "AUTHSVC_SWEEP_AFTER_SECONDS": "3",
            "AUTHSVC_BROKER_NAMESPACE": f"e2e-{self.api_port}",
            "AUTHSVC_FHIR_VALIDATE": "1",
            **(extra_env or {}),
        }
        self.namespace = self.env["AUTHSVC_BROKER_NAMESPACE"]
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        proc = subprocess.Popen([sys.executable, "-m", "authsvc.cli", *args],
                                env={**self.env, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "authsvc.cli", *args], env=self.env,
                              check=True, capture_output=True, text=True).stdout

    def token(self, org: str, role: str) -> str:
        return self.cli("tokens", "create", "--org", org, "--role", role,
                        "--name", f"{org}-{role}").strip().splitlines()[-1]

    def up(self) -> System:
        self.start("payer-sim", "payer-sim")
        self.start("api", "serve", "--workers", "2")
        self.start("worker", "worker", "--threads", "4")
        self.start("scheduler", "scheduler")
        self.wait_http(f"{self.sim}/sim/submissions")
        self.wait_http(f"{self.api}/readyz")
        return self

    def wait_http(self, url: str, seconds: float = 40) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310
                    if resp.status == 200:
                        return
            except OSError:
                pass
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited early; see {self.logdir / name}.log")
            time.sleep(0.2)
        raise TimeoutError(f"{url} not ready")

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()
        for log in self._logs:
            log.close()

    def submissions(self, member_id: str) -> list[dict]:
        status, _, body = Http(self.sim).request("GET", f"/sim/submissions?member_id={member_id}")
        assert status == 200
        return body["items"]


def wait_for(fn, timeout: float = 60, interval: float = 0.3):  # type: ignore[no-untyped-def]
    """Poll `fn` until it returns something truthy; returns that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s (last: {last!r})")
