"""Opening Redis safely: the eviction-policy guard runs before any hold is accepted."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.errors import UnsafeRedis
from engine.settings import Settings

log = logging.getLogger("slotguard.redis")


def open_redis(settings: Settings, **kwargs) -> aioredis.Redis:
    """A redis-py client for ``REDIS_URL``; with ``SLOTGUARD_REDIS_CLUSTER=true`` a
    :class:`redis.asyncio.cluster.RedisCluster` seeded by it (it learns the other nodes and
    the slot map on first use, or by ``await client.initialize()``)."""
    options = {"decode_responses": True, "health_check_interval": 30}
    options.update(kwargs)
    if settings.redis_cluster:
        from redis.asyncio.cluster import RedisCluster

        if options.get("max_connections", 0) is None:
            del options["max_connections"]
        return RedisCluster.from_url(settings.redis_url, **options)
    return aioredis.Redis.from_url(settings.redis_url, **options)


def is_cluster(client) -> bool:
    """True for a redis-py cluster client."""
    return hasattr(client, "nodes_manager")


async def check_cluster_mode(redis, settings: Settings) -> None:
    """Refuse a server whose mode is not the one configured: with
    ``SLOTGUARD_REDIS_CLUSTER=true`` a server that is not a cluster (or cannot tell us its
    slots), without it a cluster node (whose MOVED replies would fail most calls)."""
    from redis.exceptions import RedisClusterException, ResponseError

    if settings.redis_cluster:
        try:
            await redis.initialize()
            remember_nodes(redis)
        except RedisClusterException as exc:
            if "not enabled" not in str(exc):  # no seed node answers: an outage, not a mode
                raise RedisConnectionError(str(exc)) from None
            raise UnsafeRedis(
                f"SLOTGUARD_REDIS_CLUSTER=true but the Redis at {settings.redis_url} is not "
                f"a Redis Cluster ({exc}): unset SLOTGUARD_REDIS_CLUSTER or point REDIS_URL "
                "at a cluster node", details={"redisUrl": settings.redis_url}) from None
        return
    try:
        info = await redis.info("cluster")
    except ResponseError:
        return
    if str(info.get("cluster_enabled", 0)) == "1":
        raise UnsafeRedis(
            f"the Redis at {settings.redis_url} is a Redis Cluster node: set "
            "SLOTGUARD_REDIS_CLUSTER=true", details={"redisUrl": settings.redis_url})


async def per_node(redis, reply_of, *, primaries: bool = False) -> dict[str, object]:
    """``reply_of(target_nodes)`` on every node of a cluster (masters and replicas, or the
    masters only), by node name; on a single Redis, ``{"redis": reply_of(None)}``. A cluster
    node that does not answer is left out (it serves nothing), unless it is a master and
    ``primaries`` is asked: then its ConnectionError is raised (after a slot map refresh,
    so the next call sees the replica that replaces it)."""
    if not is_cluster(redis):
        return {"redis": await reply_of(None)}
    restore_startup_nodes(redis)
    await redis.initialize()
    remember_nodes(redis)
    nodes = masters_of(redis) if primaries else redis.get_nodes()
    replies = await asyncio.gather(*(reply_of([node]) for node in nodes),
                                   return_exceptions=True)
    out = {}
    for node, reply in zip(nodes, replies):
        if isinstance(reply, (RedisConnectionError, RedisTimeoutError, OSError)):
            if primaries:
                await refresh_slots(redis)
                raise reply
            continue
        if isinstance(reply, BaseException):
            raise reply
        out[node.name] = reply
    return out


def masters_of(redis) -> list:
    """The masters as the slot map names them (the first node of each slot's list).

    Not ``get_primaries()``: that reads each node's ``server_type`` flag, which redis-py's
    MOVED handling can leave wrong. A MOVED naming the node already first for that slot
    (a command that reached another node first) marks that node a *replica* while it stays
    first in the map, until the next full refresh. The run id of a cluster then lacked that
    master and the watch flapped between two run ids, rehydrating every time and holding
    the booking lock (seen in the chaos run: 18,000 commit entries never drained)."""
    seen: dict[str, object] = {}
    lists: set[int] = set()
    for nodes in redis.nodes_manager.slots_cache.values():
        if nodes and id(nodes) not in lists:  # one list per slot range, shared
            lists.add(id(nodes))
            seen.setdefault(nodes[0].name, nodes[0])
    return list(seen.values()) or redis.get_primaries()


def remember_nodes(redis) -> None:
    """Record every node the cluster client knows now (its seed included)."""
    known = redis.__dict__.setdefault("_slotguard_known_nodes", set())
    manager = redis.nodes_manager
    for node in (*manager.startup_nodes.values(), *manager.nodes_cache.values()):
        known.add((node.host, int(node.port)))


def restore_startup_nodes(redis) -> None:
    """Give redis-py's slot-map refresh every node ever known to ask. Its startup nodes
    are replaced by the nodes of each refresh; after failovers and restarts they can end up
    naming only dead nodes (or none: "at least one reachable node: None"), and the client
    could never learn the slot map again."""
    from redis.asyncio.cluster import ClusterNode

    remember_nodes(redis)
    manager = redis.nodes_manager
    for host, port in redis.__dict__.get("_slotguard_known_nodes", ()):
        node = ClusterNode(host, port, **manager.connection_kwargs)
        manager.startup_nodes.setdefault(node.name, node)


async def refresh_slots(redis) -> None:
    """Re-read a cluster's slot map (a failover may have moved masters); never raises."""
    restore_startup_nodes(redis)
    try:
        await redis.nodes_manager.initialize()
        remember_nodes(redis)
    except Exception as exc:
        log.warning("could not refresh the cluster slot map: %r", exc)


async def check_eviction_policy(redis: aioredis.Redis, settings: Settings) -> str:
    """Refuse (unless overridden) a Redis whose ``maxmemory-policy`` is not ``noeviction``.

    Under any other policy Redis may evict a unit key under memory pressure, and an evicted
    hold is a double booking waiting to happen.
    """
    policy = await eviction_policy(redis)
    if policy != "noeviction":
        message = (
            f"Redis maxmemory-policy is {policy!r}, not 'noeviction': Redis may evict a hold "
            "under memory pressure, and an evicted hold is a double booking. Set "
            "`maxmemory-policy noeviction`, or SLOTGUARD_ALLOW_EVICTION_POLICY=1 to override."
        )
        log.warning("!!! %s", message)
        if not settings.allow_eviction_policy:
            raise UnsafeRedis(message, details={"maxmemoryPolicy": policy})
    return policy


async def eviction_policy(redis: aioredis.Redis) -> str:
    """Redis's ``maxmemory-policy`` now (``unknown`` where CONFIG is not allowed).

    In a cluster every node is asked (a replica becomes a master at failover); the answer is
    ``noeviction`` when all say so, else the first other policy and the node that has it.
    """
    try:
        policies = await per_node(redis, lambda nodes: redis.config_get("maxmemory-policy")
                                  if nodes is None else redis.execute_command(
                                      "CONFIG GET", "maxmemory-policy", target_nodes=nodes))
    except aioredis.ResponseError:  # CONFIG renamed or refused (managed Redis)
        return "unknown"
    found = {name: (reply or {}).get("maxmemory-policy", "unknown")
             for name, reply in policies.items()}
    if len(found) == 1:
        return next(iter(found.values()))
    for name, policy in sorted(found.items()):
        if policy != "noeviction":
            return f"{policy} (node {name})"
    return "noeviction"


def eviction_allowed(policy: str, settings: Settings) -> bool:
    return policy == "noeviction" or settings.allow_eviction_policy


async def record_shard_count(redis: aioredis.Redis, key: str, settings: Settings) -> None:
    """Write SLOTGUARD_SHARDS to Redis at first start; refuse a process that has another.

    Keys, ids and streams are cut by the shard count: two processes with different counts
    would put one resource's units under two hash tags, and both would accept a hold on the
    same slot. The first process to start records its count (SET NX); every later one must
    agree. After a Redis data loss the key is gone and the next process records it again.
    """
    await redis.set(key, settings.shards, nx=True)
    recorded = await redis.get(key)
    if recorded is not None and str(recorded) != str(settings.shards):
        raise UnsafeRedis(
            f"SLOTGUARD_SHARDS is {settings.shards} but the data in this Redis was written "
            f"with {recorded} shards (key {key}): refusing to start",
            details={"shards": settings.shards, "recordedShards": str(recorded)})
