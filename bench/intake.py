"""Order intake throughput and latency against this machine's own ceiling.

Run: ``.venv/bin/python -m bench.intake [--seconds N] [--concurrency C] [--client auto|wrk|python]``

One run, on one fresh PostgreSQL database (created and dropped WITH (FORCE) here):

a. ceiling: ``bench.ceiling_app`` (JSON + the real marshmallow schema + one Core insert +
   commit) under gunicorn with 2 sync workers, closed loop at ``--concurrency``
   → ``ceiling_rps``;
b. authsvc ``POST /v1/orders`` (``authsvc serve --workers 2``) closed loop at the same
   concurrency → ``orders_per_s``, ``p50_ms``, ``p99_ms``;
c. authsvc open loop at 70 % of ``ceiling_rps`` (Python pacer; latency from each request's
   *scheduled* send time, so a stalled server is not hidden by the client waiting for it)
   → ``at_70pct``.

Phases a and b use ``wrk --latency`` when it is on PATH (cheap on 2 cores), else Python
processes × threads of keep-alive ``http.client`` connections. Every request carries a
unique Idempotency-Key and a unique MRN (a new patient per order, as in real traffic).
Everything but the one JSON result line goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

from bench.ceiling_app import FLOOR_TOKEN

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
HOST = "127.0.0.1"
TARGETS = {"ratio_min": 0.6, "p99_ms_at_70pct_max": 50}
PACED_FRACTION = 0.7
HTTP_TIMEOUT = 10.0
PLACEHOLDER = "@@BENCH-ID@@"
RATE_LIMIT_ENV = ("AUTHSVC_RATE_LIMIT_TOKEN", "AUTHSVC_RATE_LIMIT_ORG",
                  "AUTHSVC_RATE_LIMIT_TOKEN_WRITE")
BENCH_RATE_LIMIT = "100000000/minute"


def log(msg: str) -> None:
    print(f"[bench.intake {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the request body


def order_template() -> str:
    """The realistic order of ``tests/conftest.py::order_body`` (lumbar MRI, one line, a
    patient contact), with a placeholder where each request puts its unique id (the MRN and
    the EHR order id)."""
    body = {
        "external_id": f"EHR-{PLACEHOLDER}",
        "urgency": "standard",
        "patient": {
            "mrn": f"MRN-{PLACEHOLDER}", "given_name": "Ana", "family_name": "Diaz",
            "birth_date": "1984-03-02", "sex": "female",
            "contacts": [{"role": "patient", "email": "ana@example.org", "phone": "+15555550101",
                          "channel": "sms", "language": "es"}],
        },
        "coverage": {"payer_id": "demo", "member_id": "SIM-APPROVE-0001",
                     "group_number": "G-100"},
        "requester": {"npi": "1003000126", "name": "Dr. Rivera"},
        "performer": {"npi": "1245319599", "name": "Valley Imaging"},
        "place_of_service": "22",
        "diagnoses": ["M54.50"],
        "lines": [{"sequence": 1, "code_system": "CPT", "code": "72148", "quantity": 1,
                   "service_start": "2026-12-01", "service_end": "2026-12-31"}],
        "notes": "Low back pain 8 weeks, failed conservative therapy.",
    }
    return json.dumps(body)


class Target:
    """Where and what to POST: path, headers and the body template split at the id."""

    def __init__(self, port: int, path: str, token: str | None, template: str):
        self.port = port
        self.path = path
        self.token = token
        self.parts = template.split(PLACEHOLDER)

    def body(self, rid: str) -> bytes:
        return rid.join(self.parts).encode()

    def headers(self, rid: str) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Idempotency-Key": rid}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h


# ------------------------------------------------------------------ the Python client


def _percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(-(-pct * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


class _Tally:
    """One process's results: latencies (ms) of measured requests, statuses, failures."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lat = array("d")
        self.done_in_window = 0
        self.statuses: Counter[int] = Counter()
        self.exceptions: Counter[str] = Counter()
        self.samples: list[str] = []
        self.unsent = 0

    def bad(self, what: str) -> None:
        if len(self.samples) < 5:
            self.samples.append(what)

    def as_dict(self) -> dict[str, Any]:
        return {"lat": self.lat.tobytes(), "done_in_window": self.done_in_window,
                "statuses": dict(self.statuses), "exceptions": dict(self.exceptions),
                "samples": self.samples, "unsent": self.unsent}


