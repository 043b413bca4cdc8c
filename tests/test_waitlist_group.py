"""Waitlist entries on a resource group (issue 16) over HTTP, real Redis and Postgres: the
freeing script hands a member to the first live entry, FIFO across a resource's own entries
and its group's, on the member the group's strategy picks; withdrawal leaves every member's
queue; bad input gets a typed 4xx and changes nothing. Holds here live the default TTL (no
lapse); lapses, creates serving entries first and races: tests/test_waitlist_group_race.py."""

from __future__ import annotations

import itertools

import pytest

from engine import directory
from engine.settings import Settings
from tests.conftest import snapshot
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    app,
    at,
    client,
    create_body,
    migrated,
    world,
)
from tests.test_transfer_api import add_partner, drain
from tests.timing import eventually

ROOMS = ["room-1", "room-2", "room-3"]
_slots = itertools.count(0)


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.replace(partner_rate_burst=5_000, ip_rate_burst=10_000,
                            partner_rate_per_minute=6_000_000, ip_rate_per_minute=12_000_000)


def fresh_slot() -> int:
    return 60 * next(_slots)  # minutes after T0, an hour apart (v-confirm: 15 min buffer)


async def rooms(app, client, world, strategy: str = "first_fit", group: str = "rooms",
                vendor: str = "v-confirm", **extra) -> None:
    async with app.state.services.pool.acquire() as conn:
        for name in ROOMS:
            await directory.create_resource(conn, name, vendor)
    r = await client.post(f"/v1/vendors/{vendor}/resource-groups",
                          json={"groupId": group, "resourceIds": ROOMS, "strategy": strategy,
                                **extra}, headers=world.auth("admin"))
    assert r.status_code == 201, r.text


async def state_of(redis, prefix: str) -> dict:
    return {k: v for k, v in (await snapshot(redis, prefix)).items()
            if not k.endswith(":rate")}


async def hold(client, world, start: int, who: str = "p1", **place) -> dict:
    r = await client.post("/v1/reservations",
                          json=create_body(start=start, **(place or {"resourceId": "room-1"})),
                          headers=world.auth(who))
    assert r.status_code == 201, r.text
    return r.json()


async def hold_all(client, world, start: int) -> list[dict]:
    """p1 holds every member of the group for the slot (pooled creates)."""
    return [await hold(client, world, start, resourceGroupId="rooms") for _ in ROOMS]


async def wait(client, world, start: int, who: str = "p2", **place) -> dict:
    r = await client.post("/v1/waitlist", json={**create_body(start=start), **place,
                                                "ttlMs": 600_000}, headers=world.auth(who))
    assert r.status_code == 201, r.text
    return r.json()


async def entry(client, world, entry_id: str, who: str = "p2") -> dict:
    r = await client.get(f"/v1/waitlist/{entry_id}", headers=world.auth(who))
    assert r.status_code == 200, r.text
    return r.json()


def held_id(entry_id: str) -> str:
    return "rsv" + entry_id.removeprefix("wl")


async def stream(redis, keys, rid: str) -> list[dict]:
    return [e for _, e in await redis.xrange(keys.events(keys.shard_of_id(rid)))
            if e["reservationId"] == rid]


async def cap_passed_to_hold(redis, keys, partner: str, wid: str) -> None:
    """The entry's slot in the partner's cap passes to its hold (queued by whoever ran the
    handoff: a cancel, a reaper, a create)."""
    async def passed() -> bool:
        members = await redis.zrange(keys.partner_holds(partner), 0, -1)
        return held_id(wid) in members and wid not in members
    await eventually(passed, what="the entry's cap slot passed to its hold")


async def test_a_member_freed_goes_to_the_group_entry(app, client, world, redis):
    svc = app.state.services
    keys = svc.keyspace
    await rooms(app, client, world)
    start = fresh_slot()
    held = await hold_all(client, world, start)
    assert sorted(h["resourceId"] for h in held) == ROOMS
    made = await wait(client, world, start, resourceGroupId="rooms")
    assert made["state"] == "waiting" and made["resourceGroupId"] == "rooms"
    assert made["resourceId"] is None
    wid = made["waitlistEntryId"]
    # Every member's queue holds it.
    shard = keys.shard_of_waitlist_id(wid)
    for room in ROOMS:
        assert await redis.zcard(keys.waitlist_index(room, shard)) == 1
    freed = next(h for h in held if h["resourceId"] == "room-2")
    r = await client.post(f"/v1/reservations/{freed['reservationId']}/cancel",
                          headers=world.auth("p1"))
    assert r.status_code == 200, r.text
    got = await entry(client, world, wid)
    assert got["state"] == "fulfilled" and got["resourceId"] == "room-2"
    assert got["reservationId"] == held_id(wid)
    r = await client.get(f"/v1/reservations/{held_id(wid)}", headers=world.auth("p2"))
    assert r.status_code == 200 and r.json()["resourceId"] == "room-2"
    [created] = await stream(redis, keys, held_id(wid))
    assert created["origin"] == "waitlist" and created["waitlistEntryId"] == wid
    assert created["resourceId"] == "room-2" and created["resourceGroupId"] == "rooms"
    assert created["partnerId"] == "p2"
    # It left every member's queue: nothing waits any more.
    for room in ROOMS:
        assert await redis.zcard(keys.waitlist_index(room, shard)) == 0
    await cap_passed_to_hold(redis, keys, "p2", wid)


