"""The edge: what a client may cost before the application sees its request.

Two layers, each bounding what the other cannot see:

- :class:`GuardedHttpToolsProtocol` (``slotguard serve`` runs uvicorn with it): uvicorn's
  httptools protocol, plus a bound on the bytes of a request head (``max_header_bytes``:
  431 and the connection closed, so an unfinished 16 MB header costs at most the bound plus
  one read), a deadline from a connection's (or a request's) first byte to its last header
  (``header_read_timeout_ms``) and one from the last header to the body's last byte
  (``body_read_timeout_ms``): 408 and closed. httptools has no head limit and uvicorn no
  read timeout of its own; idle keep-alive connections are uvicorn's ``timeout_keep_alive``
  (``keep_alive_timeout_ms``).
- the ASGI half (any server, the in-process test client too), in the one pure-ASGI layer
  :class:`api.middleware.EdgeMiddleware` (with :func:`answer_edge` here): at most
  ``max_header_count`` headers and ``max_header_bytes`` of them (431), and the body read
  within ``body_read_timeout_ms`` of the app's start (408, ``connection: close``; the app
  then reads a disconnect).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging

from starlette.types import Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from engine.settings import Settings

log = logging.getLogger("slotguard.api")

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
_CODES = {408: "REQUEST_TIMEOUT", 431: "HEADERS_TOO_LARGE"}


def _envelope(status: int, message: str) -> bytes:
    return json.dumps({"error": {"code": _CODES[status], "message": message, "details": {},
                                 "retryable": False, "retryAfter": None}}).encode()


async def answer_edge(send: Send, status: int, message: str) -> None:
    body = _envelope(status, message)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


@functools.lru_cache(maxsize=1)
def _settings() -> Settings:
    return Settings.from_env()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head and read deadlines
    (``uvicorn.run(http="api.guard:GuardedHttpToolsProtocol")``; settings from the
    environment, read once per process)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        settings = _settings()
        self.max_header_bytes = settings.max_header_bytes
        self.header_timeout_s = settings.header_read_timeout_ms / 1000
        self.body_timeout_s = settings.body_read_timeout_ms / 1000
        self._head_bytes = 0
        self._in_head = True
        self._deadline: asyncio.TimerHandle | None = None

    # ---- deadlines ------------------------------------------------------------------------
    def _arm(self, seconds: float, status: int, what: str) -> None:
        self._disarm()
        if seconds > 0:
            self._deadline = self.loop.call_later(seconds, self._refuse, status, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, status: int, what: str) -> None:
        self._deadline = None
        if self.transport is None or self.transport.is_closing():
            return
        log.warning("closing a connection from %s: %s", self.client, what)
        if self.cycle is None or not self.cycle.response_started:
            body = _envelope(status, what)
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (status, _REASONS[status], len(body), body))
        self.transport.close()  # the app, if running, reads a disconnect; its sends are dropped

    # ---- protocol ---------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(self.header_timeout_s, 408, "request headers not received in time")

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if (self._in_head and self.max_header_bytes and self._head_bytes > self.max_header_bytes
                and self.transport is not None and not self.transport.is_closing()):
            self._refuse(431, f"request headers exceed {self.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        if self._deadline is None:  # a keep-alive connection's next request
            self._arm(self.header_timeout_s, 408, "request headers not received in time")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._arm(self.body_timeout_s, 408, "request body not received in time")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True
        super().on_message_complete()
