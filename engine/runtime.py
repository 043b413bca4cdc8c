"""One process's connections and engines, opened and closed together.

The API lifespan and the worker's start-up both build a :class:`Runtime`: the Redis
client (eviction policy checked, shard count recorded and compared, scripts registered), the
Postgres pool, the catalog of vendors and resources, and the engines over them.

With ``watch=True`` a :class:`RedisWatch` task keeps the process right while Redis comes and
goes: every ``redis_watch_interval_ms`` it asks Redis for its run id; when Redis answers again
or answers with another run id (a restart), it ends the script connection's backoff, registers
every script, records the shard count and rehydrates the booked markers (if no other process
did it first). Every ``eviction_check_interval_ms`` it reads ``maxmemory-policy``: an evicting
policy closes every shard (the ready flags are deleted, so ``create_reservation`` refuses holds
in every process) and rehydration refuses to reopen them until the policy is safe again;
then the markers are rehydrated (an eviction may have taken some) and holds resume.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.access import RedisAccess
from engine.connection import (
    check_cluster_mode,
    check_eviction_policy,
    eviction_allowed,
    eviction_policy,
    open_redis,
    record_shard_count,
)
from engine.errors import UnsafeRedis
from engine.db import create_pool
from engine.directory import load_catalog
from engine.keys import KeySpace
from engine.limits import Limits
from engine.rehydration import ensure_rehydrated, is_rehydrated, redis_run_id
from engine.reservations import ReservationEngine
from engine.resources import ResourceCatalog
from engine.settings import Settings

log = logging.getLogger("slotguard.redis")


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
    watch: RedisWatch | None = field(default=None, repr=False)

    @classmethod
    async def open(cls, settings: Settings, *, pool_max_size: int = 10,
                   observe=None, watch: bool = False) -> Runtime:
        redis = open_redis(settings, max_connections=None)
        keys = KeySpace(settings.key_prefix, settings.shards)
        try:
            await check_cluster_mode(redis, settings)
            await check_eviction_policy(redis, settings)
            await record_shard_count(redis, keys.shard_count(), settings)
            access = RedisAccess(redis, batch_max=settings.redis_batch_max,
                                 max_inflight=settings.redis_max_inflight_batches,
                                 observe=observe,
                                 backoff_max_s=settings.redis_reconnect_backoff_max_ms / 1000,
                                 wait_replicas=settings.redis_wait_replicas,
                                 wait_timeout_ms=settings.redis_wait_timeout_ms,
                                 cluster_retry_s=settings.redis_cluster_retry_ms / 1000)
            await access.load_scripts()
            pool = await create_pool(settings, max_size=pool_max_size)
        except BaseException:
            await redis.aclose()
            raise
        async with pool.acquire() as conn:
            catalog = await load_catalog(conn)
        # Every process that moves reservations keeps the partners' caps and reputation
        # counters right: the API creates and cancels, workers commit and expire.
        limits = Limits(access, keys, settings)
        rt = cls(settings, redis, access, keys, pool, catalog, limits,
                 ReservationEngine(access, keys, catalog, settings, limits=limits,
                                   payments_enabled=bool(settings.stripe_api_key)))
        if watch:
            rt.watch = RedisWatch(rt)
            rt.watch.start()
        return rt

    async def refresh_catalog(self) -> None:
        """Learn vendors and resources created by other processes since start."""
        async with self.pool.acquire() as conn:
            fresh = await load_catalog(conn)
        for resource in fresh.all_resources():
            self.catalog.add(resource)
        for vendor in fresh.all_vendors():
            self.catalog.add_vendor(vendor)

    async def rehydrate_if_needed(self):
        """Rehydrate unless done (None then); refuses (UnsafeRedis) while Redis may evict."""
        policy = await eviction_policy(self.redis)
        if not eviction_allowed(policy, self.settings):
            await self.close_shards()
            raise UnsafeRedis(f"Redis maxmemory-policy is {policy!r}, not 'noeviction': holds "
                              "are refused until it is", details={"maxmemoryPolicy": policy})
        await record_shard_count(self.redis, self.keys.shard_count(), self.settings)
        await self.refresh_catalog()
        return await ensure_rehydrated(self.access, self.keys, self.pool, self.catalog,
                                       self.settings)

    async def close_shards(self) -> None:
        """Refuse new holds on every shard, in every process, until the next rehydration."""
        await self.redis.delete(*(self.keys.ready(s) for s in range(self.keys.shards)))

    async def close(self) -> None:
        if self.watch is not None:
            await self.watch.stop()
        await self.access.close()
        await self.pool.close()
        await self.redis.aclose()


class RedisWatch:
    """One process's eye on Redis (see the module docstring). State for logs and tests:
    ``reachable``, ``run_id`` (of the Redis last prepared), ``policy``, ``recoveries``."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.interval_s = max(0.01, rt.settings.redis_watch_interval_ms / 1000)
        self.eviction_every_s = rt.settings.eviction_check_interval_ms / 1000
        self.reachable = True
        self.run_id: str | None = None
        self.policy: str | None = None
        self.recoveries = 0
        self._prepared = False  # scripts registered and markers rehydrated for run_id
        self._next_policy_check = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="redis-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the watch die: it is what brings the process back
                log.exception("Redis watch failed; trying again")
            await asyncio.sleep(self.interval_s)

    async def tick(self) -> None:
        rt = self.rt
        try:
            run_id = await redis_run_id(rt.access)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            if self.reachable:
                log.warning("Redis unreachable: %r", exc)
            self.reachable = False
            return
        if not self.reachable or run_id != self.run_id:
            if self.run_id is not None:
                log.warning("Redis answers again (run id %s, was %s)", run_id, self.run_id)
            self.reachable, self.run_id, self._prepared = True, run_id, False
            if rt.access.wire is not None:
                rt.access.wire.reset_backoff()
            self._next_policy_check = 0.0
        now = time.monotonic()
        if now >= self._next_policy_check:
            self._next_policy_check = now + self.eviction_every_s
            policy = await eviction_policy(rt.redis)
            if policy != self.policy:
                if not eviction_allowed(policy, rt.settings):
                    log.error("!!! Redis maxmemory-policy is now %r: holds are refused until it "
                              "is 'noeviction' again", policy)
                    self._prepared = False
                elif self.policy is not None:
                    log.warning("Redis maxmemory-policy is %r again", policy)
                self.policy = policy
            if not eviction_allowed(policy, rt.settings):
                await rt.close_shards()
                return
        if not self._prepared:
            await rt.access.load_scripts()
            if not await is_rehydrated(rt.access, rt.keys):
                await rt.rehydrate_if_needed()
            self._prepared = True
            self.recoveries += 1
        elif not await is_rehydrated(rt.access, rt.keys):
            # A shard lost its flag without a restart (FLUSHALL, an eviction check elsewhere).
            await rt.rehydrate_if_needed()


PREFLIGHT_WAIT_S = 30.0  # a process started before its Redis waits this long for it


async def preflight(settings: Settings) -> None:
    """What refuses a process before it starts serving (the CLI turns it into one line):
    an evicting Redis, a shard count other than the one the data was written with. A Redis
    that does not answer yet (started alongside) is waited for, with a backoff."""
    redis = open_redis(settings)
    deadline = time.monotonic() + PREFLIGHT_WAIT_S
    backoff = 0.1
    try:
        while True:
            try:
                await check_cluster_mode(redis, settings)
                await check_eviction_policy(redis, settings)
                await record_shard_count(redis, KeySpace(settings.key_prefix, settings.shards)
                                         .shard_count(), settings)
                return
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("waiting for Redis: %r", exc)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
    finally:
        await redis.aclose()


def preflight_or_message(settings: Settings) -> str | None:
    """Run :func:`preflight`; the refusal's one-line message, or None when all is well."""
    try:
        asyncio.run(preflight(settings))
    except UnsafeRedis as exc:
        return exc.message
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        return (f"the Redis at {settings.redis_url} does not answer after "
                f"{PREFLIGHT_WAIT_S:.0f} s: {exc}")
    return None