async def test_fifo_across_a_resources_own_entries_and_its_groups(app, client, world, redis):
    """One queue per member and slot, one sequence: whoever joined first is served first,
    whether it named the member or its group."""
    await rooms(app, client, world)
    await add_partner(app, world, "p3")
    start = fresh_slot()
    held = {h["resourceId"]: h["reservationId"] for h in await hold_all(client, world, start)}
    own = (await wait(client, world, start, who="p2", resourceId="room-1"))["waitlistEntryId"]
    grouped = (await wait(client, world, start, who="p3",
                          resourceGroupId="rooms"))["waitlistEntryId"]
    later = (await wait(client, world, start, who="p2",
                        resourceId="room-2"))["waitlistEntryId"]
    await client.post(f"/v1/reservations/{held['room-1']}/cancel", headers=world.auth("p1"))
    assert (await entry(client, world, own))["state"] == "fulfilled"  # joined first
    assert (await entry(client, world, grouped, who="p3"))["state"] == "waiting"
    await client.post(f"/v1/reservations/{held['room-2']}/cancel", headers=world.auth("p1"))
    got = await entry(client, world, grouped, who="p3")  # the group's entry before `later`
    assert got["state"] == "fulfilled" and got["resourceId"] == "room-2"
    assert (await entry(client, world, later))["state"] == "waiting"


@pytest.mark.parametrize("strategy, extra, expected", [
    ("first_fit", {}, "room-1"),
    ("preferred", {"preferredOrder": ["room-3", "room-1", "room-2"]}, "room-3"),
])
async def test_the_member_is_chosen_by_the_groups_strategy(app, client, world, strategy,
                                                           extra, expected):
    """Every member free (the holds were cancelled before the entry came): the entry is
    served at once, on the member the strategy puts first."""
    await rooms(app, client, world, strategy, **extra)
    made = await wait(client, world, fresh_slot(), resourceGroupId="rooms")
    assert made["state"] == "fulfilled" and made["resourceId"] == expected


async def test_best_fit_takes_the_tightest_free_member(app, client, world):
    await rooms(app, client, world, "best_fit")
    start = fresh_slot()
    # room-1 is free all around; room-3 has holds right before and after the slot.
    await hold(client, world, start - 45, resourceId="room-3")
    await hold(client, world, start + 45, resourceId="room-3")
    made = await wait(client, world, start, resourceGroupId="rooms")
    assert made["state"] == "fulfilled" and made["resourceId"] == "room-3"


async def test_withdrawing_a_group_entry_leaves_every_members_queue(app, client, world, redis):
    svc = app.state.services
    keys = svc.keyspace
    await rooms(app, client, world)
    start = fresh_slot()
    held = await hold_all(client, world, start)
    wid = (await wait(client, world, start, resourceGroupId="rooms"))["waitlistEntryId"]
    r = await client.delete(f"/v1/waitlist/{wid}", headers=world.auth("p2"))
    assert r.status_code == 200 and r.json()["state"] == "withdrawn", r.text
    shard = keys.shard_of_waitlist_id(wid)
    for room in ROOMS:
        assert await redis.exists(keys.waitlist_index(room, shard)) == 0
    await client.post(f"/v1/reservations/{held[0]['reservationId']}/cancel",
                      headers=world.auth("p1"))
    assert (await entry(client, world, wid))["state"] == "withdrawn"
    assert await redis.exists(keys.reservation(held_id(wid))) == 0


async def test_bad_input_is_typed_and_changes_nothing(app, client, world, redis):
    svc = app.state.services
    await rooms(app, client, world)
    async with svc.pool.acquire() as conn:
        await directory.create_resource(conn, "other-1", "v-other")
    r = await client.post("/v1/vendors/v-other/resource-groups",
                          json={"groupId": "theirs", "resourceIds": ["other-1"],
                                "strategy": "first_fit"}, headers=world.auth("admin"))
    assert r.status_code == 201, r.text
    start = fresh_slot()
    await hold_all(client, world, start)
    body = {**create_body(start=start), "ttlMs": 600_000}
    cases = [
        ({**body, "resourceGroupId": "theirs"}, 404, "UNKNOWN_RESOURCE_GROUP"),
        ({**body, "resourceGroupId": "nope"}, 404, "UNKNOWN_RESOURCE_GROUP"),
        ({**body, "resourceGroupId": "rooms", "slotStartTime": at(-4_000_005),
          "slotEndTime": at(-3_999_975)}, 400, "SLOT_IN_PAST"),
        ({**body, "resourceGroupId": "rooms", "resourceId": "room-1"}, 400, "INVALID_FIELD"),
        (body, 400, "MISSING_FIELD"),
        ({**body, "resourceGroupId": "rooms", "slotStartTime": at(start + 7)}, 400,
         "SLOT_NOT_ALIGNED"),
        ({**body, "resourceGroupId": "rooms", "ttlMs": 10}, 400, "INVALID_FIELD"),
        ({**body, "resourceGroupId": "bad{tag}"}, 404, "UNKNOWN_RESOURCE_GROUP"),
    ]
    before = await state_of(redis, svc.settings.key_prefix)
    for payload, status, code in cases:
        r = await client.post("/v1/waitlist", json=payload, headers=world.auth("p2"))
        assert r.status_code == status, (payload, r.text)
        if code is not None:
            assert r.json()["error"]["code"] == code, r.text
    assert await state_of(redis, svc.settings.key_prefix) == before