def _send(conn: http.client.HTTPConnection | None, target: Target, rid: str,
          tally: _Tally) -> tuple[http.client.HTTPConnection | None, int | None]:
    """POST once; returns the connection to reuse (None after a failure) and the status."""
    try:
        if conn is None:
            conn = http.client.HTTPConnection(HOST, target.port, timeout=HTTP_TIMEOUT)
        conn.request("POST", target.path, body=target.body(rid), headers=target.headers(rid))
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 201:
            with tally.lock:
                tally.bad(f"HTTP {resp.status}: {data[:300]!r}")
        return conn, resp.status
    except (OSError, http.client.HTTPException) as exc:
        with tally.lock:
            tally.exceptions[type(exc).__name__] += 1
            tally.bad(f"{type(exc).__name__}: {exc}")
        if conn is not None:
            conn.close()
        return None, None


def _closed_thread(target: Target, tag: str, t_measure: float, t_end: float,
                   tally: _Tally) -> None:
    conn = None
    n = 0
    local_lat = array("d")
    statuses: Counter[int] = Counter()
    in_window = 0
    while True:
        start = time.monotonic()
        if start >= t_end:
            break
        n += 1
        conn, status = _send(conn, target, f"{tag}-{n}", tally)
        done = time.monotonic()
        statuses[status or 0] += 1  # warm-up included: every response must be a 201
        if start >= t_measure:
            local_lat.append((done - start) * 1000.0)
        if t_measure <= done <= t_end and status == 201:
            in_window += 1
    if conn is not None:
        conn.close()
    with tally.lock:
        tally.lat.extend(local_lat)
        tally.statuses.update(statuses)
        tally.done_in_window += in_window


def _paced_thread(target: Target, tag: str, index: int, stride: int, rate: float,
                  t_start: float, t_measure: float, t_end: float, t_hard: float,
                  tally: _Tally) -> None:
    """Send request i (i = index, index + stride, ...) at t_start + i / rate, or at once when
    late; latency runs from the scheduled time (no coordinated omission)."""
    conn = None
    i = index
    local_lat = array("d")
    statuses: Counter[int] = Counter()
    in_window = 0
    unsent = 0
    while True:
        scheduled = t_start + i / rate
        if scheduled >= t_end:
            break
        now = time.monotonic()
        if now >= t_hard:  # give up: what is left was never sent; count it, at a lower bound
            while scheduled < t_end:
                if scheduled >= t_measure:
                    unsent += 1
                    local_lat.append((now - scheduled) * 1000.0)
                i += stride
                scheduled = t_start + i / rate
            break
        if scheduled > now:
            time.sleep(scheduled - now)
        conn, status = _send(conn, target, f"{tag}-{i}", tally)
        done = time.monotonic()
        statuses[status or 0] += 1
        if scheduled >= t_measure:
            local_lat.append((done - scheduled) * 1000.0)
        if t_measure <= done <= t_end and status == 201:
            in_window += 1
        i += stride
    if conn is not None:
        conn.close()
    with tally.lock:
        tally.lat.extend(local_lat)
        tally.statuses.update(statuses)
        tally.done_in_window += in_window
        tally.unsent += unsent


