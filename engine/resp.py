"""A pipelined RESP connection for script calls: the hot path without a client library.

redis-py spends most of a hold's client CPU building command objects, checking out
connections and parsing replies through several layers. Script calls need none of that:
:class:`ScriptConnection` writes a whole batch of EVALSHA commands with one
``transport.write`` and matches replies to callers in order, parsed by hiredis in C.
Everything that is not a hot-path script call (streams, admin, health) still goes through
redis-py.

One connection carries any number of batches back to back (Redis answers in order). A lost
connection fails every call in flight with ``ConnectionError`` (the caller may retry: the
scripts are idempotent per hold token) and the next call reconnects. A failed reconnect
starts a backoff (doubling from ``BACKOFF_MIN_S`` to ``backoff_max_s``) during which calls
fail at once instead of each knocking on a dead server; :meth:`ScriptConnection.reset_backoff`
ends it early (the Redis watch calls it when Redis answers again). Every (re)connect sends the
``setup`` commands after the handshake (the access layer registers its scripts there, so a
restarted Redis has them before the first call).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Sequence
from urllib.parse import unquote, urlparse

import hiredis

Arg = str | bytes | int | float
BACKOFF_MIN_S = 0.05


class RespError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``, a script's ``error()``)."""

    @property
    def noscript(self) -> bool:
        return str(self).startswith("NOSCRIPT")


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", replyError=RespError)
        self.waiting: deque[asyncio.Future] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            future = self.waiting.popleft()
            if future.done():
                continue
            if isinstance(reply, RespError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionError(f"connection to Redis lost: {exc or 'closed'}")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(None)


class ScriptConnection:
    """A lazily (re)connected, pipelined RESP connection to the Redis of ``url``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 6379, *, db: int = 0,
                 username: str | None = None, password: str | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 connect_timeout_s: float = 5.0, name: str = "slotguard-scripts",
                 backoff_max_s: float = 1.0) -> None:
        self.host, self.port, self.db = host, port, db
        self.name = name  # CLIENT SETNAME: ops can tell the hot-path connections apart
        self.username, self.password = username, password
        self.ssl = ssl_context
        self.connect_timeout_s = connect_timeout_s
        self.backoff_max_s = max(BACKOFF_MIN_S, backoff_max_s)
        # Commands sent after the handshake on every (re)connect; their errors fail it.
        self.setup: Sequence[tuple[Arg, ...]] = ()
        self.connects = 0  # successful connects (a reconnect after a restart counts)
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future | None = None
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self._last_error: BaseException | None = None

    @classmethod
    def from_url(cls, url: str) -> ScriptConnection:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported Redis URL scheme {parsed.scheme!r}")
        path = parsed.path.lstrip("/")
        return cls(parsed.hostname or "127.0.0.1", parsed.port or 6379,
                   db=int(path) if path else 0,
                   username=unquote(parsed.username) if parsed.username else None,
                   password=unquote(parsed.password) if parsed.password else None,
                   ssl_context=ssl.create_default_context() if parsed.scheme == "rediss"
                   else None)

    @classmethod
    def like(cls, client) -> ScriptConnection | None:
        """A connection to the same server as a redis-py client (None for unix sockets).
        For a :class:`redis.asyncio.cluster.RedisCluster`, a
        :class:`engine.resp_cluster.ClusterWire` (one connection per node, routed by slot)."""
        if not hasattr(client, "connection_pool") and hasattr(client, "nodes_manager"):
            from engine.resp_cluster import ClusterWire

            return ClusterWire(client)
        kwargs = client.connection_pool.connection_kwargs
        if "path" in kwargs or "host" not in kwargs:
            return None
        context = None
        if client.connection_pool.connection_class.__name__.startswith("SSL"):
            context = ssl.create_default_context()
        return cls(kwargs["host"], int(kwargs.get("port", 6379)), db=int(kwargs.get("db", 0)),
                   username=kwargs.get("username"), password=kwargs.get("password"),
                   ssl_context=context)

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        _, protocol = await asyncio.wait_for(
            loop.create_connection(_Protocol, self.host, self.port, ssl=self.ssl),
            self.connect_timeout_s)
        handshake = []
        if self.password is not None:
            handshake.append(("AUTH", self.username, self.password) if self.username
                             else ("AUTH", self.password))
        if self.db:
            handshake.append(("SELECT", self.db))
        handshake.append(("CLIENT", "SETNAME", self.name))
        handshake.extend(self.setup)
        try:
            await asyncio.gather(*self._write(protocol, handshake))
        except BaseException:
            protocol.transport.close()
            raise
        self.connects += 1
        return protocol

    def reset_backoff(self) -> None:
        """Let the next call try to connect at once (Redis is known to answer again)."""
        self._backoff_s = 0.0
        self._retry_at = 0.0

    def _failed(self, exc: BaseException) -> None:
        self._backoff_s = min(self.backoff_max_s, max(BACKOFF_MIN_S, self._backoff_s * 2))
        self._retry_at = time.monotonic() + self._backoff_s
        self._last_error = exc

    async def protocol(self) -> _Protocol:
        current = self._protocol
        if current is not None and current.transport is not None \
                and not current.transport.is_closing():
            return current
        if self._connecting is None:
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                raise ConnectionError(f"Redis unreachable ({self._last_error!r}); next "
                                      f"connection attempt in {wait * 1000:.0f} ms")
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            self._protocol = await asyncio.shield(connecting)
        except (OSError, asyncio.TimeoutError, RespError) as exc:
            if self._connecting is connecting:
                self._failed(exc)
            raise ConnectionError(f"cannot connect to Redis: {exc!r}") from exc
        finally:
            if self._connecting is connecting:
                self._connecting = None
        self.reset_backoff()
        return self._protocol

    @staticmethod
    def _write(protocol: _Protocol, commands: Sequence[tuple[Arg, ...]]) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        protocol.waiting.extend(futures)
        # hiredis packs RESP in C, four times faster than building it in Python.
        protocol.transport.write(b"".join([hiredis.pack_command(c) for c in commands]))
        return futures

    async def execute(self, commands: Sequence[tuple[Arg, ...]]) -> list:
        """Send every command (a tuple of arguments) in one write; answer their replies,
        or their errors, in order."""
        protocol = await self.protocol()
        futures = self._write(protocol, commands)
        return await asyncio.gather(*futures, return_exceptions=True)

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
            await self._protocol.closed
        self._protocol = None
