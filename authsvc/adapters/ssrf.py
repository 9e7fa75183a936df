"""Outbound webhook HTTP with an SSRF guard (reliability.md S7).

A URL is accepted only with scheme http or https and a host whose every DNS answer is a
public address, unless the host or address is listed in `AUTHSVC_WEBHOOK_ALLOWLIST` (host
names or CIDR ranges, optionally with `:port`). The check runs at registration and again at
send time; the request then goes to the very address that was checked (the IP is pinned, so
a DNS rebind between check and connect cannot redirect it), and redirects are never
followed (http.client does not follow them).

Names are resolved in one place, `resolve_names`, whose implementation `use_resolver` can
swap: tests point it at a fake resolver (e.g. `rebind.test` → 127.0.0.1, or an answer that
changes between two look-ups) instead of editing /etc/hosts. IP literals never reach it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import ipaddress
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_RESPONSE_BYTES = 64 * 1024


class Refused(ValueError):
    """The URL may not be called (scheme, host or address refused)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (`ip`, `port`) and what to ask for."""

    scheme: str
    host: str
    port: int
    ip: str
    path: str

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class _Allow:
    host: str | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    port: int | None

    def matches(self, host: str, ip: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host is not None:
            return self.host == host
        return self.network is not None and ip in self.network


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [::1]:8080 or [::1]
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


def parse_allowlist(entries: Iterable[str]) -> list[_Allow]:
    out: list[_Allow] = []
    for raw in entries:
        entry = raw.strip().lower()
        if not entry:
            continue
        host, port = _split_port(entry)
        try:
            out.append(_Allow(None, ipaddress.ip_network(host, strict=False), port))
        except ValueError:
            out.append(_Allow(host.rstrip("."), None, port))
    return out


def _is_public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return _is_public(mapped)
    return not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified or not ip.is_global)


Resolver = Callable[[str, int], Iterable[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's answers (getaddrinfo: /etc/hosts, then DNS)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


_resolver: Resolver = system_resolver


@contextlib.contextmanager
def use_resolver(resolver: Resolver) -> Iterator[None]:
    """Resolve host names with `resolver` inside the block (tests: a fake DNS)."""
    global _resolver
    previous, _resolver = _resolver, resolver
    try:
        yield
    finally:
        _resolver = previous


def resolve_names(host: str, port: int) -> list[IPAddress]:
    """Every address `host` stands for; an IP literal is its own answer (no look-up)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        answers = list(_resolver(host, port))
    except (OSError, UnicodeError) as exc:
        raise Refused("the host does not resolve") from exc
    addrs: list[IPAddress] = []
    for answer in answers:
        try:
            addr = ipaddress.ip_address(str(answer).split("%", 1)[0])
        except ValueError as exc:
            raise Refused("the host does not resolve to an IP address") from exc
        if addr not in addrs:
            addrs.append(addr)
    if not addrs:
        raise Refused("the host does not resolve")
    return addrs


def check_url(url: str, allowlist: Iterable[str]) -> Target:
    """Validate a webhook URL and pin the address to connect to; raises `Refused`."""
    if not isinstance(url, str) or len(url) > 2000 or not url.isascii():
        raise Refused("the URL must be an ASCII http(s) URL of at most 2000 characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused("the URL is not valid") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused("only http and https URLs are allowed")
    if parts.username is not None or parts.password is not None:
        raise Refused("credentials in the URL are not allowed")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise Refused("the URL has no host")
    port = port or (443 if scheme == "https" else 80)
    rules = parse_allowlist(allowlist)
    addrs = resolve_names(host, port)  # once: the connection goes to addrs[0]
    for addr in addrs:
        if not _is_public(addr) and not any(r.matches(host, addr, port) for r in rules):
            raise Refused("the URL resolves to a loopback, private or reserved address")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme=scheme, host=host, port=port, ip=str(addrs[0]), path=path)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a pinned IP while verifying the certificate for the URL's host name."""

    def __init__(self, target: Target, timeout: float):
        super().__init__(target.ip, target.port, timeout=timeout,
                         context=ssl.create_default_context())
        self._server_hostname = target.host

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            sock, server_hostname=self._server_hostname)


def post(url: str, body: bytes, headers: Mapping[str, str], allowlist: Iterable[str],
         timeout: float = 10.0) -> int:
    """POST `body` to a re-checked, pinned address; returns the HTTP status.

    `timeout` bounds each socket operation *and* the whole exchange: a receiver that drips
    its answer a byte at a time is cut off at the deadline (`TimeoutError`), so it cannot
    hold a worker thread. Raises `Refused` when the URL is not allowed and `OSError` (or
    `http.client` errors) when the connection fails. A 3xx is returned as is: redirects are
    not followed.
    """
    target = check_url(url, allowlist)
    conn: http.client.HTTPConnection
    if target.scheme == "https":
        conn = _PinnedHTTPS(target, timeout)
    else:
        conn = http.client.HTTPConnection(target.ip, target.port, timeout=timeout)
    expired = threading.Event()

    def cut() -> None:  # wakes a blocked recv/send in the calling thread
        expired.set()
        sock = conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(timeout, cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.putrequest("POST", target.path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", target.host_header)
        all_headers = {"Content-Type": "application/json", "User-Agent": "authsvc-webhooks/1",
                       **headers, "Content-Length": str(len(body))}
        for key, value in all_headers.items():
            conn.putheader(key, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        if expired.is_set():  # the head was cut short: its status cannot be trusted
            raise TimeoutError(f"no complete answer within {timeout:g} s")
        resp.read(MAX_RESPONSE_BYTES)  # the status decides; the body is drained, not kept
        return resp.status
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set():
            raise TimeoutError(f"no complete answer within {timeout:g} s") from exc
        raise
    finally:
        watchdog.cancel()
        conn.close()
