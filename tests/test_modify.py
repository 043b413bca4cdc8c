"""Modify / move (issue 16) over HTTP against real Redis and Postgres: the move frees the old
units and takes the new ones until the unchanged deadline, a conflict or bad input changes
nothing (every key compared), If-Match, lifecycle limits, shards, and the worker's rows."""

from __future__ import annotations

import asyncio

import orjson

from engine import directory
from engine.lifecycle import BOOKED_PREFIX
from jobs.commit_queue import CommitQueue
from tests.conftest import snapshot
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    T0_MS,
    api_settings,
    app,
    at,
    client,
    create_body,
    migrated,
    world,
)

UNIT_MS = 15 * 60_000


def move_body(start: int, minutes: int = 30, **extra) -> dict:
    return {"slotStartTime": at(start), "slotEndTime": at(start + minutes), **extra}


async def state_of(redis, prefix: str) -> dict:
    """Every key under the prefix (value and whether it expires), limiter counters left out:
    a refused request is still counted by the rate limits, and changes nothing else."""
    return {k: v for k, v in (await snapshot(redis, prefix)).items()
            if not k.endswith(":rate")}


def units_of(keys, resource: str, start_min: int, end_min: int) -> list[str]:
    """The unit keys of [start, end) minutes after T0 on a 15-minute grid."""
    first = (T0_MS + start_min * 60_000) // UNIT_MS
    last = (T0_MS + end_min * 60_000) // UNIT_MS - 1
    return [keys.unit(resource, i) for i in range(first, last + 1)]


async def create(client, world, who="p1", **kw) -> dict:
    r = await client.post("/v1/reservations", json=create_body(**kw), headers=world.auth(who))
    assert r.status_code == 201, r.text
    r = await client.get(f"/v1/reservations/{r.json()['reservationId']}",
                         headers=world.auth(who))
    return r.json()


def resource_named(keys, base: str, same_shard_as: str, same: bool) -> str:
    """The first name base-N whose shard is (or is not) the shard of ``same_shard_as``."""
    target = keys.shard_of(same_shard_as)
    for n in range(1000):
        name = f"{base}-{n}"
        if (keys.shard_of(name) == target) == same:
            return name
    raise AssertionError("no such name")


async def test_modify_moves_the_hold_and_frees_the_old_units(app, client, world, redis):
    svc = app.state.services
    keys = svc.keyspace
    created = await create(client, world)  # v-confirm: 15-minute buffer after
    rid = created["reservationId"]
    old_units = units_of(keys, "v-confirm", 0, 45)
    assert all([await redis.get(k) == rid for k in old_units])

    r = await client.post(f"/v1/reservations/{rid}/modify", json=move_body(120),
                          headers=world.auth("p1"))
    assert r.status_code == 200, r.text
    moved = r.json()
    assert moved["reservationId"] == rid
    assert moved["version"] == created["version"] + 1
    assert moved["state"] == created["state"]
    assert moved["slotStartTime"] == at(120) and moved["slotEndTime"] == at(150)
    assert moved["expiresAt"] == created["expiresAt"]  # the deadline does not move
    last = moved["stateHistory"][-1]
    assert last["fromState"] == last["toState"] == created["state"]
    assert last["reason"] == "modified" and last["version"] == moved["version"]

    deadline = int(await redis.hget(keys.reservation(rid), "dl"))
    assert [await redis.get(k) for k in old_units] == [None] * len(old_units)
    new_units = units_of(keys, "v-confirm", 120, 165)  # buffer included
    for key in new_units:
        assert await redis.get(key) == rid
        assert await redis.execute_command("PEXPIRETIME", key) == deadline
    assert await redis.get(units_of(keys, "v-confirm", 165, 180)[0]) is None
    # One commit-queue entry carries the old and the new place.
    shard = keys.shard_of_id(rid)
    _, entry = (await redis.xrange(keys.events(shard)))[-1]
    assert entry["reason"] == "modified" and entry["fromState"] == entry["toState"]
    assert entry["movedFromSlotStart"] == str(T0_MS)
    assert entry["movedToSlotStart"] == str(T0_MS + 120 * 60_000)
    assert entry["movedToBlockEnd"] == str(T0_MS + 165 * 60_000)

    # The old slot is free for anyone; a move may overlap its own units.
    await create(client, world, who="p2")
    r = await client.post(f"/v1/reservations/{rid}/modify", json=move_body(135, 45),
                          headers=world.auth("p1"))
    assert r.status_code == 200, r.text
    assert r.json()["version"] == moved["version"] + 1
    assert [await redis.get(k) for k in units_of(keys, "v-confirm", 135, 195)] == \
        [rid] * 4
    assert await redis.get(units_of(keys, "v-confirm", 120, 135)[0]) is None
    # Ops may move it too (recorded as ops).
    r = await client.post(f"/v1/reservations/{rid}/modify", json=move_body(240),
                          headers=world.auth("ops"))
    assert r.status_code == 200, r.text
    assert r.json()["stateHistory"][-1]["triggeredBy"] == "ops"


