"""The raw RESP hot path: handshake, per-call errors inside a batch, reconnection."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from engine.access import RedisAccess
from benchmarks.holds import HoldEngine
from engine.resp import RespError, ScriptConnection
from tests.conftest import REDIS_URL

T0 = 1_893_456_000_000
UNIT = 15 * 60_000


async def test_handshake_selects_the_database_and_names_the_connection(prefix):
    name = f"sg-test-{uuid.uuid4().hex[:8]}"
    wire = ScriptConnection.from_url(REDIS_URL.rsplit("/", 1)[0] + "/1")
    wire.name = name
    db1 = aioredis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/1", decode_responses=True)
    try:
        assert await wire.execute([("SET", f"{prefix}k", "v"), ("GET", f"{prefix}k")]) == [
            "OK", "v"]
        assert await db1.get(f"{prefix}k") == "v"
        clients = await db1.client_list()
        assert any(c["name"] == name for c in clients)
    finally:
        await db1.delete(f"{prefix}k")
        await db1.aclose()
        await wire.close()


async def test_an_error_reply_fails_only_its_own_call(access, keys, prefix):
    good = access.call("read_hold", [keys.hold(keys.new_hold_id("r"))], [])
    bad = access.call("read_hold", [], [])  # the script indexes KEYS[1]: a script error
    also_good = access.call("read_hold", [keys.hold(keys.new_hold_id("r"))], [])
    results = await asyncio.gather(good, bad, also_good, return_exceptions=True)
    assert results[0] == [-4] and results[2] == [-4]
    assert isinstance(results[1], RespError)


async def test_a_killed_connection_is_replaced_and_calls_retry(holds: HoldEngine, redis):
    access: RedisAccess = holds.access
    access.wire.name = f"sg-test-{uuid.uuid4().hex[:8]}"
    await holds.place("room-a", T0, T0 + UNIT)
    ours = [c for c in await redis.client_list() if c["name"] == access.wire.name]
    assert len(ours) == 1
    await redis.client_kill_filter(_id=ours[0]["id"])
    # The next placement finds the connection dead, reconnects and lands exactly once.
    hold = await holds.place("room-a", T0 + UNIT, T0 + 2 * UNIT)
    assert await holds.read(hold.hold_id) == hold
    assert len([c for c in await redis.client_list() if c["name"] == access.wire.name]) == 1


async def test_unsupported_urls_are_refused():
    with pytest.raises(ValueError):
        ScriptConnection.from_url("unix:///tmp/redis.sock")
