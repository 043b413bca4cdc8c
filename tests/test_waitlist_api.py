"""Waitlist handoff (issue 16) over HTTP against real Redis and Postgres: entries wait, are
handed the slot by the very script that frees it (cancel here; expiry by the reaper in
tests/test_waitlist_expiry.py), FIFO per slot, count against the partner's cap, expire, can
be withdrawn; bad input gets a typed 4xx and changes nothing."""

from __future__ import annotations

import pytest

from engine.settings import Settings
from jobs.commit_queue import CommitQueue
from tests.conftest import snapshot
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    app,
    at,
    client,
    create_body,
    migrated,
    world,
)
from tests.timing import eventually, until_server_ms

SLOT = 0  # minutes after T0 (2030-01-01 09:00Z), on v-confirm's 15-minute grid


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.replace(partner_rate_burst=2_000, ip_rate_burst=4_000,
                            partner_rate_per_minute=600_000, ip_rate_per_minute=1_200_000)


async def state_of(redis, prefix: str) -> dict:
    return {k: v for k, v in (await snapshot(redis, prefix)).items()
            if not k.endswith(":rate")}


def entry_body(start: int = SLOT, minutes: int = 30, ttl_ms: int = 600_000, **extra) -> dict:
    """An entry on v-confirm's default resource (``resourceId`` or ``resourceGroupId`` is
    required: an entry names what it waits for)."""
    place = {} if "resourceGroupId" in extra else {"resourceId": "v-confirm"}
    return {**create_body(start=start, minutes=minutes), **place, "ttlMs": ttl_ms, **extra}


async def hold(client, world, who="p1", start=SLOT, minutes=30) -> str:
    r = await client.post("/v1/reservations", json=create_body(start=start, minutes=minutes),
                          headers=world.auth(who))
    assert r.status_code == 201, r.text
    return r.json()["reservationId"]


async def wait_for(client, world, who="p2", **body) -> dict:
    r = await client.post("/v1/waitlist", json=entry_body(**body), headers=world.auth(who))
    assert r.status_code == 201, r.text
    return r.json()


async def entry(client, world, entry_id: str, who="p2") -> dict:
    r = await client.get(f"/v1/waitlist/{entry_id}", headers=world.auth(who))
    assert r.status_code == 200, r.text
    return r.json()


