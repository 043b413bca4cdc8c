"""One process's connections and engines, opened and closed together.

The API lifespan and the worker's start-up both build a :class:`Runtime`: the Redis
client (eviction policy checked, scripts registered), the Postgres pool, the catalog of
vendors and resources, and the engines over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis

from engine.access import RedisAccess
from engine.connection import check_eviction_policy, open_redis
from engine.db import create_pool
from engine.directory import load_catalog
from engine.keys import KeySpace
from engine.limits import Limits
from engine.rehydration import ensure_rehydrated
from engine.reservations import ReservationEngine
from engine.resources import ResourceCatalog
from engine.settings import Settings


@dataclass
class Runtime:
    settings: Settings
    redis: aioredis.Redis
    access: RedisAccess
    keys: KeySpace
    pool: asyncpg.Pool
    catalog: ResourceCatalog
    limits: Limits
    reservations: ReservationEngine

    @classmethod
    async def open(cls, settings: Settings, *, pool_max_size: int = 10,
                   observe=None) -> Runtime:
        redis = open_redis(settings, max_connections=None)
        try:
            await check_eviction_policy(redis, settings)
            access = RedisAccess(redis, batch_max=settings.redis_batch_max,
                                 max_inflight=settings.redis_max_inflight_batches,
                                 observe=observe)
            await access.load_scripts()
            pool = await create_pool(settings, max_size=pool_max_size)
        except BaseException:
            await redis.aclose()
            raise
        keys = KeySpace(settings.key_prefix, settings.shards)
        async with pool.acquire() as conn:
            catalog = await load_catalog(conn)
        # Every process that moves reservations keeps the partners' caps and reputation
        # counters right: the API creates and cancels, workers commit and expire.
        limits = Limits(access, keys, settings)
        return cls(settings, redis, access, keys, pool, catalog, limits,
                   ReservationEngine(access, keys, catalog, settings, limits=limits))

    async def refresh_catalog(self) -> None:
        """Learn vendors and resources created by other processes since start."""
        async with self.pool.acquire() as conn:
            fresh = await load_catalog(conn)
        for resource in fresh.all_resources():
            self.catalog.add(resource)
        for vendor in fresh.all_vendors():
            self.catalog.add_vendor(vendor)

    async def rehydrate_if_needed(self):
        await self.refresh_catalog()
        return await ensure_rehydrated(self.access, self.keys, self.pool, self.catalog,
                                       self.settings)

    async def close(self) -> None:
        await self.access.close()
        await self.pool.close()
        await self.redis.aclose()
