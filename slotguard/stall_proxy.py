"""A loopback TCP proxy of ours that can stop forwarding: the network stall of the fault suite.

``StallProxy(target_host, target_port).start()`` listens on a free loopback port (its own
thread and event loop) and forwards every connection to the target, both ways.
:meth:`StallProxy.stall` stops forwarding without closing anything: bytes wait in the
proxy, as on a network that drops into a black hole for a while (no RST, no FIN, the
peers' sockets stay open); :meth:`StallProxy.resume` delivers what waited and goes on.
Nothing is lost or reordered: a stall is a delay, never a corruption.
"""

from __future__ import annotations

import asyncio
import socket
import threading

HOST = "127.0.0.1"


class StallProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ready = threading.Event()
        self.connections = 0

    # ---- control (any thread) ---------------------------------------------------------
    def start(self) -> StallProxy:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="stall-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the stall proxy did not start")
        return self

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    def stall(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)

    @property
    def stalled(self) -> bool:
        return self._flowing is not None and not self._flowing.is_set()

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # ---- the proxy (its own thread) ---------------------------------------------------
    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, HOST, self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                await self._flowing.wait()  # a stall: the bytes wait here
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
