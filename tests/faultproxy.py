"""A small TCP fault proxy (reliability.md §4.1): the Toxiproxy server is not in Debian.

Runs in a thread of the test process; switch `mode` at any time:
`pass` forwards, `down` refuses new connections and cuts open ones, `blackhole` accepts and
never forwards, `latency` delays each chunk by `latency_ms`, `reset` closes every open and new
connection with an RST (SO_LINGER 0), `slicer` forwards `slice_bytes` at a time with
`latency_ms` between slices (a slow drip), `limit_data` forwards `limit_bytes` per direction
of a connection and then cuts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading

MODES = ("pass", "down", "blackhole", "latency", "reset", "slicer", "limit_data")


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN: SO_LINGER on, timeout 0, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, listen_port: int = 0):
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.latency_ms = 0
        self.slice_bytes = 1
        self.limit_bytes = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        sock = socket.socket()
        sock.bind(("127.0.0.1", listen_port))
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(5)
        return self

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self._sock)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = 0
        try:
            while not reader.at_eof():
                data = await reader.read(65536)
                if not data:
                    break
                while self.mode == "blackhole":
                    await asyncio.sleep(0.05)
                if self.mode in ("down", "reset"):
                    break
                if self.mode == "limit_data":
                    data = data[:max(0, self.limit_bytes - sent)]
                if self.mode == "slicer":
                    for i in range(0, len(data), max(1, self.slice_bytes)):
                        await asyncio.sleep(self.latency_ms / 1000)
                        writer.write(data[i:i + max(1, self.slice_bytes)])
                        await writer.drain()
                else:
                    if self.latency_ms:
                        await asyncio.sleep(self.latency_ms / 1000)
                    writer.write(data)
                    await writer.drain()
                sent += len(data)
                if self.mode == "limit_data" and sent >= self.limit_bytes:
                    _rst(writer)
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            if self.mode == "reset":
                _rst(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "down":
            writer.transport.abort()
            return
        if self.mode == "reset":
            _rst(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._conns.update({writer, up_writer})
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._conns.difference_update({writer, up_writer})

    def set(self, mode: str, latency_ms: int = 0, slice_bytes: int = 1,
            limit_bytes: int = 0) -> None:
        """Switch mode; `down` also cuts every open connection, `reset` with an RST."""
        if mode not in MODES:
            raise ValueError(f"unknown fault proxy mode {mode!r}")
        self.mode = mode
        self.latency_ms = latency_ms
        self.slice_bytes = slice_bytes
        self.limit_bytes = limit_bytes
        if mode in ("down", "reset"):
            def cut() -> None:
                for w in list(self._conns):
                    if mode == "reset":
                        _rst(w)
                    w.transport.abort()
                self._conns.clear()
            self._loop.call_soon_threadsafe(cut)

    def stop(self) -> None:
        async def close() -> None:
            if self._server:
                self._server.close()
            for w in list(self._conns):
                w.transport.abort()
            # connections parked in `blackhole` (or mid-`slicer`) end here, not at exit
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        self._sock.close()