def _client_process(queue: Any, mode: str, target: Target, tag: str, proc_index: int,
                    n_procs: int, threads: int, timing: dict[str, float], rate: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    tally = _Tally()
    workers = []
    for j in range(threads):
        if mode == "closed":
            fn, a = _closed_thread, (target, f"{tag}-{proc_index}-{j}", timing["measure"],
                                     timing["end"], tally)
        else:
            fn, a = _paced_thread, (target, tag, proc_index * threads + j, n_procs * threads,
                                    rate, timing["start"], timing["measure"], timing["end"],
                                    timing["hard"], tally)
        th = threading.Thread(target=fn, args=a, daemon=True)
        th.start()
        workers.append(th)
    for th in workers:
        th.join()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    queue.put({**tally.as_dict(), "cpu_s": usage.ru_utime + usage.ru_stime})


def python_load(cleanup: Cleanup, mode: str, target: Target, tag: str, concurrency: int,
                warmup: float, seconds: float, rate: float = 0.0) -> dict[str, Any]:
    """Closed loop (``mode="closed"``) or paced open loop (``"paced"``) from 2 processes."""
    n_procs = 2 if concurrency >= 2 else 1
    per_proc = [concurrency // n_procs + (1 if k < concurrency % n_procs else 0)
                for k in range(n_procs)]
    threads = max(per_proc)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    t0 = time.monotonic() + 0.5  # time for the processes to start
    timing = {"start": t0, "measure": t0 + warmup, "end": t0 + warmup + seconds,
              "hard": t0 + warmup + seconds + max(2.0, min(10.0, seconds / 2))}
    procs = []
    for k in range(n_procs):
        p = ctx.Process(target=_client_process, daemon=True,
                        args=(queue, mode, target, tag, k, n_procs, threads if mode == "paced"
                              else per_proc[k], timing, rate))
        p.start()
        cleanup.client_procs.append(p)
        procs.append(p)
    results = []
    deadline = timing["hard"] + HTTP_TIMEOUT + 10
    for _ in procs:
        results.append(queue.get(timeout=max(1.0, deadline - time.monotonic())))
    for p in procs:
        p.join(timeout=5)
        cleanup.client_procs.remove(p)
    lat: list[float] = []
    statuses: Counter[int] = Counter()
    exceptions: Counter[str] = Counter()
    samples: list[str] = []
    done_in_window = unsent = 0
    cpu_s = 0.0
    for r in results:
        cpu_s += r["cpu_s"]
        a = array("d")
        a.frombytes(r["lat"])
        lat.extend(a)
        statuses.update({int(k): v for k, v in r["statuses"].items()})
        exceptions.update(r["exceptions"])
        samples.extend(r["samples"])
        done_in_window += r["done_in_window"]
        unsent += r["unsent"]
    lat.sort()
    errors = sum(v for k, v in statuses.items() if k != 201)
    return {"rps": done_in_window / seconds, "requests": len(lat),
            "p50_ms": _percentile(lat, 50), "p99_ms": _percentile(lat, 99),
            "errors": errors, "statuses": dict(statuses), "exceptions": dict(exceptions),
            "unsent": unsent, "samples": samples[:5], "client_cpu_s": round(cpu_s, 1)}


# ------------------------------------------------------------------ wrk

WRK_LUA = r"""
local threads = {}
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

local parts = {%(parts)s}
local path = [==[%(path)s]==]
local token = [==[%(token)s]==]
local run = [==[%(run)s]==]
local n = 0
non201 = 0
sample = ""

function request()
  n = n + 1
  local rid = run .. "-" .. tid .. "-" .. n
  local body = table.concat(parts, rid)
  local headers = {["Content-Type"] = "application/json", ["Idempotency-Key"] = rid}
  if token ~= "" then headers["Authorization"] = "Bearer " .. token end
  return wrk.format("POST", path, headers, body)
end

function response(status, headers, body)
  if status ~= 201 then
    non201 = non201 + 1
    if sample == "" then sample = status .. " " .. string.sub(body or "", 1, 300) end
  end
end

function done(summary, latency, requests)
  local total = 0
  local first = ""
  for _, t in ipairs(threads) do
    total = total + (t:get("non201") or 0)
    local s = t:get("sample") or ""
    if first == "" and s ~= "" then first = s end
  end
  io.write("BENCH_NON201 " .. total .. "\n")
  if first ~= "" then io.write("BENCH_SAMPLE " .. string.gsub(first, "\n", " ") .. "\n") end
end
"""

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _wrk_time_ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"unreadable wrk time {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/sec, the --latency distribution, socket errors and our non-201 count."""
    rps = float(re.search(r"Requests/sec:\s*([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    dist = {}
    block = out.split("Latency Distribution", 1)
    if len(block) == 2:
        for pct, value in re.findall(r"^\s*([0-9.]+)%\s+(\S+)\s*$", block[1], re.M):
            dist[float(pct)] = _wrk_time_ms(value)
    m = re.search(r"(\d+) requests in ([0-9.]+\w+)", out)
    if m is None:
        raise ValueError(f"unreadable wrk output:\n{out}")
    requests, duration_s = int(m.group(1)), _wrk_time_ms(m.group(2)) / 1000.0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = {k: int(v) for k, v in zip(("connect", "read", "write", "timeout"),
                                               sock.groups(), strict=True)} if sock else {}
    non201 = re.search(r"BENCH_NON201 (\d+)", out)
    sample = re.search(r"BENCH_SAMPLE (.*)", out)
    n_non201 = int(non201.group(1)) if non201 else 0
    errors = n_non201 + sum(socket_errors.values())
    # wrk's Requests/sec counts every response; only 201s are orders
    ok_rps = (requests - n_non201) / duration_s if duration_s else rps
    return {"rps": ok_rps, "wrk_rps": rps, "requests": requests,
            "p50_ms": dist.get(50.0), "p99_ms": dist.get(99.0),
            "errors": errors, "socket_errors": socket_errors,
            "samples": [sample.group(1)] if sample else []}


def wrk_load(cleanup: Cleanup, target: Target, tag: str, concurrency: int, warmup: float,
             seconds: float) -> dict[str, Any]:
    if any("]==]" in p for p in (*target.parts, target.path, target.token or "")):
        raise ValueError("the body cannot be quoted as a Lua long string")
    parts = ", ".join(f"[==[{p}]==]" for p in target.parts)
    threads = 2 if concurrency >= 2 else 1
    outs = []
    for phase, duration in (("warm", warmup), ("run", seconds)):
        script = cleanup.tmp / f"wrk-{tag}-{phase}.lua"
        script.write_text(WRK_LUA % {"parts": parts,
                                     "path": target.path, "token": target.token or "",
                                     "run": f"{tag}-{phase}"})
        cmd = ["wrk", "-t", str(threads), "-c", str(concurrency),
               "-d", f"{max(1, round(duration))}s", "--timeout", f"{int(HTTP_TIMEOUT)}s",
               "--latency", "-s", str(script), f"http://{HOST}:{target.port}{target.path}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        cleanup.popen.append(proc)
        try:
            out, _ = proc.communicate(timeout=duration + HTTP_TIMEOUT + 20)
        finally:
            cleanup.stop_proc(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}")
        outs.append(out)
    log("wrk output:\n" + outs[-1].rstrip())
    warm, result = parse_wrk(outs[0]), parse_wrk(outs[1])
    result["errors"] += warm["errors"]  # every response must be a 201, warm-up included
    result["samples"] = warm["samples"] + result["samples"]
    return result


# ------------------------------------------------------------------ processes and database


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Cleanup:
    """Everything started here, stopped in reverse on success, failure or Ctrl-C."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="authsvc-bench-"))
        self.popen: list[subprocess.Popen] = []
        self.client_procs: list[Any] = []
        self.drop_db: tuple[str, str] | None = None
        self.keep_tmp = False

    def stop_proc(self, proc: subprocess.Popen, timeout: float = 10) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        # gunicorn workers share the group: make sure none outlives its arbiter
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.popen:
            self.popen.remove(proc)

    def close(self) -> None:
        for p in list(self.client_procs):
            with contextlib.suppress(Exception):
                p.terminate()
                p.join(timeout=3)
                if p.is_alive():
                    p.kill()
        for proc in reversed(list(self.popen)):
            with contextlib.suppress(Exception):
                self.stop_proc(proc)
        if self.drop_db:
            admin_url, name = self.drop_db
            try:
                drop_database(admin_url, name)
                log(f"dropped database {name}")
            except Exception as exc:  # noqa: BLE001 - report, keep cleaning
                log(f"could not drop database {name}: {exc}")
        if self.keep_tmp:
            log(f"logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def create_database(admin_url: str) -> tuple[str, str]:
    import sqlalchemy as sa

    name = f"authsvc_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    url = sa.engine.make_url(admin_url).set(database=name)
    return name, url.render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def run_cli(env: dict[str, str], *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "authsvc.cli", *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    if res.returncode != 0:
        raise RuntimeError(f"authsvc {' '.join(args)} failed:\n{res.stdout}{res.stderr}")
    return res.stdout


def start(cleanup: Cleanup, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    with open(cleanup.tmp / f"{name}.log", "ab") as logfile:  # the child keeps its own fd
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=logfile, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    cleanup.popen.append(proc)
    return proc


def wait_http(proc: subprocess.Popen, url: str, name: str, cleanup: Cleanup,
              seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}):\n{tail(cleanup, name)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - 127.0.0.1
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {seconds}s:\n{tail(cleanup, name)}")


def tail(cleanup: Cleanup, name: str, lines: int = 40) -> str:
    path = cleanup.tmp / f"{name}.log"
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def probe(target: Target) -> None:
    """One request before measuring: a wrong setup fails here, loudly, not as N errors."""
    conn = http.client.HTTPConnection(HOST, target.port, timeout=30)
    try:
        rid = f"probe-{secrets.token_hex(4)}"
        conn.request("POST", target.path, body=target.body(rid), headers=target.headers(rid))
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.status != 201:
        raise RuntimeError(f"probe POST {target.path} answered {resp.status}: {data[:500]!r}")


def gunicorn_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "gunicorn"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "gunicorn"]


def pids_of(proc: subprocess.Popen) -> list[int]:
    """The arbiter and its workers (for py-spy): children listed by /proc."""
    out = [proc.pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            children = (task / "children").read_text().split()
            out.extend(int(c) for c in children)
    return out


# ------------------------------------------------------------------ the run


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def summarize(label: str, r: dict[str, Any]) -> None:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f} ms"

    extra = ""
    if "client_cpu_s" in r:
        extra += f", client CPU {r['client_cpu_s']} s"
    if r.get("unsent"):
        extra += f", {r['unsent']} scheduled requests never sent (server too slow)"
    log(f"  {label}: {r['rps']:.1f} req/s ({r['requests']} measured), p50 {ms(r['p50_ms'])}, "
        f"p99 {ms(r['p99_ms'])}, errors {r['errors']}{extra}")


def run(args: argparse.Namespace, cleanup: Cleanup) -> dict[str, Any]:
    seconds = float(args.seconds)
    conc = int(args.concurrency)
    warmup = float(args.warmup)
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    if args.client == "wrk" and not shutil.which("wrk"):
        raise RuntimeError("--client wrk but wrk is not on PATH")
    client = "wrk" if use_wrk else "python"
    log(f"client: {client} for the closed-loop phases; python pacer for the 70 % phase; "
        f"{seconds:g}s per phase after {warmup:g}s warm-up, concurrency {conc}")

    admin_url = os.environ.get("AUTHSVC_BENCH_DATABASE_URL", DEFAULT_ADMIN_URL)
    redis_url = os.environ.get("AUTHSVC_BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    name, db_url = create_database(admin_url)
    cleanup.drop_db = (admin_url, name)
    log(f"created database {name}")
    var_dir = cleanup.tmp / "var"
    var_dir.mkdir()
    env = {**os.environ, "AUTHSVC_DATABASE_URL": db_url, "AUTHSVC_REDIS_URL": redis_url,
           "AUTHSVC_VAR_DIR": str(var_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # A load test from one token: lift the per-token/per-org limits out of the way (the
    # limiter still runs, so its cost is measured; only the refusals are avoided).
    env.update({name: BENCH_RATE_LIMIT for name in RATE_LIMIT_ENV})
    run_cli(env, "db", "upgrade")
    token = run_cli(env, "tokens", "create", "--org", "bench", "--role", "clinician",
                    "--name", "bench").strip().splitlines()[-1]
    log("migrated; clinician token created for org 'bench'")
    template = order_template()
    run_id = secrets.token_hex(3)

    def load(target: Target, tag: str) -> dict[str, Any]:
        if use_wrk:
            return wrk_load(cleanup, target, f"{run_id}-{tag}", conc, warmup, seconds)
        return python_load(cleanup, "closed", target, f"{run_id}-{tag}", conc, warmup, seconds)

    def reference(name: str, factory: str, token: str | None, tag: str) -> dict[str, Any]:
        """A phase on one of `bench.ceiling_app`'s apps under gunicorn, 2 sync workers."""
        port = free_port()
        proc = start(cleanup, name, [*gunicorn_cmd(), "-w", "2", "-k", "sync", "-b",
                                     f"{HOST}:{port}", "--timeout", "60",
                                     f"bench.ceiling_app:{factory}()"], env)
        wait_http(proc, f"http://{HOST}:{port}/healthz", name, cleanup)
        target = Target(port, "/orders", token, template)
        probe(target)
        log(f"phase {tag}: {name} app on :{port}")
        result = load(target, tag)
        summarize(name, result)
        cleanup.stop_proc(proc)
        return result

    # a. the ceiling; a2. (informational) the floor: the ceiling plus the per-request rules
    # of any intake (token, rate limit, idempotency claim and record)
    a = reference("ceiling", "create_app", None, "a")
    a2 = reference("floor", "create_floor_app", FLOOR_TOKEN, "a2")

    # b. authsvc, closed loop
    port = free_port()
    api = start(cleanup, "api", [sys.executable, "-m", "authsvc.cli", "serve", "--port",
                                 str(port), "--workers", "2"], env)
    wait_http(api, f"http://{HOST}:{port}/readyz", "api", cleanup)
    log(f"authsvc ready on :{port} (pids {' '.join(map(str, pids_of(api)))})")
    target = Target(port, "/v1/orders", token, template)
    probe(target)
    log("phase b: authsvc POST /v1/orders, closed loop")
    b = load(target, "b")
    summarize("authsvc closed loop", b)

    # c. authsvc, open loop at 70 % of the ceiling
    rate = PACED_FRACTION * a["rps"]
    log(f"phase c: authsvc paced at {rate:.1f} req/s (70 % of the ceiling)")
    c = python_load(cleanup, "paced", target, f"{run_id}-c", conc, warmup, seconds, rate)
    summarize("authsvc paced", c)
    # d. (informational) open loop at 70 % of authsvc's own closed-loop rate: its latency
    # under a load it can sustain, as a capacity plan would use it
    own = PACED_FRACTION * b["rps"]
    log(f"phase d: authsvc paced at {own:.1f} req/s (70 % of its closed-loop rate)")
    d = python_load(cleanup, "paced", target, f"{run_id}-d", conc, warmup, seconds, own)
    summarize("authsvc paced (own)", d)
    if api.poll() is not None:
        raise RuntimeError(f"authsvc exited during the run:\n{tail(cleanup, 'api')}")
    cleanup.stop_proc(api)

    errors = a["errors"] + a2["errors"] + b["errors"] + c["errors"] + d["errors"]
    for label, r in (("ceiling", a), ("floor", a2), ("authsvc closed", b), ("authsvc paced", c),
                     ("authsvc paced (own)", d)):
        if r["errors"]:
            extra = {k: r[k] for k in ("statuses", "exceptions", "socket_errors") if r.get(k)}
            log(f"ERRORS in {label}: {r['errors']} {extra}")
            for s in r["samples"]:
                log(f"  e.g. {s}")
    ratio = b["rps"] / a["rps"] if a["rps"] else 0.0
    p99_c = c["p99_ms"]
    met = bool(errors == 0 and ratio >= TARGETS["ratio_min"] and p99_c is not None
               and p99_c <= TARGETS["p99_ms_at_70pct_max"])
    return {
        "benchmark": "intake", "client": client, "seconds": seconds, "concurrency": conc,
        "ceiling_rps": _r(a["rps"]), "orders_per_s": _r(b["rps"]),
        "ratio_to_ceiling": _r(ratio, 3), "p50_ms": _r(b["p50_ms"], 2),
        "floor_rps": _r(a2["rps"]),
        "floor_ratio_to_ceiling": _r(a2["rps"] / a["rps"] if a["rps"] else 0.0, 3),
        "p99_ms": _r(b["p99_ms"], 2),
        "at_70pct": {"target_rps": _r(rate), "achieved_rps": _r(c["rps"]),
                     "p50_ms": _r(c["p50_ms"], 2), "p99_ms": _r(c["p99_ms"], 2)},
        "at_70pct_of_own": {"target_rps": _r(own), "achieved_rps": _r(d["rps"]),
                            "p50_ms": _r(d["p50_ms"], 2), "p99_ms": _r(d["p99_ms"], 2)},
        "errors": errors, "targets": dict(TARGETS), "met": met,
    }


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _raise_timeout(_signum: int, _frame: Any) -> None:
    raise TimeoutError("the benchmark ran over its time budget")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20, help="measured seconds per phase")
    p.add_argument("--concurrency", type=int, default=8, help="connections in flight")
    p.add_argument("--warmup", type=float, default=3, help="warm-up seconds before each phase")
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                   help="closed-loop load generator (auto: wrk when on PATH)")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.concurrency < 1 or args.warmup < 0:
        p.error("--seconds and --concurrency must be positive")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    signal.signal(signal.SIGALRM, _raise_timeout)
    # three phases, server start-ups, migrations, drains: generous but finite
    signal.alarm(int(4 * (args.seconds + args.warmup + HTTP_TIMEOUT + 15) + 240))
    started = time.monotonic()
    cleanup = Cleanup()
    result = None
    rc = 1
    try:
        result = run(args, cleanup)
        rc = 0
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        rc = 130
    except Exception:  # noqa: BLE001 - report, clean up, exit non-zero
        traceback.print_exc()
        cleanup.keep_tmp = True
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    log(f"total run time {time.monotonic() - started:.1f}s")
    if result is not None:
        print(json.dumps(result), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