async def test_a_conflict_leaves_every_key_unchanged(app, client, world, redis):
    prefix = app.state.services.settings.key_prefix
    mine = await create(client, world)
    await create(client, world, who="p2", start=120)
    before = await state_of(redis, prefix)
    for start in (120, 105, 135):  # onto the other hold, partly, its buffer
        r = await client.post(f"/v1/reservations/{mine['reservationId']}/modify",
                              json=move_body(start), headers=world.auth("p1"))
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "SLOT_UNAVAILABLE"
        assert "conflictingReservationId" not in err["details"]
    assert await state_of(redis, prefix) == before
    r = await client.get(f"/v1/reservations/{mine['reservationId']}", headers=world.auth("p1"))
    assert r.json()["version"] == mine["version"] and r.json()["slotStartTime"] == at(0)


async def test_bad_input_changes_nothing(app, client, world, redis):
    prefix = app.state.services.settings.key_prefix
    async with app.state.services.pool.acquire() as conn:
        await directory.create_resource(conn, "other-room", "v-other")
    mine = await create(client, world)
    rid = mine["reservationId"]
    before = await state_of(redis, prefix)
    url = f"/v1/reservations/{rid}/modify"
    cases = [
        ("p1", move_body(7), 400, "SLOT_NOT_ALIGNED"),
        ("p1", {"slotStartTime": at(60), "slotEndTime": at(60)}, 400, None),
        ("p1", {"slotStartTime": at(60), "slotEndTime": at(30)}, 400, None),
        ("p1", {"slotStartTime": at(60)}, 400, None),
        ("p1", move_body(60, extra=1), 400, "UNKNOWN_FIELD"),
        ("p1", move_body(60, resourceId=7), 400, None),
        ("p1", move_body(60, 60 * 24 * 30), 400, "SLOT_TOO_LONG"),
        # Issue 13: a slot in the past is refused by the availability rules, with the reason.
        ("p1", {"slotStartTime": "2020-01-01T09:00:00Z", "slotEndTime": "2020-01-01T10:00:00Z"},
         409, "SLOT_UNAVAILABLE"),
        ("p1", move_body(60, resourceId="other-room"), 400, "RESOURCE_VENDOR_MISMATCH"),
        ("p1", move_body(60, resourceId="no-such-room"), 404, "UNKNOWN_RESOURCE"),
        ("p2", move_body(60), 404, "NOT_FOUND"),  # another tenant's reservation
        ("vendor", move_body(60), 403, "FORBIDDEN"),
    ]
    for who, body, status, code in cases:
        r = await client.post(url, json=body, headers=world.auth(who))
        assert r.status_code == status, (body, r.text)
        if code is not None:
            assert r.json()["error"]["code"] == code, (body, r.text)
    for bad_id in ("rsv_0_01ARZ3NDEKTSV4RRFFQ69G5FAV", "nope"):
        r = await client.post(f"/v1/reservations/{bad_id}/modify", json=move_body(60),
                              headers=world.auth("p1"))
        assert r.status_code == 404
    r = await client.post(url, content=b"{not json", headers={
        **world.auth("p1"), "content-type": "application/json"})
    assert r.status_code == 400
    assert await state_of(redis, prefix) == before


