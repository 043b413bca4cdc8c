"""Waitlist handoff under real concurrency (issue 16), real Redis and Postgres: an expired
hold goes to its waiting entry in the reaper's own expiry script (the new hold is created at
the expiry's instant); a hold whose TTL lapsed before the reaper ran still goes to the entry,
never to a direct create racing it; several reapers never give a slot twice nor lose it;
cancels racing direct creates. Hold TTLs are short here; a round whose client stalled past
a deadline it had to beat (the server's clock says so) is played again on fresh slots."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import redis.asyncio as aioredis

from engine.access import RedisAccess
from engine.lifecycle import TERMINAL, State
from engine.reservations import ReservationEngine
from engine.settings import Settings
from engine.times import parse_time
from tests.conftest import REDIS_URL
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    app,
    client,
    create_body,
    migrated,
    world,
)
from tests.test_transfer_api import add_partner
from tests.timing import server_ms, until_server_ms

HOLD_TTL_MS = 4_000
_slots = itertools.count(0)


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.replace(partner_rate_burst=5_000, ip_rate_burst=10_000,
                            partner_rate_per_minute=6_000_000, ip_rate_per_minute=12_000_000,
                            hold_ttl_ms=HOLD_TTL_MS)


def fresh_slot() -> int:
    return 60 * next(_slots)  # minutes after T0, an hour apart


async def hold(client, world, start: int, who="p1") -> tuple[str, int]:
    r = await client.post("/v1/reservations", json=create_body(start=start),
                          headers=world.auth(who))
    assert r.status_code == 201, r.text
    body = r.json()
    return body["reservationId"], parse_time(body["expiresAt"], "expiresAt")


async def hold_with_entry(client, world, redis) -> tuple[str, int, str, int] | None:
    """p1's hold and p2's waiting entry on a fresh slot; None when the client stalled past
    the hold's deadline before the entry was written (the round is played again)."""
    start = fresh_slot()
    rid, deadline = await hold(client, world, start)
    r = await client.post("/v1/waitlist",
                          json={**create_body(start=start), "resourceId": "v-confirm",
                                "ttlMs": 600_000},
                          headers=world.auth("p2"))
    assert r.status_code == 201, r.text
    made = r.json()
    if made["state"] != "waiting":
        assert await server_ms(redis) > deadline, made  # only a lapsed hold explains it
        return None
    return rid, deadline, made["waitlistEntryId"], start


async def rounds(n: int, client, world, redis) -> list[tuple[str, int, str, int]]:
    out = []
    for _ in range(n * 5):
        got = await hold_with_entry(client, world, redis)
        if got is not None:
            out.append(got)
        if len(out) == n:
            return out
    raise AssertionError("the client stalled past every hold's deadline")


def held_id(entry_id: str) -> str:
    return "rsv" + entry_id.removeprefix("wl")


async def creations(redis, keys, rid: str) -> list[dict]:
    shard = keys.shard_of_id(rid)
    return [e for _, e in await redis.xrange(keys.events(shard))
            if e["reservationId"] == rid and e.get("fromState") == "INTENT_CREATED"]


async def no_overlapping_live_holds(redis, keys) -> None:
    """Over every reservation record left: no two live ones share a unit of a resource."""
    live: dict[str, list[tuple[int, int, str]]] = {}
    for shard in range(keys.shards):
        async for key in redis.scan_iter(match=keys.reservation_pattern(shard), count=1000):
            rec = await redis.hgetall(key)
            if rec and State(rec["st"]) not in TERMINAL:
                live.setdefault(rec["rs"], []).append((int(rec["f"]), int(rec["l"]),
                                                       key))
    for spans in live.values():
        spans.sort()
        for (f1, l1, k1), (f2, _, k2) in zip(spans, spans[1:]):
            assert l1 < f2, (k1, k2)


async def reap_on_own_connections(svc, settings, reapers: int = 4) -> list:
    """Several reapers, each on its own Redis connection (real concurrency at Redis), every
    shard at once; the lists of what each moved."""
    keys = svc.keyspace
    clients = [aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
               for _ in range(reapers)]
    accesses = [RedisAccess(c) for c in clients]
    engines = [ReservationEngine(a, keys, svc.reservations.engine.catalog, settings,
                                 limits=svc.reservations.limits) for a in accesses]
    try:
        return await asyncio.gather(*(e.reap(shard) for e in engines
                                      for shard in range(keys.shards)))
    finally:
        for a in accesses:
            await a.close()
        for c in clients:
            await c.aclose()


