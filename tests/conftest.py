"""Fixtures: real Redis and real Postgres, one key prefix and one schema per test.

``REDIS_URL`` / ``DATABASE_URL`` name the servers (``.ci/run`` makes sure they answer);
the defaults are the machine's standard local ports.
"""

from __future__ import annotations

import os
import uuid

import asyncpg
import pytest
import redis.asyncio as aioredis

from engine.access import RedisAccess
from benchmarks.holds import HoldEngine
from engine.keys import KeySpace
from engine.resources import MINUTE_MS, Resource, ResourceCatalog
from engine.settings import Settings

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def schema() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(prefix: str, schema: str) -> Settings:
    return Settings.from_env(
        {},
        redis_url=REDIS_URL,
        database_url=DATABASE_URL,
        key_prefix=prefix,
        db_schema=schema,
        shards=4,
        hold_ttl_ms=60_000,
    )


@pytest.fixture
async def redis(prefix: str):
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    await delete_prefix(client, prefix)
    await client.aclose()


async def delete_prefix(client: aioredis.Redis, prefix: str) -> None:
    batch = []
    async for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            await client.unlink(*batch)
            batch.clear()
    if batch:
        await client.unlink(*batch)


async def snapshot(client: aioredis.Redis, prefix: str) -> dict[str, tuple]:
    """Every key under the prefix with its serialized value (TTL rounded off)."""
    state = {}
    async for key in client.scan_iter(match=f"{prefix}*", count=1000):
        raw = await client.dump(key)
        state[key] = (raw, await client.pttl(key) > 0)
    return state


@pytest.fixture
def catalog() -> ResourceCatalog:
    return ResourceCatalog([
        Resource("room-a", unit_ms=15 * MINUTE_MS),
        Resource("room-b", unit_ms=15 * MINUTE_MS, buffer_before_ms=15 * MINUTE_MS,
                 buffer_after_ms=15 * MINUTE_MS),
        Resource("suite-1", unit_ms=86_400_000),
    ])


@pytest.fixture
def keys(settings: Settings) -> KeySpace:
    return KeySpace(settings.key_prefix, settings.shards)


@pytest.fixture
async def access(redis: aioredis.Redis):
    layer = RedisAccess(redis)
    yield layer
    await layer.close()


@pytest.fixture
async def holds(access, keys, catalog, settings) -> HoldEngine:
    return HoldEngine(access, keys, catalog, settings)


@pytest.fixture
async def pg(schema: str):
    """A connection whose search_path is a fresh schema, dropped afterwards."""
    conn = await asyncpg.connect(DATABASE_URL)
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.execute(f'SET search_path TO "{schema}", public')
    yield conn
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await conn.close()
