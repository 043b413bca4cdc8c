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
    policy = (await redis.config_get("maxmemory-policy")).get("maxmemory-policy", "unknown")
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
