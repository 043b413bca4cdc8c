"""Multi-resource reservations (issue 16, pool) over HTTP against real Redis and Postgres:
all or nothing (one item taken: nothing held), one lifecycle (revalidation, cancel, expiry
free every item), one booking row per item under the exclusion constraint, booked markers
rehydrated for every item, bad input changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from benchmarks.verifier import verify
from engine import directory
from engine.rehydration import rehydrate
from tests.conftest import DATABASE_URL
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
from tests.test_modify import drain
from tests.test_modify import state_of as _state_of

UNIT_MS = 15 * 60_000


async def state_of(redis, prefix: str) -> dict:
    """Every key but the limiters and the partner's reputation counters (a refused create
    still counts as an attempt there, as with the rate limits)."""
    return {k: v for k, v in (await _state_of(redis, prefix)).items()
            if not k.endswith(":rep")}


def item(resource: str, start: int, minutes: int = 60) -> dict:
    return {"resourceId": resource, "slotStartTime": at(start),
            "slotEndTime": at(start + minutes)}


def multi_body(items: list[dict], vendor: str = "v-instant") -> dict:
    return {"vendorId": vendor, "requesterId": "req-1", "items": items}


ITEMS = [item("room", 60), item("table", 120), item("room", 180)]


def units(keys, resource: str, start: int, minutes: int = 60) -> list[str]:
    first = (T0_MS + start * 60_000) // UNIT_MS
    return [keys.unit(resource, i, "v-instant") for i in range(first, first + minutes // 15)]


async def setup(app) -> None:
    async with app.state.services.pool.acquire() as conn:
        for name in ("room", "table"):
            await directory.create_resource(conn, name, "v-instant")


async def test_all_items_are_held_by_one_reservation_and_cancel_frees_them(app, client, world,
                                                                          redis):
    await setup(app)
    keys = app.state.services.keyspace
    r = await client.post("/v1/reservations", json=multi_body(ITEMS), headers=world.auth("p1"))
    assert r.status_code == 201, r.text
    body = r.json()
    rid = body["reservationId"]
    assert body["items"] == ITEMS and body["resourceId"] == "room"
    got = (await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))).json()
    assert got["items"] == ITEMS and got["state"] == "AUTHORIZED_BOTH"
    held = [k for i in ITEMS for k in units(keys, i["resourceId"], _minutes(i))]
    assert [await redis.get(k) for k in held] == [rid] * len(held)
    r = await client.post(f"/v1/reservations/{rid}/cancel", headers=world.auth("p1"))
    assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
    assert [await redis.get(k) for k in held] == [None] * len(held)


def _minutes(i: dict) -> int:
    return (int(_ms(i["slotStartTime"])) - T0_MS) // 60_000


def _ms(text: str) -> int:
    from engine.times import parse_time

    return parse_time(text, "t")


async def test_one_item_taken_means_nothing_is_held(app, client, world, redis):
    await setup(app)
    svc = app.state.services
    r = await client.post("/v1/reservations",
                          json=create_body("v-instant", 195, 15, resourceId="room"),
                          headers=world.auth("p2"))
    assert r.status_code == 201
    before = await state_of(redis, svc.settings.key_prefix)
    r = await client.post("/v1/reservations", json=multi_body(ITEMS), headers=world.auth("p1"))
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] == "SLOT_UNAVAILABLE" and err["details"]["resourceId"] == "room"
    assert await state_of(redis, svc.settings.key_prefix) == before


async def test_bad_items_get_a_typed_4xx_and_change_nothing(app, client, world, redis):
    await setup(app)
    svc = app.state.services
    keys = svc.keyspace
    async with svc.pool.acquire() as conn:
        await directory.create_resource(conn, "theirs", "v-other")
        legacy = next(f"old-{n}" for n in range(1000)
                      if keys.shard_of(f"old-{n}") != keys.shard_of("v-instant"))
        await directory.create_resource(conn, legacy, "v-instant", shard_key=legacy)
    before = await state_of(redis, svc.settings.key_prefix)
    many = [item("room", 15 * n, 15) for n in range(21)]
    huge = [item("room", 15 * n, 15) for n in range(1000)]
    cases = [
        (multi_body([]), 400, "NO_ITEMS"),
        (multi_body(many), 400, "TOO_MANY_ITEMS"),
        (multi_body(huge), 413, None),
        ({**multi_body(ITEMS), "slotStartTime": at(0)}, 400, "INVALID_FIELD"),
        ({**multi_body(ITEMS), "resourceId": "room"}, 400, "INVALID_FIELD"),
        (multi_body([item("room", 60), item("theirs", 60)]), 400, "RESOURCE_VENDOR_MISMATCH"),
        (multi_body([item("room", 60), item("nowhere", 60)]), 404, "UNKNOWN_RESOURCE"),
        (multi_body([item("room", 60), item("room", 90)]), 400, "ITEMS_OVERLAP"),
        (multi_body([item("room", 60), item(legacy, 60)]), 409, "ITEMS_NOT_COLOCATED"),
        (multi_body([item("room", 60), item("table", 67)]), 400, "SLOT_NOT_ALIGNED"),
        (multi_body([item("room", 60), {"resourceId": "table"}]), 400, "MISSING_FIELD"),
        ({"vendorId": "v-instant", "requesterId": "r"}, 400, "MISSING_FIELD"),
    ]
    for payload, status, code in cases:
        r = await client.post("/v1/reservations", json=payload, headers=world.auth("p1"))
        assert r.status_code == status, (str(payload)[:120], r.text[:300])
        if code:
            assert r.json()["error"]["code"] == code, (str(payload)[:120], r.text)
    assert await state_of(redis, svc.settings.key_prefix) == before


async def test_commit_books_one_row_per_item_and_rehydration_restores_every_item(
        app, client, world, redis):
    await setup(app)
    svc = app.state.services
    keys = svc.keyspace
    r = await client.post("/v1/reservations", json=multi_body(ITEMS), headers=world.auth("p1"))
    rid = r.json()["reservationId"]
    r = await client.post(f"/v1/reservations/{rid}/commit", headers=world.auth("p1"))
    assert r.status_code == 202, r.text
    await drain(svc)
    got = (await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))).json()
    assert got["state"] == "COMMITTED"
    async with svc.pool.acquire() as conn:
        rows = await conn.fetch("SELECT id, resource_id, item, slot_start FROM bookings "
                                "WHERE reservation_id = $1 ORDER BY item", rid)
    assert [(r["resource_id"], r["item"]) for r in rows] == [("room", 0), ("table", 1),
                                                              ("room", 2)]
    assert rows[0]["id"] == got["bookingId"]
    held = [k for i in ITEMS for k in units(keys, i["resourceId"], _minutes(i))]
    assert [await redis.get(k) for k in held] == [f"B|{rid}"] * len(held)
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'SET search_path TO "{svc.settings.db_schema}"')
        report = await verify(redis, keys, conn, [])
        assert report.violations == []
        # The constraint holds for every item: another booking on the table item is refused.
        try:
            await conn.execute(
                """INSERT INTO bookings (id, reservation_id, resource_key, resource_id,
                       vendor_id, partner_id, requester_id, slot_start, slot_end,
                       block_start, block_end)
                   SELECT 'bk-x', 'rsv-x', key, id, 'v-instant', 'p1', 'r', $1, $2, $1, $2
                   FROM resources WHERE id = 'table'""",
                *(datetime.fromtimestamp((T0_MS + m * 60_000) / 1000, UTC) for m in (150, 165)))
            raise AssertionError("the exclusion constraint let an overlap in")
        except asyncpg.ExclusionViolationError:
            pass
    finally:
        await conn.close()
    # Redis loses the markers: rehydration writes every item's back.
    for k in held:
        await redis.delete(k)
    await redis.delete(keys.rehydrated())
    await rehydrate(svc.access, keys, svc.pool, svc.catalog.catalog, svc.settings)
    assert [await redis.get(k) for k in held] == [f"B|{rid}"] * len(held)


async def test_revalidation_fails_the_whole_reservation_and_moves_are_refused(app, client,
                                                                             world, redis):
    keys = app.state.services.keyspace
    async with app.state.services.pool.acquire() as conn:
        for name in ("room", "table"):  # v-confirm's: a 15-minute buffer after
            await directory.create_resource(conn, name, "v-confirm")
    r = await client.post("/v1/reservations", json=multi_body(ITEMS, "v-confirm"),
                          headers=world.auth("p1"))
    assert r.status_code == 201, r.text
    rid = r.json()["reservationId"]
    r = await client.post(f"/v1/reservations/{rid}/modify",
                          json={"slotStartTime": at(600), "slotEndTime": at(660)},
                          headers=world.auth("p1"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "MODIFY_MULTI_RESOURCE"
    held = [keys.unit(i["resourceId"], u, "v-confirm")
            for i in ITEMS for u in range((T0_MS + _minutes(i) * 60_000) // UNIT_MS,
                                          (T0_MS + (_minutes(i) + 75) * 60_000) // UNIT_MS)]
    await redis.delete(held[-1])  # the last item's buffer unit is gone (v-confirm: 15 min)
    r = await client.post(f"/v1/reservations/{rid}/vendor-confirmation",
                          headers=world.auth("vendor"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "HOLD_LOST", r.text
    assert [await redis.get(k) for k in held] == [None] * len(held)
