"""Opening Redis safely: the eviction-policy guard runs before any hold is accepted."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

from engine.errors import UnsafeRedis
from engine.settings import Settings

log = logging.getLogger("slotguard.redis")


def open_redis(settings: Settings, **kwargs) -> aioredis.Redis:
    options = {"decode_responses": True, "health_check_interval": 30}
    options.update(kwargs)
    return aioredis.Redis.from_url(settings.redis_url, **options)


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
    """Redis's ``maxmemory-policy`` now (``unknown`` where CONFIG is not allowed)."""
    try:
        return (await redis.config_get("maxmemory-policy")).get("maxmemory-policy", "unknown")
    except aioredis.ResponseError:  # CONFIG renamed or refused (managed Redis)
        return "unknown"


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