async def test_the_reapers_expiry_hands_the_slot_over_at_its_instant(app, client, world,
                                                                      redis):
    svc = app.state.services
    keys, engine = svc.keyspace, svc.reservations.engine
    rid, deadline, wid, _ = (await rounds(1, client, world, redis))[0]
    await until_server_ms(redis, deadline + 1)
    # The units lapsed by TTL, but nothing takes them before the reaper (or a create) runs.
    assert await redis.hget(keys.waitlist_entry(wid), "st") == "waiting"
    shard = keys.shard_of_id(rid)
    moved = [m for m in await engine.reap(shard) if m.reservation_id == rid]
    assert len(moved) == 1 and moved[0].state == State.FAILED_VENDOR_TIMEOUT
    [handoff] = moved[0].handoffs
    new = held_id(wid)
    assert (handoff.reservation_id, handoff.partner_id, handoff.entry_id) == (new, "p2", wid)
    old = await redis.hgetall(keys.reservation(rid))
    rec = await redis.hgetall(keys.reservation(new))
    expired_at = [e for _, e in await redis.xrange(keys.events(shard))
                  if e["reservationId"] == rid][-1]["timestamp"]
    # Same script, same instant: the waiting partner's hold exists from the expiry on, so
    # from the deadline to the hold is exactly the reaper's delay (<= its period).
    assert int(rec["c"]) == int(expired_at)
    assert int(rec["dl"]) == int(rec["c"]) + HOLD_TTL_MS == handoff.deadline_ms
    assert int(old["dl"]) == deadline <= int(rec["c"])
    assert rec["p"] == "p2" and rec["og"] == "waitlist"
    assert await redis.hget(keys.waitlist_entry(wid), "st") == "fulfilled"
    # Reaping again changes nothing: never given twice.
    assert [m for m in await engine.reap(shard) if m.reservation_id == rid] == []
    assert len(await creations(redis, keys, new)) == 1


async def test_a_lapsed_hold_goes_to_the_entry_not_to_racing_creates(app, client, world,
                                                                     redis):
    """After the deadline, before any reaper: direct creates of another partner race the
    reaper for the slot; the entry gets it exactly once, every create is refused."""
    svc = app.state.services
    keys, engine = svc.keyspace, svc.reservations.engine
    await add_partner(app, world, "p3")
    played = await rounds(6, client, world, redis)
    await until_server_ms(redis, max(d for _, d, _, _ in played) + 1)
    for rid, _, wid, start in played:
        shard = keys.shard_of_id(rid)
        results = await asyncio.gather(
            *(client.post("/v1/reservations", json=create_body(start=start),
                          headers=world.auth("p3")) for _ in range(4)),
            engine.reap(shard), engine.reap(shard))
        creates = results[:4]
        assert [r.status_code for r in creates] == [409] * 4, [r.text for r in creates]
        assert await redis.hget(keys.waitlist_entry(wid), "st") == "fulfilled"
        assert len(await creations(redis, keys, held_id(wid))) == 1
    await no_overlapping_live_holds(redis, keys)


async def test_several_reapers_never_give_a_slot_twice_nor_lose_it(app, client, world, redis,
                                                                  migrated):
    svc = app.state.services
    keys = svc.keyspace
    played = await rounds(10, client, world, redis)
    await until_server_ms(redis, max(d for _, d, _, _ in played) + 1)
    results = await reap_on_own_connections(svc, migrated)
    handoffs = [h for moved in results for m in moved for h in m.handoffs]
    expected = {held_id(wid) for _, _, wid, _ in played}
    given = [h.reservation_id for h in handoffs if h.reservation_id in expected]
    assert sorted(given) == sorted(expected)  # each exactly once, none lost
    expired = [m.reservation_id for moved in results for m in moved]
    assert sorted(r for r in expired if r in {p[0] for p in played}) == \
        sorted(p[0] for p in played)  # each hold expired once
    for _, _, wid, _ in played:
        assert await redis.hget(keys.waitlist_entry(wid), "st") == "fulfilled"
        assert len(await creations(redis, keys, held_id(wid))) == 1
    await no_overlapping_live_holds(redis, keys)


async def test_cancels_racing_direct_creates(app, client, world, redis):
    """The holder cancels while another partner creates on the slot: the waiting entry
    always ends holding it, the creates never do, over many rounds."""
    svc = app.state.services
    keys = svc.keyspace
    await add_partner(app, world, "p3")
    for _ in range(8):
        start = fresh_slot()
        rid, _ = await hold(client, world, start)
        r = await client.post("/v1/waitlist",
                              json={**create_body(start=start), "resourceId": "v-confirm",
                                    "ttlMs": 600_000},
                              headers=world.auth("p2"))
        wid = r.json()["waitlistEntryId"]
        if r.json()["state"] != "waiting":  # the hold lapsed first (stalled client)
            continue
        results = await asyncio.gather(
            client.post(f"/v1/reservations/{rid}/cancel", headers=world.auth("p1")),
            *(client.post("/v1/reservations", json=create_body(start=start),
                          headers=world.auth("p3")) for _ in range(3)))
        assert all(r.status_code == 409 for r in results[1:]), [r.text for r in results]
        assert await redis.hget(keys.waitlist_entry(wid), "st") == "fulfilled"
        assert len(await creations(redis, keys, held_id(wid))) == 1
    await no_overlapping_live_holds(redis, keys)