async def test_a_cancel_hands_the_slot_to_the_waiting_partner(app, client, world, redis):
    svc = app.state.services
    keys = svc.keyspace
    rid = await hold(client, world)
    waiting = await wait_for(client, world)
    assert waiting["state"] == "waiting" and waiting["reservationId"] is None
    wid = waiting["waitlistEntryId"]
    assert (await entry(client, world, wid)) == waiting
    # The entry holds a slot of p2's cap, scored by its expiry.
    assert await redis.zscore(keys.partner_holds("p2"), wid) is not None

    r = await client.post(f"/v1/reservations/{rid}/cancel", headers=world.auth("p1"))
    assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
    done = await entry(client, world, wid)
    assert done["state"] == "fulfilled"
    new = done["reservationId"]
    assert new == "rsv" + wid.removeprefix("wl")
    got = await client.get(f"/v1/reservations/{new}", headers=world.auth("p2"))
    assert got.status_code == 200, got.text
    held = got.json()
    assert held["state"] == "AWAITING_VENDOR_CONFIRMATION"
    assert (held["slotStartTime"], held["slotEndTime"]) == (at(SLOT), at(SLOT + 30))
    assert held["metadata"]["origin"] == "waitlist"
    assert held["metadata"]["waitlistEntryId"] == wid
    assert held["stateHistory"][0]["triggeredBy"] == "system"
    # The record and the creation event say where it came from; the units are p2's hold's.
    assert await redis.hget(keys.reservation(new), "og") == "waitlist"
    shard = keys.shard_of_id(new)
    created = [e for _, e in await redis.xrange(keys.events(shard))
               if e["reservationId"] == new]
    assert len(created) == 1 and created[0]["origin"] == "waitlist"
    assert created[0]["partnerId"] == "p2" and created[0]["waitlistEntryId"] == wid
    first = keys.unit("v-confirm", (1_893_488_400_000 + SLOT * 60_000) // 900_000)
    assert await redis.get(first) == new
    # Its cap slot passed from the entry to the hold.

    async def cap_passed() -> bool:
        return (await redis.zscore(keys.partner_holds("p2"), wid) is None
                and await redis.zscore(keys.partner_holds("p2"), new) is not None)

    await eventually(cap_passed, what="the entry's cap slot passed to its hold")
    # Nobody else gets the slot now.
    r = await client.post("/v1/reservations", json=create_body(start=SLOT),
                          headers=world.auth("p1"))
    assert r.status_code == 409


async def test_fifo_per_slot(app, client, world, redis):
    from tests.test_transfer_api import add_partner

    await add_partner(app, world, "p3")
    rid = await hold(client, world)
    first = (await wait_for(client, world, who="p2"))["waitlistEntryId"]
    second = (await wait_for(client, world, who="p3"))["waitlistEntryId"]
    # An entry for another slot of the resource is not touched by this one.
    elsewhere = await hold(client, world, start=240)
    other = (await wait_for(client, world, who="p3", start=240))["waitlistEntryId"]
    await client.post(f"/v1/reservations/{rid}/cancel", headers=world.auth("p1"))
    assert (await entry(client, world, first))["state"] == "fulfilled"
    assert (await entry(client, world, second, who="p3"))["state"] == "waiting"
    assert (await entry(client, world, other, who="p3"))["state"] == "waiting"
    # The first one's hold ends: the second gets it.
    given = (await entry(client, world, first))["reservationId"]
    r = await client.post(f"/v1/reservations/{given}/cancel", headers=world.auth("p2"))
    assert r.status_code == 200, r.text
    assert (await entry(client, world, second, who="p3"))["state"] == "fulfilled"
    assert (await entry(client, world, other, who="p3"))["state"] == "waiting"
    await client.post(f"/v1/reservations/{elsewhere}/cancel", headers=world.auth("p1"))
    assert (await entry(client, world, other, who="p3"))["state"] == "fulfilled"


async def test_an_entry_is_served_only_when_its_whole_slot_is_free(app, client, world):
    a = await hold(client, world, start=SLOT, minutes=15)
    b = await hold(client, world, start=SLOT + 30, minutes=15)  # v-confirm: 15-min buffer
    wid = (await wait_for(client, world, start=SLOT, minutes=45))["waitlistEntryId"]
    await client.post(f"/v1/reservations/{a}/cancel", headers=world.auth("p1"))
    assert (await entry(client, world, wid))["state"] == "waiting"
    await client.post(f"/v1/reservations/{b}/cancel", headers=world.auth("p1"))
    assert (await entry(client, world, wid))["state"] == "fulfilled"


async def test_a_free_slot_is_handed_over_at_once(app, client, world, redis):
    made = await wait_for(client, world, start=600)
    assert made["state"] == "fulfilled"
    assert made["reservationId"] == "rsv" + made["waitlistEntryId"].removeprefix("wl")


async def test_withdraw(app, client, world, redis):
    svc = app.state.services
    keys = svc.keyspace
    rid = await hold(client, world)
    wid = (await wait_for(client, world))["waitlistEntryId"]
    # Another partner cannot see or withdraw it; a vendor may read but not withdraw.
    assert (await client.delete(f"/v1/waitlist/{wid}",
                                headers=world.auth("p1"))).status_code == 404
    assert (await client.get(f"/v1/waitlist/{wid}",
                             headers=world.auth("p1"))).status_code == 404
    assert (await client.get(f"/v1/waitlist/{wid}",
                             headers=world.auth("vendor"))).status_code == 200
    assert (await client.get(f"/v1/waitlist/{wid}",
                             headers=world.auth("vendor-other"))).status_code == 404
    assert (await client.delete(f"/v1/waitlist/{wid}",
                                headers=world.auth("vendor"))).status_code == 403
    r = await client.delete(f"/v1/waitlist/{wid}", headers=world.auth("p2"))
    assert r.status_code == 200 and r.json()["state"] == "withdrawn"
    assert (await entry(client, world, wid))["state"] == "withdrawn"

    async def cap_released() -> bool:
        return await redis.zscore(keys.partner_holds("p2"), wid) is None

    await eventually(cap_released, what="the withdrawn entry's cap slot released")
    before = await state_of(redis, svc.settings.key_prefix)
    r = await client.delete(f"/v1/waitlist/{wid}", headers=world.auth("p2"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "WAITLIST_ENTRY_NOT_WAITING"
    assert await state_of(redis, svc.settings.key_prefix) == before
    # A withdrawn entry is not served.
    await client.post(f"/v1/reservations/{rid}/cancel", headers=world.auth("p1"))
    assert (await entry(client, world, wid))["state"] == "withdrawn"
    assert await redis.exists(keys.reservation("rsv" + wid.removeprefix("wl"))) == 0
    # Ops may withdraw any partner's entry.
    other = (await wait_for(client, world, start=SLOT + 600))["waitlistEntryId"]
    await hold(client, world, start=SLOT + 1200)
    third = (await wait_for(client, world, start=SLOT + 1200))["waitlistEntryId"]
    assert other != third
    r = await client.delete(f"/v1/waitlist/{third}", headers=world.auth("ops"))
    assert r.status_code == 200 and r.json()["state"] == "withdrawn"


async def test_entries_expire(app, client, world, redis):
    svc = app.state.services
    keys = svc.keyspace
    rid = await hold(client, world)
    made = await wait_for(client, world, ttl_ms=1_000)
    wid = made["waitlistEntryId"]
    stored = int(await redis.hget(keys.waitlist_entry(wid), "x"))
    from engine.times import parse_time
    assert parse_time(made["expiresAt"], "expiresAt") == stored
    # The cap slot leaves with the entry (plus the margin between the two scripts).
    score = await redis.zscore(keys.partner_holds("p2"), wid)
    assert stored <= score <= stored + 2_000 + 1_000
    await until_server_ms(redis, stored + 1)
    assert (await entry(client, world, wid))["state"] == "expired"
    await client.post(f"/v1/reservations/{rid}/cancel", headers=world.auth("p1"))
    assert (await entry(client, world, wid))["state"] == "expired"
    assert await redis.exists(keys.reservation("rsv" + wid.removeprefix("wl"))) == 0
    r = await client.delete(f"/v1/waitlist/{wid}", headers=world.auth("p2"))
    assert r.status_code == 409 and r.json()["error"]["details"]["state"] == "expired"


async def test_an_entry_never_waits_past_the_slot_start(app, client, world, redis):
    await hold(client, world)
    made = await wait_for(client, world, ttl_ms=7 * 86_400_000)
    # T0 is years away, so the ttl bounds it here; the clamp is the script's min().
    from engine.times import parse_time
    created = parse_time(made["createdAt"], "createdAt")
    assert parse_time(made["expiresAt"], "expiresAt") == created + 7 * 86_400_000


async def test_entries_count_against_the_partner_cap(app, client, world, redis):
    svc = app.state.services
    tuned = svc.settings.replace(partner_max_live_holds=1)
    svc.reservations.limits.settings = tuned
    svc.waitlist.engine.settings = tuned
    await hold(client, world)
    await wait_for(client, world)  # p2's one live hold is this entry
    before = await state_of(redis, svc.settings.key_prefix)
    r = await client.post("/v1/reservations", json=create_body(start=600),
                          headers=world.auth("p2"))
    assert r.status_code == 429 and r.json()["error"]["code"] == "HOLD_CAP_EXCEEDED"
    r = await client.post("/v1/waitlist", json=entry_body(start=SLOT),
                          headers=world.auth("p2"))
    assert r.status_code == 429 and r.json()["error"]["code"] == "HOLD_CAP_EXCEEDED"

    async def unchanged() -> bool:  # the refused create's cap slot is given back (queued)
        return await state_of(redis, svc.settings.key_prefix) == before

    await eventually(unchanged, what="nothing changed by the refusals")


async def test_bad_input_is_typed_and_changes_nothing(app, client, world, redis):
    svc = app.state.services
    await hold(client, world)
    cases = [
        ("p2", entry_body(start=-4_000_005), 400, "SLOT_IN_PAST"),
        ("p2", entry_body(resourceId="v-confirm-room2", vendorId="v-other"), 400,
         "RESOURCE_VENDOR_MISMATCH"),
        ("p2", entry_body(ttl_ms=10), 400, "INVALID_FIELD"),
        ("p2", entry_body(ttl_ms=8 * 86_400_000), 400, "INVALID_FIELD"),
        ("p2", entry_body(start=7), 400, "SLOT_NOT_ALIGNED"),
        ("p2", {**entry_body(), "slotEndTime": at(SLOT - 15)}, 400, None),
        ("p2", entry_body(vendorId="nope"), 404, "UNKNOWN_VENDOR"),
        ("p2", entry_body(resourceId="nope"), 404, None),
        ("p2", entry_body(vendorId="v-paid", resourceId="v-paid"), 409,
         "PAYMENT_PROVIDER_UNAVAILABLE"),
        # Entries on groups: tests/test_waitlist_group.py.
        ("p2", entry_body(resourceGroupId="rooms"), 404, "UNKNOWN_RESOURCE_GROUP"),
        ("p2", entry_body(resourceGroupId="rooms", resourceId="v-confirm"), 400,
         "INVALID_FIELD"),
        ("p2", {k: v for k, v in entry_body().items() if k != "resourceId"}, 400,
         "MISSING_FIELD"),
        ("p2", {**entry_body(), "requesterId": "   "}, 400, None),
        ("p2", {**entry_body(), "unknown": 1}, 400, "UNKNOWN_FIELD"),
        ("p2", {k: v for k, v in entry_body().items() if k != "ttlMs"}, 400, None),
        ("vendor", entry_body(), 403, "FORBIDDEN"),
        ("ops", entry_body(), 403, "FORBIDDEN"),
    ]
    before = await state_of(redis, svc.settings.key_prefix)
    for who, body, status, code in cases:
        r = await client.post("/v1/waitlist", json=body, headers=world.auth(who))
        assert r.status_code == status, (body, r.text)
        if code is not None:
            assert r.json()["error"]["code"] == code, r.text
    for path in ("/v1/waitlist/nope", "/v1/waitlist/wl_0_01M8KW92PQSRB9MDVEKHK2W13C",
                 "/v1/waitlist/wl_99_01M8KW92PQSRB9MDVEKHK2W13C"):
        assert (await client.get(path, headers=world.auth("p2"))).status_code == 404
        assert (await client.delete(path, headers=world.auth("p2"))).status_code == 404
    assert await state_of(redis, svc.settings.key_prefix) == before


async def test_the_worker_records_the_handed_over_hold(app, client, world, redis):
    svc = app.state.services
    rid = await hold(client, world)
    wid = (await wait_for(client, world))["waitlistEntryId"]
    await client.post(f"/v1/reservations/{rid}/cancel", headers=world.auth("p1"))
    new = (await entry(client, world, wid))["reservationId"]
    queue = CommitQueue(svc.access, svc.keyspace, svc.pool, svc.reservations.engine,
                        svc.settings.replace(drain_block_ms=50), "t")
    await queue.ensure_groups()
    try:
        for _ in range(3):
            for shard in range(svc.keyspace.shards):
                await queue.drain_shard_once(shard)
    finally:
        await queue.close()
    async with svc.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT partner_id, state, metadata FROM reservations WHERE id = $1", new)
        first = await conn.fetchrow(
            "SELECT triggered_by, reason FROM reservation_history WHERE event_id = $1",
            f"{new}:1")
    import orjson
    meta = row["metadata"] if isinstance(row["metadata"], dict) \
        else orjson.loads(row["metadata"])
    assert row["partner_id"] == "p2" and row["state"] == "AWAITING_VENDOR_CONFIRMATION"
    assert meta["origin"] == "waitlist" and meta["waitlistEntryId"] == wid
    assert (first["triggered_by"], first["reason"]) == ("system", "waitlist")


async def test_a_move_hands_the_old_slot_over(app, client, world, redis):
    rid = await hold(client, world)
    wid = (await wait_for(client, world))["waitlistEntryId"]
    r = await client.post(f"/v1/reservations/{rid}/modify",
                          json={"slotStartTime": at(SLOT + 240), "slotEndTime": at(SLOT + 270)},
                          headers=world.auth("p1"))
    assert r.status_code == 200, r.text
    assert (await entry(client, world, wid))["state"] == "fulfilled"
    # A move onto the slot a waiting entry wants is refused: the entry got it first.
    r = await client.post(f"/v1/reservations/{rid}/modify",
                          json={"slotStartTime": at(SLOT), "slotEndTime": at(SLOT + 30)},
                          headers=world.auth("p1"))
    assert r.status_code == 409