async def test_a_group_split_across_hash_tags_is_refused_and_nothing_changes(app, client,
                                                                             world, redis):
    """Groups are validated colocated, but a member's shard key may change later (a partial
    re-key this process has loaded): one script could no longer reach every member, so the
    entry is refused (409 GROUP_NOT_COLOCATED) before any write."""
    import dataclasses

    svc = app.state.services
    keys = svc.keyspace
    await rooms(app, client, world)
    catalog = svc.reservations.catalog.catalog
    elsewhere = next(k for k in (f"split-{n}" for n in range(100))
                     if keys.shard_of(k) != keys.shard_of("v-confirm"))
    catalog.add(dataclasses.replace(catalog.get("room-3"), shard_key=elsewhere))
    before = await state_of(redis, svc.settings.key_prefix)
    r = await client.post("/v1/waitlist", json={**create_body(start=fresh_slot()),
                                                "resourceGroupId": "rooms", "ttlMs": 60_000},
                          headers=world.auth("p2"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "GROUP_NOT_COLOCATED", r.text
    assert await state_of(redis, svc.settings.key_prefix) == before


async def test_the_waiting_partner_gets_reservation_created_with_the_member(app, client,
                                                                            world, redis):
    """Through the commit queue: the handed-over hold's ``reservation.created`` event is the
    waiting partner's, with the member chosen and ``origin: waitlist``."""
    import orjson

    svc = app.state.services
    await rooms(app, client, world)
    start = fresh_slot()
    held = await hold_all(client, world, start)
    wid = (await wait(client, world, start, resourceGroupId="rooms"))["waitlistEntryId"]
    freed = next(h for h in held if h["resourceId"] == "room-3")
    await client.post(f"/v1/reservations/{freed['reservationId']}/cancel",
                      headers=world.auth("p1"))
    await drain(svc)
    async with svc.pool.acquire() as conn:
        rows = await conn.fetch("SELECT type, partner_id, payload FROM webhook_events "
                                "WHERE reservation_id = $1", held_id(wid))
    [row] = [r for r in rows if r["type"] == "reservation.created"]
    payload = row["payload"] if isinstance(row["payload"], dict) \
        else orjson.loads(row["payload"])
    data = payload["data"]
    assert row["partner_id"] == "p2" and data["partnerId"] == "p2"
    assert data["resourceId"] == "room-3"
    assert data["metadata"]["origin"] == "waitlist"
    assert data["metadata"]["waitlistEntryId"] == wid


async def test_a_cancel_racing_pooled_creates_hands_the_member_to_the_group_entry(
        app, client, world, redis):
    """Every member held, an entry on the group; the holder cancels one while another
    partner's pooled creates race it: the freed member goes to the entry inside the cancel's
    script, so every create is POOL_FULL, over several rounds."""
    import asyncio

    svc = app.state.services
    keys = svc.keyspace
    await rooms(app, client, world)
    await add_partner(app, world, "p3")
    for n in range(6):
        start = fresh_slot()
        held = await hold_all(client, world, start)
        wid = (await wait(client, world, start, resourceGroupId="rooms"))["waitlistEntryId"]
        freed = held[n % len(held)]
        results = await asyncio.gather(
            client.post(f"/v1/reservations/{freed['reservationId']}/cancel",
                        headers=world.auth("p1")),
            *(client.post("/v1/reservations",
                          json=create_body(start=start, resourceGroupId="rooms"),
                          headers=world.auth("p3")) for _ in range(4)))
        assert results[0].status_code == 200, results[0].text
        assert [r.status_code for r in results[1:]] == [409] * 4, [r.text for r in results]
        assert {r.json()["error"]["code"] for r in results[1:]} == {"POOL_FULL"}
        got = await entry(client, world, wid)
        assert got["state"] == "fulfilled" and got["resourceId"] == freed["resourceId"]
        assert len([e for e in await stream(redis, keys, held_id(wid))
                    if e["fromState"] == "INTENT_CREATED"]) == 1
