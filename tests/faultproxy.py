"""A small TCP fault proxy (reliability.md §4.1): the Toxiproxy server is not in Debian.

Runs in a thread of the test process; switch `mode` at any time:
`pass` forwards, `down` refuses new connections and cuts open ones, `blackhole` accepts and
never forwards, `latency` delays each chunk by `latency_ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, listen_port: int = 0):
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.latency_ms = 0
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
        try:
            while not reader.at_eof():
                data = await reader.read(65536)
                if not data:
                    break
                while self.mode == "blackhole":
                    await asyncio.sleep(0.05)
                if self.mode == "down":
                    break
                if self.latency_ms:
                    await asyncio.sleep(self.latency_ms / 1000)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "down":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._conns.update({writer, up_writer})
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._conns.difference_update({writer, up_writer})

    def set(self, mode: str, latency_ms: int = 0) -> None:
        """Switch mode; `down` also cuts every open connection (reset)."""
        self.mode = mode
        self.latency_ms = latency_ms
        if mode == "down":
            def cut() -> None:
                for w in list(self._conns):
                    w.transport.abort()
                self._conns.clear()
            self._loop.call_soon_threadsafe(cut)

    def stop(self) -> None:
        async def close() -> None:
            if self._server:
                self._server.close()
            for w in list(self._conns):
                w.transport.abort()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        self._sock.close()
