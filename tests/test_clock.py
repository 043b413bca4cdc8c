"""Python-side time on a manual clock: the catalog's negative cache, the API key cache, the
times a response reports. Each lifetime is tested to the edge by moving the clock, never by
sleeping (real Postgres and Redis underneath; only the clock is ours to move)."""

from __future__ import annotations

import asyncio

import pytest

from api.auth import KeyResolver, issue_key
from api.errors import ApiError
from api.validation import format_time
from api.views import created_view
from engine import clock, directory
from engine.catalog_cache import NEGATIVE_TTL_S, CatalogCache
from engine.clock import ManualClock, SystemClock
from engine.db import create_pool, migrate
from engine.errors import UnknownResource
from engine.occupancy import availability
from engine.lifecycle import State
from engine.reservations import Moved
from engine.resources import Vendor
from engine.service import Created
from tests.conftest import DATABASE_URL

T0 = 1_893_456_000_000


@pytest.fixture
async def pool(settings):
    await asyncio.to_thread(migrate, settings)
    pool = await create_pool(settings, max_size=2)
    yield pool
    await pool.close()
    import asyncpg

    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
    finally:
        await conn.close()


def test_manual_clock_moves_only_when_told():
    fake = ManualClock(now_ms=T0, monotonic=5.0)
    assert (fake.now_ms(), fake.monotonic()) == (T0, 5.0)
    fake.advance(1.5)
    assert (fake.now_ms(), fake.monotonic()) == (T0 + 1_500, 6.5)
    fake.set_ms(T0 - 60_000)  # a wall clock may step back; the monotonic one may not
    assert (fake.now_ms(), fake.monotonic()) == (T0 - 60_000, 6.5)
    with pytest.raises(ValueError):
        fake.advance(-0.001)


def test_use_swaps_the_process_clock_and_always_restores_it():
    before = clock.current()
    assert isinstance(before, SystemClock)
    with pytest.raises(RuntimeError), clock.use(ManualClock(now_ms=T0)) as fake:
        assert clock.current() is fake and clock.now_ms() == T0
        with clock.use(ManualClock(now_ms=5)):
            assert clock.now_ms() == 5
        assert clock.now_ms() == T0
        raise RuntimeError("the body failed")
    assert clock.current() is before


async def test_system_clock_agrees_with_the_redis_clock(redis):
    # Same machine, same kernel clock: Python's now lies between two Redis TIME reads.
    sec, usec = await redis.time()
    mine = SystemClock().now_ms()
    sec2, usec2 = await redis.time()
    assert sec * 1000 + usec // 1000 <= mine <= sec2 * 1000 + usec2 // 1000


TICK = 2 ** -10  # exact in binary floating point, so "just before the edge" is exact too


async def test_a_catalog_miss_is_remembered_for_exactly_the_negative_ttl(pool):
    cache = CatalogCache(pool)
    with clock.use(ManualClock()) as fake:
        with pytest.raises(UnknownResource):
            await cache.vendor("late-vendor")
        with pytest.raises(UnknownResource):
            await cache.resource("late-room")
        async with pool.acquire() as conn:  # another process creates both meanwhile
            await directory.create_vendor(conn, "late-vendor")
            await directory.create_resource(conn, "late-room", "late-vendor")
        fake.advance(NEGATIVE_TTL_S - TICK)
        with pytest.raises(UnknownResource):  # the misses are still remembered
            await cache.vendor("late-vendor")
        with pytest.raises(UnknownResource):
            await cache.resource("late-room")
        fake.advance(TICK)  # the negative ttl is over: Postgres is asked again
        assert (await cache.vendor("late-vendor")).id == "late-vendor"
        assert (await cache.resource("late-room")).id == "late-room"


async def test_a_forgotten_miss_is_looked_up_at_once(pool):
    cache = CatalogCache(pool)
    with clock.use(ManualClock()):
        with pytest.raises(UnknownResource):
            await cache.vendor("mine")
        async with pool.acquire() as conn:
            await directory.create_vendor(conn, "mine")
        cache.forget_miss("vendor", "mine")  # this process created it: no wait at all
        assert (await cache.vendor("mine")).id == "mine"


async def test_a_revoked_key_works_for_exactly_the_key_cache_lifetime(pool):
    async with pool.acquire() as conn:
        await directory.create_partner(conn, "acme", "Acme")
        issued, stored = await issue_key(conn, "partner", partner_id="acme")
    resolver = KeyResolver(pool, cache_ms=2_000)
    header = f"Bearer {issued.key}"
    with clock.use(ManualClock()) as fake:
        assert (await resolver.principal(header)).partner_id == "acme"
        async with pool.acquire() as conn:
            await directory.revoke_api_key(conn, stored.id)
        fake.advance(2.0 - TICK)
        assert (await resolver.principal(header)).partner_id == "acme"  # cached row
        fake.advance(TICK)
        with pytest.raises(ApiError) as refused:
            await resolver.principal(header)
        assert refused.value.status == 401


async def test_responses_report_the_clock_they_read(access, keys, catalog):
    with clock.use(ManualClock(now_ms=T0 + 123)) as fake:
        found = await availability(access, keys, catalog.get("room-a"), T0, T0 + 60 * 60_000,
                                   15 * 60_000)
        assert found.computed_at_ms == T0 + 123
        instant = Vendor("v-instant", "room-a", confirmation_required=False)
        moved = Moved("rsv_0_x", State.AUTHORIZED_BOTH, 7, T0 + 900_000)
        fake.advance(2)
        view = created_view(Created(moved, instant))
        assert view.estimated_confirmation_time == format_time(T0 + 2_123)
        assert view.expires_at == format_time(T0 + 900_000)
