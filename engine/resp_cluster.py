"""Raw RESP on a Redis Cluster: :class:`ClusterWire`, a :class:`ScriptConnection` per node.

In cluster mode (``SLOTGUARD_REDIS_CLUSTER=true``) the access layer and the commit-queue
readers write their batches through a ClusterWire instead of one ScriptConnection. It keeps
their interface (``execute(commands)`` answers every command's reply or error in order) and
routes each command by its key's hash slot: a batch is split into one pipelined write per
node, sent concurrently, and the replies are put back in order. The slot map is redis-py's
(:class:`redis.asyncio.cluster.RedisCluster`'s NodesManager, shared with every other command
of the process), refreshed when a reply says it is stale.

What is retried, and why that is safe (a command re-sent only when Redis did not run it):

- ``MOVED slot host:port``: the slot lives elsewhere now (resharding, failover). Redis did
  not run the command; it is re-sent to the named node and the slot map is refreshed.
- ``ASK slot host:port``: the slot is migrating and this key is already on the target; the
  command is re-sent there after ``ASKING`` on the same connection.
- ``TRYAGAIN``, ``CLUSTERDOWN``, ``LOADING``, ``READONLY`` (a node that was master is a
  replica now), ``MASTERDOWN``: refused before running. Re-sent after a short pause for up
  to ``retry_window_s``, then the error is the command's answer (the caller sees a
  retryable Redis error).
- A lost connection or a node that refuses: the commands on it may have landed. They are
  NOT re-sent; each fails with ``ConnectionError`` exactly like the single-node connection
  (the caller may retry only an idempotent script), and the slot map is refreshed, since a
  failover may be under way.

At most ``max_redirects`` redirections in a row per command; past that it fails with an error
that says so (a slot map that keeps changing under a batch). A multi-key script on a slot in
the middle of a migration is refused with TRYAGAIN until the slot's move ends (Redis's rule);
the wire keeps asking for ``retry_window_s`` (``SLOTGUARD_REDIS_CLUSTER_RETRY_MS``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Sequence

from redis.crc import key_slot

from engine.resp import BACKOFF_MIN_S, RespError, ScriptConnection

Arg = str | bytes | int | float
log = logging.getLogger("slotguard.redis")

_REFUSED = ("TRYAGAIN", "CLUSTERDOWN", "LOADING", "READONLY", "MASTERDOWN")


class ClusterRoutingError(RespError):
    """A command that could not be routed (no node serves its slot, too many redirects)."""


def command_key(command: Sequence[Arg]) -> Arg | None:
    """The key a command is routed by (None: any node will do)."""
    name = str(command[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return command[3] if int(command[2]) > 0 else None
    if name in ("XREADGROUP", "XREAD"):
        upper = [str(a).upper() for a in command]
        return command[upper.index("STREAMS") + 1]
    return command[1] if len(command) > 1 else None


def slot_of(key: Arg) -> int:
    if isinstance(key, str):
        key = key.encode()
    elif not isinstance(key, bytes):
        key = str(key).encode()
    return key_slot(key)


class ClusterWire:
    """Pipelined raw-RESP batches to a Redis Cluster, one connection per node."""

    def __init__(self, cluster, *, name: str = "slotguard-scripts",
                 max_redirects: int = 5, retry_window_s: float = 2.0,
                 wait_replicas: int = 0, wait_timeout_ms: int = 100) -> None:
        self.cluster = cluster  # redis.asyncio.cluster.RedisCluster (its slot map)
        # WAIT after each node's batch (see wait_after): 0 turns it off.
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._no_wait_until: dict[tuple[str, int], float] = {}
        self.waits_short = 0  # WAITs that timed out with fewer replicas than asked
        self.name = name
        self.max_redirects = max_redirects
        self.retry_window_s = retry_window_s
        self._backoff_max_s = 1.0
        self._setup: Sequence[tuple[Arg, ...]] = ()
        self._nodes: dict[tuple[str, int], ScriptConnection] = {}
        self._refresh: asyncio.Task | None = None
        self.redirects = 0  # MOVED and ASK followed (tests and metrics)
        self.refreshes = 0  # slot map refreshes this wire asked for

    # ---- the ScriptConnection interface -----------------------------------------------
    @property
    def setup(self) -> Sequence[tuple[Arg, ...]]:
        return self._setup

    @setup.setter
    def setup(self, commands: Sequence[tuple[Arg, ...]]) -> None:
        self._setup = commands
        for conn in self._nodes.values():
            conn.setup = commands

    @property
    def backoff_max_s(self) -> float:
        return self._backoff_max_s

    @backoff_max_s.setter
    def backoff_max_s(self, value: float) -> None:
        self._backoff_max_s = max(BACKOFF_MIN_S, value)
        for conn in self._nodes.values():
            conn.backoff_max_s = self._backoff_max_s

    @property
    def connects(self) -> int:
        return sum(conn.connects for conn in self._nodes.values())

    def reset_backoff(self) -> None:
        for conn in self._nodes.values():
            conn.reset_backoff()

    async def close(self) -> None:
        conns = list(self._nodes.values())
        self._nodes.clear()
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        if self._refresh is not None and not self._refresh.done():
            self._refresh.cancel()

    # ---- routing ----------------------------------------------------------------------
    def connection(self, host: str, port: int) -> ScriptConnection:
        conn = self._nodes.get((host, port))
        if conn is None:
            kwargs = self.cluster.connection_kwargs
            conn = ScriptConnection(host, int(port), username=kwargs.get("username"),
                                    password=kwargs.get("password"),
                                    ssl_context=_ssl_context(kwargs), name=self.name,
                                    backoff_max_s=self._backoff_max_s)
            conn.setup = self._setup
            self._nodes[(host, port)] = conn
        return conn

    def address(self, slot: int) -> tuple[str, int]:
        node = self.cluster.nodes_manager.get_node_from_slot(slot)
        return node.host, int(node.port)

    def lane(self, key: Arg) -> tuple[str, int] | None:
        """The node a call on ``key`` goes to now (the access layer queues and caps its
        batches per node); None while the slot map is not known yet."""
        try:
            return self.address(slot_of(key))
        except Exception:
            return None

    def _any_address(self) -> tuple[str, int]:
        node = self.cluster.nodes_manager.default_node or \
            self.cluster.get_primaries()[0]
        return node.host, int(node.port)

    def refresh_soon(self) -> asyncio.Task:
        """Re-read the slot map (CLUSTER SLOTS), once however many callers ask."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._do_refresh())
        return self._refresh

    async def _do_refresh(self) -> None:
        from engine.connection import refresh_slots

        self.refreshes += 1
        await refresh_slots(self.cluster)  # never raises: the next redirect asks again

    async def execute(self, commands: Sequence[tuple[Arg, ...]]) -> list:
        """Every command's reply or error, in order (see the module docstring)."""
        loop = asyncio.get_running_loop()
        if not self.cluster.nodes_manager.slots_cache:  # a client not used yet
            from engine.connection import restore_startup_nodes

            try:
                restore_startup_nodes(self.cluster)
                await self.cluster.initialize()
            except Exception as exc:  # no seed answers: as a lost connection
                return [ConnectionError(f"cannot reach the cluster: {exc}")] * len(commands)
        results: list = [None] * len(commands)
        target: dict[int, tuple[str, int]] = {}  # redirected commands
        asking: set[int] = set()
        redirects: dict[int, int] = defaultdict(int)
        todo = list(range(len(commands)))
        deadline = loop.time() + self.retry_window_s
        pause = 0.05
        while todo:
            groups: dict[tuple[str, int], list[int]] = defaultdict(list)
            unroutable: list[int] = []
            for i in todo:
                try:
                    if i in target:
                        address = target[i]
                    else:
                        key = command_key(commands[i])
                        address = self._any_address() if key is None else \
                            self.address(slot_of(key))
                except Exception as exc:  # no node serves the slot (yet): ask again
                    results[i] = ClusterRoutingError(f"CLUSTERDOWN no node serves slot "
                                                     f"{exc}")
                    if loop.time() < deadline:
                        unroutable.append(i)
                    continue
                groups[address].append(i)
            sent = list(groups.items())
            replies = await asyncio.gather(
                *(self._send(address, [commands[i] for i in idx], [i in asking for i in idx])
                  for address, idx in sent))
            todo, refused = unroutable, bool(unroutable)
            for (address, idx), got in zip(sent, replies):
                for i, reply in zip(idx, got):
                    results[i] = reply
                    if isinstance(reply, ConnectionError):
                        self.refresh_soon()  # a failover may be under way; NOT re-sent
                        continue
                    if not isinstance(reply, RespError):
                        continue
                    text = str(reply)
                    kind = text.split(" ", 1)[0]
                    if kind in ("MOVED", "ASK"):
                        redirects[i] += 1
                        self.redirects += 1
                        if redirects[i] > self.max_redirects:
                            results[i] = ClusterRoutingError(
                                f"CLUSTERDOWN slot map kept changing: {redirects[i] - 1} "
                                f"redirects, last {text}")
                            continue
                        host, _, port = text.split(" ")[2].rpartition(":")
                        target[i] = (host or address[0], int(port))
                        if kind == "MOVED":
                            asking.discard(i)
                            self.refresh_soon()
                        else:
                            asking.add(i)
                        todo.append(i)
                    elif kind in _REFUSED and loop.time() < deadline:
                        # TRYAGAIN: a multi-key call on a slot being migrated (some keys
                        # moved): Redis refuses it until the move ends; ask the source
                        # again (its ASK or MOVED then counts afresh).
                        target.pop(i, None)
                        asking.discard(i)
                        redirects[i] = 0
                        refused = True
                        todo.append(i)
            if refused:
                self.refresh_soon()
                await asyncio.sleep(pause)
                pause = min(0.5, pause * 2)
        return results

    def _wait_now(self, address: tuple[str, int]) -> bool:
        if self.wait_replicas <= 0:
            return False
        until = self._no_wait_until.get(address)
        return until is None or asyncio.get_running_loop().time() >= until

    async def _send(self, address: tuple[str, int], commands: list, asking: list[bool]) -> list:
        conn = self.connection(*address)
        if any(asking):
            wire: list = []
            for command, ask in zip(commands, asking):
                if ask:
                    wire.append(("ASKING",))
                wire.append(command)
        else:
            wire = list(commands)
        # WAIT in the same write: the batch's writes reach a replica before anyone is told
        # they happened, so a failover to that replica keeps them (one WAIT per node batch,
        # which coalescing amortises). A replica that does not ack in time is not waited
        # for again for a second (a dead replica must not slow every batch).
        wait = self._wait_now(address)
        if wait:
            wire.append(("WAIT", self.wait_replicas, self.wait_timeout_ms))
        try:
            replies = await conn.execute(wire)
        except ConnectionError as exc:
            return [exc] * len(commands)
        except OSError as exc:
            return [ConnectionError(str(exc))] * len(commands)
        if wait:
            acked = replies.pop()
            if not isinstance(acked, int) or acked < self.wait_replicas:
                self.waits_short += 1
                self._no_wait_until[address] = asyncio.get_running_loop().time() + 1.0
        if any(asking):
            out, it = [], iter(replies)
            for ask in asking:
                if ask:
                    next(it)  # ASKING's +OK
                out.append(next(it))
            replies = out
        return [ConnectionError(str(r)) if isinstance(r, OSError) else r for r in replies]


def _ssl_context(kwargs: dict):
    if kwargs.get("connection_class") is not None and \
            kwargs["connection_class"].__name__.startswith("SSL"):
        import ssl
        return ssl.create_default_context()
    return None