async def test_if_match_is_honoured(app, client, world, redis):
    prefix = app.state.services.settings.key_prefix
    mine = await create(client, world)
    rid, version = mine["reservationId"], mine["version"]
    before = await state_of(redis, prefix)
    for header, status, code in ((str(version + 1), 412, "VERSION_MISMATCH"),
                                 ("abc", 400, "INVALID_IF_MATCH")):
        r = await client.post(f"/v1/reservations/{rid}/modify", json=move_body(60),
                              headers={**world.auth("p1"), "If-Match": header})
        assert r.status_code == status and r.json()["error"]["code"] == code
    assert await state_of(redis, prefix) == before
    r = await client.post(f"/v1/reservations/{rid}/modify", json=move_body(60),
                          headers={**world.auth("p1"), "If-Match": f'"{version}"'})
    assert r.status_code == 200 and r.json()["version"] == version + 1
    # The old version no longer matches: a stale writer cannot move it back.
    r = await client.post(f"/v1/reservations/{rid}/modify", json=move_body(0),
                          headers={**world.auth("p1"), "If-Match": str(version)})
    assert r.status_code == 412


async def test_only_pre_commit_live_states_move(app, client, world, redis):
    prefix = app.state.services.settings.key_prefix
    instant = await create(client, world, vendor="v-instant")
    rid = instant["reservationId"]
    r = await client.post(f"/v1/reservations/{rid}/commit", headers=world.auth("p1"))
    assert r.status_code == 202
    before = await state_of(redis, prefix)
    r = await client.post(f"/v1/reservations/{rid}/modify", json=move_body(60),
                          headers=world.auth("p1"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "INVALID_TRANSITION"
    assert r.json()["error"]["details"]["state"] == "COMMIT_IN_PROGRESS"
    assert await state_of(redis, prefix) == before

    cancelled = await create(client, world, start=300)
    await client.post(f"/v1/reservations/{cancelled['reservationId']}/cancel",
                      headers=world.auth("p1"))
    r = await client.post(f"/v1/reservations/{cancelled['reservationId']}/modify",
                          json=move_body(60), headers=world.auth("p1"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "RESERVATION_TERMINAL"


async def test_moves_to_another_resource_only_under_the_same_hash_tag(app, client, world,
                                                                      redis):
    svc = app.state.services
    keys, prefix = svc.keyspace, svc.settings.key_prefix
    same = resource_named(keys, "room", "v-confirm", same=True)
    other = resource_named(keys, "room", "v-confirm", same=False)
    async with svc.pool.acquire() as conn:
        # `other` as a resource created before migration 0011 (its own id is its shard
        # key); `same` as a new one (its vendor's id), whose own name hashes alike too.
        await directory.create_resource(conn, same, "v-confirm")
        await directory.create_resource(conn, other, "v-confirm", shard_key=other)
    mine = await create(client, world)
    rid = mine["reservationId"]
    before = await state_of(redis, prefix)
    r = await client.post(f"/v1/reservations/{rid}/modify",
                          json=move_body(0, resourceId=other), headers=world.auth("p1"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "MODIFY_CROSS_SHARD"
    assert await state_of(redis, prefix) == before

    r = await client.post(f"/v1/reservations/{rid}/modify",
                          json=move_body(0, resourceId=same), headers=world.auth("p1"))
    assert r.status_code == 200, r.text
    assert r.json()["resourceId"] == same and r.json()["version"] == mine["version"] + 1
    assert [await redis.get(k) for k in units_of(keys, "v-confirm", 0, 45)] == [None] * 3
    assert [await redis.get(k) for k in units_of(keys, same, 0, 45)] == [rid] * 3
    # Without resourceId the move stays on the resource it is on now.
    r = await client.post(f"/v1/reservations/{rid}/modify", json=move_body(60),
                          headers=world.auth("p1"))
    assert r.status_code == 200 and r.json()["resourceId"] == same


async def drain(svc) -> None:
    queue = CommitQueue(svc.access, svc.keyspace, svc.pool, svc.reservations.engine,
                        svc.settings.replace(drain_block_ms=50), "t")
    await queue.ensure_groups()
    try:
        for _ in range(3):
            for shard in range(svc.keyspace.shards):
                await queue.drain_shard_once(shard)
    finally:
        await queue.close()


async def test_the_worker_records_the_move_and_books_the_new_slot(app, client, world, redis):
    svc = app.state.services
    keys = svc.keyspace
    # One reservation drained before its move (the snapshot path), one all in one batch.
    early = await create(client, world, vendor="v-instant")
    await drain(svc)
    late = await create(client, world, vendor="v-instant", start=600)
    moves = {early["reservationId"]: 120, late["reservationId"]: 720}
    for rid, start in moves.items():
        r = await client.post(f"/v1/reservations/{rid}/modify", json=move_body(start),
                              headers=world.auth("p1"))
        assert r.status_code == 200, r.text
        r = await client.post(f"/v1/reservations/{rid}/commit", headers=world.auth("p1"))
        assert r.status_code == 202, r.text
    await drain(svc)

    async with svc.pool.acquire() as conn:
        for rid, start in moves.items():
            old_start = 0 if rid == early["reservationId"] else 600
            r = await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))
            assert r.json()["state"] == "COMMITTED", r.text
            booking = await conn.fetchrow(
                "SELECT resource_id, slot_start, slot_end FROM bookings "
                "WHERE reservation_id = $1", rid)
            assert booking["slot_start"].timestamp() * 1000 == T0_MS + start * 60_000
            assert booking["slot_end"].timestamp() * 1000 == T0_MS + (start + 30) * 60_000
            snap = await conn.fetchrow("SELECT slot_start, block_end, state FROM reservations "
                                       "WHERE id = $1", rid)
            assert snap["slot_start"].timestamp() * 1000 == T0_MS + start * 60_000
            assert snap["block_end"].timestamp() * 1000 == T0_MS + (start + 30) * 60_000
            history = await conn.fetchrow(
                "SELECT from_state, to_state, version FROM reservation_history "
                "WHERE reservation_id = $1 AND reason = 'modified'", rid)
            assert history["from_state"] == history["to_state"] == "AUTHORIZED_BOTH"
            audit = await conn.fetchrow(
                "SELECT action, metadata FROM audit_log WHERE event_id = $1",
                f"{rid}:{history['version']}")
            assert audit["action"] == "reservation.authorized_both"
            meta = audit["metadata"]
            meta = orjson.loads(meta) if isinstance(meta, str) else meta
            assert meta["reason"] == "modified"
            assert meta["fromState"] == meta["toState"]
            assert meta["modification"]["from"]["slotStart"] == T0_MS + old_start * 60_000
            assert meta["modification"]["to"]["slotStart"] == T0_MS + start * 60_000
            assert meta["modification"]["to"]["resourceId"] == "v-instant"
            # Booked markers sit on the new slot only.
            assert [await redis.get(k) for k in units_of(keys, "v-instant", start,
                                                         start + 30)] == \
                [BOOKED_PREFIX + rid] * 2
            assert [await redis.get(k) for k in units_of(keys, "v-instant", old_start,
                                                         old_start + 30)] == [None] * 2


async def test_an_overdue_hold_is_expired_not_moved(app, client, world, redis):
    svc = app.state.services
    keys = svc.keyspace
    svc.reservations.engine.settings = svc.settings.replace(authorized_ttl_ms=200)
    try:
        mine = await create(client, world, vendor="v-instant")
    finally:
        svc.reservations.engine.settings = svc.settings
    rid = mine["reservationId"]
    deadline = int(await redis.hget(keys.reservation(rid), "dl"))

    async def redis_ms() -> int:
        seconds, micros = await redis.time()
        return seconds * 1000 + micros // 1000

    for _ in range(400):  # Redis' clock is the scripts' clock: wait until it passed
        if await redis_ms() > deadline:
            break
        await asyncio.sleep(0.05)
    r = await client.post(f"/v1/reservations/{rid}/modify", json=move_body(120),
                          headers=world.auth("p1"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "RESERVATION_EXPIRED"
    record = await redis.hgetall(keys.reservation(rid))
    assert record["st"] == "EXPIRED" and record["s"] == str(T0_MS)
    assert [await redis.get(k) for k in units_of(keys, "v-instant", 0, 30)] == [None] * 2
    assert [await redis.get(k) for k in units_of(keys, "v-instant", 120, 150)] == [None] * 2
