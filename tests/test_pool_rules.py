"""Pooled and multi-resource creates confirm the availability rules' revision (issue 16 with
issue 13), as a single create does: the rules a process caches may be older than those
another process wrote; the hold script compares the revision it was checked against with
the one published beside every resource it may take, answers RULES_STALE, and the service
checks again with fresh rules before any write. Two API processes over real Redis and
Postgres."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from api.app import create_app
from engine import directory
from engine.errors import RulesStale
from engine.pool import PoolChoice
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

ROOMS = ["room-1", "room-2", "room-3"]


async def rooms(app, client, world) -> None:
    async with app.state.services.pool.acquire() as conn:
        for name in ROOMS:
            await directory.create_resource(conn, name, "v-instant")
    r = await client.post("/v1/vendors/v-instant/resource-groups",
                          json={"groupId": "rooms", "resourceIds": ROOMS,
                                "strategy": "first_fit"}, headers=world.auth("admin"))
    assert r.status_code == 201, r.text


async def from_another_process(migrated, world, method: str, path: str, **body):
    other = create_app(migrated)
    async with other.router.lifespan_context(other):
        transport = httpx.ASGITransport(app=other, client=("10.0.0.2", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://b.test") as b:
            r = await b.request(method, path, json=body or None, headers=world.auth("admin"))
            assert r.status_code in (200, 201), r.text
            return r.json()


async def block_from_another_process(migrated, world, **block) -> dict:
    return await from_another_process(migrated, world, "POST",
                                      "/v1/vendors/v-instant/busy-blocks", **block)


def pooled(start: int) -> dict:
    return create_body("v-instant", start, 60, resourceGroupId="rooms")


def multi(start: int) -> dict:
    return {"vendorId": "v-instant", "requesterId": "req-1",
            "items": [{"resourceId": room, "slotStartTime": at(start),
                       "slotEndTime": at(start + 60)} for room in ("room-1", "room-2")]}


async def test_a_pooled_create_sees_a_busy_block_written_by_another_process(
        app, client, world, migrated):
    await rooms(app, client, world)
    r = await client.post("/v1/reservations", json=pooled(0), headers=world.auth("p1"))
    assert r.status_code == 201 and r.json()["resourceId"] == "room-1"  # rules cached now
    await block_from_another_process(migrated, world, start=at(120), end=at(180),
                                     resourceId="room-1")
    # This process's cache allows room-1; the script says the rules are stale, and the
    # fresh rules refuse room-1: the member is room-2.
    r = await client.post("/v1/reservations", json=pooled(120), headers=world.auth("p1"))
    assert r.status_code == 201 and r.json()["resourceId"] == "room-2", r.text


async def test_a_pooled_create_retried_on_fresh_rules_starts_from_every_member(
        app, client, world, migrated):
    """The cached rules refuse room-1 (a busy block); another process deletes the block:
    the script says the rules are stale, and the retry checks every member again, so
    first_fit takes room-1."""
    await rooms(app, client, world)
    r = await client.post("/v1/vendors/v-instant/busy-blocks",
                          json={"start": at(120), "end": at(180), "resourceId": "room-1"},
                          headers=world.auth("admin"))
    assert r.status_code == 201, r.text
    r2 = await client.post("/v1/reservations", json=pooled(0), headers=world.auth("p1"))
    assert r2.json()["resourceId"] == "room-1"  # this process caches the rules with the block
    await from_another_process(migrated, world, "DELETE",
                               f"/v1/vendors/v-instant/busy-blocks/{r.json()['blockId']}")
    r = await client.post("/v1/reservations", json=pooled(120), headers=world.auth("p1"))
    assert r.status_code == 201 and r.json()["resourceId"] == "room-1", r.text


async def test_a_multi_resource_create_sees_a_busy_block_written_by_another_process(
        app, client, world, migrated):
    await rooms(app, client, world)
    r = await client.post("/v1/reservations", json=multi(0), headers=world.auth("p1"))
    assert r.status_code == 201, r.text  # rules cached now
    await block_from_another_process(migrated, world, start=at(120), end=at(180),
                                     resourceId="room-2")
    r = await client.post("/v1/reservations", json=multi(120), headers=world.auth("p1"))
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "SLOT_UNAVAILABLE" and error["details"]["reasons"] == ["busy"]
    assert error["details"]["resourceId"] == "room-2"


async def test_the_scripts_refuse_a_stale_revision_and_write_nothing(app, client, world,
                                                                     redis):
    """The engine alone (no service retry): a revision other than the one published beside
    the members or the items is RULES_STALE, and nothing is written."""
    svc = app.state.services
    await rooms(app, client, world)
    r = await client.post("/v1/reservations", json=pooled(0), headers=world.auth("p1"))
    assert r.status_code == 201
    engine, settings = svc.reservations.engine, svc.settings
    members = [await svc.reservations.catalog.resource(room) for room in ROOMS]
    start, end = T0_MS + 240 * 60_000, T0_MS + 300 * 60_000
    units = []
    for m in members:
        first, last = m.units(start, end, settings.max_hold_units)
        units.append((m, first, last, *m.unit_span_ms(first, last)))
    base = engine.placement(partner_id="p1", vendor=engine.catalog.vendor("v-instant"),
                            resource=members[0], start_ms=start, end_ms=end,
                            requester_id="req-1", metadata_text="{}", idempotency_key="",
                            triggered_by="partner")
    placements = [
        dataclasses.replace(base, pool=PoolChoice("rooms", False, tuple(units))),
        dataclasses.replace(base, items=tuple((m.id, start, end, *rest)
                                              for m, *rest in units[:2])),
    ]
    published = await redis.get(svc.keyspace.availability_revision("room-1", "v-instant")) \
        or "0"

    def state(snap: dict) -> dict:  # the cap's bookkeeping is queued apart
        return {k: v for k, v in snap.items() if not k.endswith((":holds", ":rep", ":rate"))}
    before = state(await snapshot(redis, settings.key_prefix))
    for placement in placements:
        with pytest.raises(RulesStale):
            await engine.place(dataclasses.replace(placement,
                                                   rules_revision=f"{published}9"))
    assert state(await snapshot(redis, settings.key_prefix)) == before
    # The revision published passes: the same placements land.
    moved = await engine.place(dataclasses.replace(placements[0], rules_revision=published))
    assert moved.resource_id == "room-1"
