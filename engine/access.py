"""The one Redis access layer: every script call goes through :class:`RedisAccess`.

The Python client, not Redis, is the cost of a hold, so calls from concurrent requests are
coalesced: every call made during one event-loop turn is queued, and the queue is sent as
EVALSHA batches (at most ``batch_max`` calls each, at most ``max_inflight`` batches on the
wire). While both batches are out, new calls keep queueing and leave together as soon as
one returns, so batches grow with load and the per-call client cost falls. A batch is
written in RESP with one write on a pipelined connection (:mod:`engine.resp`); redis-py
pipelines serve where that is not possible (unix sockets).

On a Redis Cluster the queue, the batches and the in-flight cap are per node (a *lane*: the
node that serves the call's key slot, by the wire's slot map when the call is made): a node
that stalls holds back its own calls only, never another node's. A call whose slot moved
meanwhile is redirected by the wire (MOVED/ASK), as before.

Each call keeps its own reply and its own error. A NOSCRIPT (script cache flushed, a
restarted or failed-over Redis) is handled per call: the script is re-sent with EVAL, which
also caches it again, and every script is registered again in the background. The raw
connection registers every script on each (re)connect, so a restarted Redis has them before
the first call after it; reconnects back off (:mod:`engine.resp`). Scripts are idempotent
per hold token, so a caller that retries after a connection error can never turn its own
landed hold into a conflict.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from engine.resp import BACKOFF_MIN_S, RespError, ScriptConnection
from engine.scripts import Script, scripts

Arg = str | bytes | int | float
log = logging.getLogger("slotguard.redis")


class RedisAccess:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        batch_max: int = 32,
        max_inflight: int = 2,
        observe=None,
        raw: bool = True,
        backoff_max_s: float = 1.0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
        cluster_retry_s: float = 2.0,
    ) -> None:
        self.redis = redis
        # The hot path: batches written straight in RESP on one pipelined connection
        # (engine/resp.py); redis-py pipelines where that is not possible (unix sockets).
        self.wire = ScriptConnection.like(redis) if raw else None
        self.batch_max = batch_max
        self.max_inflight = max_inflight
        self.scripts = scripts()
        if self.wire is not None:
            self.wire.backoff_max_s = max(BACKOFF_MIN_S, backoff_max_s)
            self.wire.setup = [("SCRIPT", "LOAD", s.source) for s in self.scripts.values()]
            if hasattr(self.wire, "wait_replicas"):  # a ClusterWire (engine/resp_cluster.py)
                self.wire.wait_replicas = wait_replicas
                self.wire.wait_timeout_ms = wait_timeout_ms
                self.wire.retry_window_s = cluster_retry_s
        self._reloading: asyncio.Task | None = None
        # Per lane (a cluster node's address; None: the one Redis, or a slot not mapped yet).
        self._lane_of = getattr(self.wire, "lane", None)
        self._pending: dict[Any, list[tuple[Script, Sequence[Arg], Sequence[Arg],
                                            asyncio.Future]]] = {}
        self._inflight: dict[Any, int] = {}
        self._scheduled = False
        # observe(script_name, seconds, batch_size) -> None; metrics hook, optional.
        self._observe = observe

    # ---- calls ------------------------------------------------------------------------
    def call(self, name: str, keys: Sequence[Arg], args: Sequence[Arg]) -> asyncio.Future:
        """Queue one script call; the future resolves to its reply or raises its error."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        lane = self._lane_of(keys[0]) if self._lane_of is not None and keys else None
        self._pending.setdefault(lane, []).append((self.scripts[name], keys, args, future))
        if not self._scheduled and self._inflight.get(lane, 0) < self.max_inflight:
            self._scheduled = True
            loop.call_soon(self._dispatch)
        return future

    def inflight(self) -> dict[Any, int]:
        """Batches on the wire now, per lane (cluster node address; None: the one Redis)."""
        return {lane: n for lane, n in self._inflight.items() if n}

    async def call_once(self, name: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """One uncoalesced EVALSHA (the naive client path; benchmarks compare against it)."""
        script = self.scripts[name]
        try:
            return await self.redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.redis.eval(script.source, len(keys), *keys, *args)

    async def load_scripts(self) -> None:
        """Register every script at start-up (EVALSHA then hits without a fallback); in a
        cluster on every master (a master that does not answer raises ConnectionError)."""
        if hasattr(self.redis, "nodes_manager"):
            from engine.connection import per_node

            for script in self.scripts.values():
                await per_node(self.redis, lambda nodes, s=script: self.redis.execute_command(
                    "SCRIPT LOAD", s.source, target_nodes=nodes), primaries=True)
            return
        pipe = self.redis.pipeline(transaction=False)
        for script in self.scripts.values():
            pipe.script_load(script.source)
        await pipe.execute()

    def reload_scripts_soon(self) -> None:
        """Register every script again, once, in the background (after a NOSCRIPT)."""
        if self._reloading is not None and not self._reloading.done():
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        try:
            await self.load_scripts()
        except (RedisError, OSError) as exc:  # the watch, or the next NOSCRIPT, tries again
            log.warning("could not register the scripts again: %r", exc)

    async def scripts_loaded(self) -> bool:
        shas = [s.sha for s in self.scripts.values()]
        if hasattr(self.redis, "nodes_manager"):
            from engine.connection import per_node

            found = await per_node(self.redis, lambda nodes: self.redis.execute_command(
                "SCRIPT EXISTS", *shas, target_nodes=nodes), primaries=True)
            return all(all(reply) for reply in found.values())
        return all(await self.redis.script_exists(*shas))

    # ---- batching ---------------------------------------------------------------------
    def _dispatch(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        for lane in list(self._pending):
            queue = self._pending[lane]
            while queue and self._inflight.get(lane, 0) < self.max_inflight:
                batch = queue[: self.batch_max]
                del queue[: self.batch_max]
                self._inflight[lane] = self._inflight.get(lane, 0) + 1
                loop.create_task(self._send(batch, lane))
            if not queue:
                del self._pending[lane]

    async def _send(self, batch, lane=None) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            replies = await self._execute(
                [("EVALSHA", script.sha, len(keys), *keys, *args)
                 for script, keys, args, _ in batch])
            retry = []
            for call, reply in zip(batch, replies):
                if _noscript(reply):  # the script cache was flushed: this call re-sends it
                    retry.append(call)
                else:
                    _settle(call[3], reply)
            if retry:
                self.reload_scripts_soon()
                replies = await self._execute(
                    [("EVAL", script.source, len(keys), *keys, *args)
                     for script, keys, args, _ in retry])
                for call, reply in zip(retry, replies):
                    _settle(call[3], reply)
        except BaseException as exc:  # never leave a caller waiting forever
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if self._observe is not None:
                elapsed = loop.time() - started
                for script, *_ in batch:
                    self._observe(script.name, elapsed, len(batch))
            self._inflight[lane] -= 1
            if self._pending.get(lane) and not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._dispatch)

    async def _execute(self, commands: list[tuple]) -> list:
        """Every command's reply or error, in order; a lost connection fails them all with
        a ConnectionError (transient: callers of idempotent scripts may retry)."""
        if self.wire is not None:
            try:
                return await self.wire.execute(commands)
            except OSError as exc:  # refused, reset
                return [RedisConnectionError(str(exc))] * len(commands)
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        try:
            return await pipe.execute(raise_on_error=False)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            return [exc] * len(commands)

    async def close(self) -> None:
        if self._reloading is not None:
            self._reloading.cancel()
        if self.wire is not None:
            await self.wire.close()


def _noscript(reply) -> bool:
    return isinstance(reply, NoScriptError) or (isinstance(reply, RespError) and reply.noscript)


def _settle(future: asyncio.Future, reply) -> None:
    if future.done():
        return
    if isinstance(reply, ConnectionError) and not isinstance(reply, RedisError):
        reply = RedisConnectionError(str(reply))
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)
