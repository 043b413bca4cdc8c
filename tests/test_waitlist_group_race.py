"""Waitlist entries on resource groups under real concurrency (issue 16), real Redis and
Postgres: holds lapse (short TTLs, no reaper yet), then pooled creates of another partner
race the reapers for the freed members; several reapers on their own connections race one
another. A waiting entry gets a member exactly once, before any create, never twice; every
round is checked over the shard's whole commit-queue history (no two holds ever live on one
unit at once). Pooled and multi-resource creates serve waiting entries before they take
units. A round whose client stalled past a deadline it had to beat (the server's clock says
so) is played again on a fresh slot."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from engine.lifecycle import TERMINAL, State
from engine.settings import Settings
from engine.times import parse_time
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    app,
    at,
    client,
    create_body,
    migrated,
    world,
)
from tests.test_transfer_api import add_partner
from tests.test_waitlist_group import (
    ROOMS,
    cap_passed_to_hold,
    entry,
    fresh_slot,
    held_id,
    hold,
    hold_all,
    rooms,
    stream,
    wait,
)
from tests.test_waitlist_race import reap_on_own_connections
from tests.timing import server_ms, until_server_ms

HOLD_TTL_MS = 3_000


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.replace(partner_rate_burst=5_000, ip_rate_burst=10_000,
                            partner_rate_per_minute=6_000_000, ip_rate_per_minute=12_000_000,
                            hold_ttl_ms=HOLD_TTL_MS)


async def never_two_live_holds_on_a_unit(redis, keys, shard: int) -> None:
    """Replay the shard's commit-queue stream: a hold lives from its creation to its end
    (a terminal entry) or its deadline, whichever comes first (a lapsed hold's units are
    free at its deadline, before the reaper records the expiry). No two holds of one
    resource whose blocks overlap ever live at the same instant."""
    holds: dict[str, list[dict]] = {}  # a multi-resource reservation: one per item
    for _, e in await redis.xrange(keys.events(shard)):
        rid = e["reservationId"]
        if e["fromState"] == "INTENT_CREATED":
            items = orjson.loads(e["items"]) if "items" in e else \
                [[e["resourceId"], 0, 0, 0, 0, e["blockStart"], e["blockEnd"]]]
            holds[rid] = [{"rs": i[0], "bs": int(i[5]), "be": int(i[6]),
                           "from": int(e["createdAt"]), "until": int(e["expiresAt"])}
                          for i in items]
            continue
        for h in holds[rid]:
            if State(e["toState"]) in TERMINAL:
                h["until"] = min(h["until"], int(e["timestamp"]))
            elif "expiresAt" in e:
                h["until"] = int(e["expiresAt"])
    spans = sorted(((rid, h) for rid, hs in holds.items() for h in hs),
                   key=lambda kv: kv[1]["from"])
    for i, (a, ha) in enumerate(spans):
        for b, hb in spans[i + 1:]:
            if ha["rs"] == hb["rs"] and ha["bs"] < hb["be"] and hb["bs"] < ha["be"]:
                assert ha["until"] <= hb["from"] or hb["until"] <= ha["from"], (a, ha, b, hb)


async def rounds_all_held(n: int, client, world, redis, entries) -> list[tuple]:
    """n fresh slots, each with every member held by p1 and `entries` ((partner, place)...)
    waiting, in that order; a slot whose entries did not all wait (the client stalled past
    a hold's deadline: the server's clock says so) is left and another one played."""
    out = []
    for _ in range(n * 5):
        start = fresh_slot()
        held = await hold_all(client, world, start)
        first_deadline = min(parse_time(h["expiresAt"], "expiresAt") for h in held)
        made = [await wait(client, world, start, who=who, **place) for who, place in entries]
        if any(m["state"] != "waiting" for m in made):
            assert await server_ms(redis) > first_deadline, made
            continue
        deadline = max(parse_time(h["expiresAt"], "expiresAt") for h in held)
        out.append((start, deadline, [m["waitlistEntryId"] for m in made], held))
        if len(out) == n:
            return out
    raise AssertionError("the client stalled past every hold's deadline")


async def creations_of(redis, keys, rid: str) -> int:
    return len([e for e in await stream(redis, keys, rid)
                if e["fromState"] == "INTENT_CREATED"])


async def test_group_entries_get_a_member_before_racing_pooled_creates(app, client, world,
                                                                       redis):
    """All members lapsed, no reaper yet: four pooled creates of p3 race two reapers. The
    entry gets exactly one member, the creates the two others, one create is POOL_FULL."""
    svc = app.state.services
    keys, engine = svc.keyspace, svc.reservations.engine
    await rooms(app, client, world)
    await add_partner(app, world, "p3")
    for _ in range(5):  # each round races on its own: lapse, then creates and reapers
        [(start, deadline, (wid,), _)] = await rounds_all_held(
            1, client, world, redis, [("p2", {"resourceGroupId": "rooms"})])
        await until_server_ms(redis, deadline + 1)
        shard = keys.shard_of_waitlist_id(wid)
        results = await asyncio.gather(
            *(client.post("/v1/reservations",
                          json=create_body(start=start, resourceGroupId="rooms"),
                          headers=world.auth("p3")) for _ in range(4)),
            engine.reap(shard), engine.reap(shard))
        creates = results[:4]
        codes = sorted(r.status_code for r in creates)
        assert codes == [201, 201, 409, 409], [r.text for r in creates]
        assert all(r.json()["error"]["code"] == "POOL_FULL" for r in creates
                   if r.status_code == 409)
        got = await entry(client, world, wid)
        assert got["state"] == "fulfilled" and got["resourceId"] == "room-1"  # first_fit
        assert await creations_of(redis, keys, held_id(wid)) == 1
        taken = [got["resourceId"]] + [r.json()["resourceId"] for r in creates
                                       if r.status_code == 201]
        assert sorted(taken) == ROOMS
        await never_two_live_holds_on_a_unit(redis, keys, shard)


async def test_several_reapers_serve_group_and_member_entries_once_in_order(
        app, client, world, redis, migrated):
    """Per slot: p2's entry on the group, p3's on the group, p2's on room-3, in that order;
    every member lapses; four reapers on their own connections reap every shard at once.
    Each entry is served exactly once, in FIFO order: room-1, room-2, room-3."""
    svc = app.state.services
    keys = svc.keyspace
    await rooms(app, client, world)
    await add_partner(app, world, "p3")
    entries = [("p2", {"resourceGroupId": "rooms"}), ("p3", {"resourceGroupId": "rooms"}),
               ("p2", {"resourceId": "room-3"})]
    played = await rounds_all_held(4, client, world, redis, entries)
    await until_server_ms(redis, max(d for _, d, _, _ in played) + 1)
    results = await reap_on_own_connections(svc, migrated)
    handoffs = [h.reservation_id for moved in results for m in moved for h in m.handoffs]
    expected = {held_id(w) for _, _, wids, _ in played for w in wids}
    assert sorted(h for h in handoffs if h in expected) == sorted(expected)  # once, none lost
    expired = [m.reservation_id for moved in results for m in moved]
    ours = [h["reservationId"] for _, _, _, held in played for h in held]
    assert sorted(r for r in expired if r in set(ours)) == sorted(ours)  # each expired once
    for _, _, wids, _ in played:
        got = [await entry(client, world, w, who=who)
               for w, (who, _) in zip(wids, entries)]
        assert [g["state"] for g in got] == ["fulfilled"] * 3
        assert [g["resourceId"] for g in got] == ROOMS
        for w in wids:
            assert await creations_of(redis, keys, held_id(w)) == 1
    for shard in {keys.shard_of_waitlist_id(w) for _, _, wids, _ in played for w in wids}:
        await never_two_live_holds_on_a_unit(redis, keys, shard)


# ---- creates serve waiting entries first (pooled, multi-resource) ----------------------------
async def lapsed_hold_with_entry(client, world, redis, resource: str) -> tuple[str, int]:
    """p1's hold on `resource` and p2's waiting entry on it, on a fresh slot; then the hold's
    TTL lapses with no reaper. A round whose client stalled past the deadline before the
    entry was written is played again."""
    for _ in range(5):
        start = fresh_slot()
        held = await hold(client, world, start, resourceId=resource)
        deadline = parse_time(held["expiresAt"], "expiresAt")
        made = await wait(client, world, start, resourceId=resource)
        if made["state"] == "waiting":
            await until_server_ms(redis, deadline + 1)
            return made["waitlistEntryId"], start
        assert await server_ms(redis) > deadline, made  # only a lapsed hold explains it
    raise AssertionError("the client stalled past every hold's deadline")


async def test_a_pooled_create_does_not_take_a_member_a_waiting_entry_is_owed(app, client,
                                                                              world, redis):
    svc = app.state.services
    keys = svc.keyspace
    await rooms(app, client, world)
    wid, start = await lapsed_hold_with_entry(client, world, redis, "room-1")
    # first_fit would take room-1 (free since the lapse): the entry gets it first.
    r = await client.post("/v1/reservations",
                          json=create_body(start=start, resourceGroupId="rooms"),
                          headers=world.auth("p1"))
    assert r.status_code == 201 and r.json()["resourceId"] == "room-2", r.text
    got = await entry(client, world, wid)
    assert got["state"] == "fulfilled" and got["resourceId"] == "room-1"
    assert await creations_of(redis, keys, held_id(wid)) == 1
    # The handoff rode on the pooled create's reply: the entry's cap slot passes.
    await cap_passed_to_hold(redis, keys, "p2", wid)


async def test_a_multi_resource_create_does_not_take_units_a_waiting_entry_is_owed(
        app, client, world, redis):
    svc = app.state.services
    keys = svc.keyspace
    await rooms(app, client, world)
    wid, start = await lapsed_hold_with_entry(client, world, redis, "room-1")
    items = [{"resourceId": room, "slotStartTime": at(start), "slotEndTime": at(start + 30)}
             for room in ("room-2", "room-1")]
    r = await client.post("/v1/reservations",
                          json={"vendorId": "v-confirm", "requesterId": "req-1",
                                "items": items}, headers=world.auth("p1"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "SLOT_UNAVAILABLE", r.text
    assert r.json()["error"]["details"]["resourceId"] == "room-1"
    got = await entry(client, world, wid)
    assert got["state"] == "fulfilled" and got["resourceId"] == "room-1"
    # All or nothing: no unit of room-2 is held.
    shard = keys.shard_of_waitlist_id(wid)
    assert [k async for k in redis.scan_iter(match=keys.unit_root(shard) + "room-2:*")] == []
    # The handoff rode on the conflict's reply: the entry's cap slot passes.
    await cap_passed_to_hold(redis, keys, "p2", wid)


async def test_multi_resource_creates_racing_reapers_never_take_owed_units(app, client, world,
                                                                          redis):
    """p1 holds room-1 and room-2 for a slot, p2 waits for room-1 and p3 for room-2; both
    holds lapse; then three multi-resource creates of p4 over both rooms race two reapers.
    Every create is refused, each entry gets its room exactly once, over several rounds
    checked over the shard's whole history."""
    svc = app.state.services
    keys, engine = svc.keyspace, svc.reservations.engine
    await rooms(app, client, world)
    await add_partner(app, world, "p3")
    await add_partner(app, world, "p4")
    played = 0
    for _ in range(20):
        start = fresh_slot()
        held = [await hold(client, world, start, resourceId=room)
                for room in ("room-1", "room-2")]
        first_deadline = min(parse_time(h["expiresAt"], "expiresAt") for h in held)
        made = [await wait(client, world, start, who=who, resourceId=room)
                for who, room in (("p2", "room-1"), ("p3", "room-2"))]
        if any(m["state"] != "waiting" for m in made):
            assert await server_ms(redis) > first_deadline, made  # a stalled client
            continue
        await until_server_ms(redis, max(parse_time(h["expiresAt"], "expiresAt")
                                         for h in held) + 1)
        shard = keys.shard_of_waitlist_id(made[0]["waitlistEntryId"])
        items = [{"resourceId": room, "slotStartTime": at(start),
                  "slotEndTime": at(start + 30)} for room in ("room-1", "room-2")]
        results = await asyncio.gather(
            *(client.post("/v1/reservations",
                          json={"vendorId": "v-confirm", "requesterId": "req-1",
                                "items": items}, headers=world.auth("p4"))
              for _ in range(3)),
            engine.reap(shard), engine.reap(shard))
        assert [r.status_code for r in results[:3]] == [409] * 3, \
            [r.text for r in results[:3]]
        for m, (who, room) in zip(made, (("p2", "room-1"), ("p3", "room-2"))):
            got = await entry(client, world, m["waitlistEntryId"], who=who)
            assert got["state"] == "fulfilled" and got["resourceId"] == room
            assert await creations_of(redis, keys, held_id(m["waitlistEntryId"])) == 1
        await never_two_live_holds_on_a_unit(redis, keys, shard)
        played += 1
        if played == 4:
            return
    raise AssertionError("the client stalled past every hold's deadline")
