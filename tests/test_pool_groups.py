"""Resource groups and pooled holds (issue 16, pool) over HTTP against real Redis and
Postgres: the group CRUD and its bad input (nothing changed), each strategy's choice, the
chosen resource in the response and the event, POOL_FULL only when every member is taken,
group availability, and the shard key that puts a vendor's resources under one tag."""

from __future__ import annotations

from engine import directory
from engine.pool import rekey_vendor
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

ROOMS = [f"room-{n}" for n in range(1, 6)]


async def state_of(redis, prefix: str) -> dict:
    return {k: v for k, v in (await snapshot(redis, prefix)).items()
            if not k.endswith(":rate")}


async def group_rows(pool) -> tuple:
    async with pool.acquire() as conn:
        return (await conn.fetch("SELECT * FROM resource_groups ORDER BY group_id"),
                await conn.fetch("SELECT * FROM resource_group_members "
                                 "ORDER BY group_id, position"))


async def add_rooms(app, vendor: str = "v-instant", names=ROOMS) -> None:
    async with app.state.services.pool.acquire() as conn:
        for name in names:
            await directory.create_resource(conn, name, vendor)


async def make_group(client, world, strategy: str = "first_fit", who: str = "admin",
                     vendor: str = "v-instant", **extra) -> dict:
    r = await client.post(f"/v1/vendors/{vendor}/resource-groups",
                          json={"groupId": "double", "resourceIds": ROOMS,
                                "strategy": strategy, **extra}, headers=world.auth(who))
    assert r.status_code == 201, r.text
    return r.json()


def pooled(start: int = 0, minutes: int = 60, **extra) -> dict:
    body = create_body("v-instant", start, minutes, resourceGroupId="double", **extra)
    return body


async def hold(client, world, start=0, minutes=60, **extra):
    return await client.post("/v1/reservations", json=pooled(start, minutes, **extra),
                             headers=world.auth("p1"))


async def test_new_resources_share_their_vendors_shard_and_older_ones_keep_theirs(app, world):
    keys = app.state.services.keyspace
    async with app.state.services.pool.acquire() as conn:
        new = await directory.create_resource(conn, "suite-9", "v-confirm")
        legacy = await directory.create_resource(conn, "suite-8", "v-confirm",
                                                 shard_key="suite-8")
        default = await directory.get_resource(conn, "v-confirm")
    assert new.shard_key == "v-confirm" and default.shard_key == "v-confirm"
    assert legacy.shard_key == "suite-8"
    assert new.to_engine().shard_name == "v-confirm"
    assert keys.unit("suite-9", 7, "v-confirm").startswith(keys.unit_root(
        keys.shard_of("v-confirm")))


async def test_group_crud_by_the_vendor_and_admin(app, client, world):
    await add_rooms(app, "v-confirm")
    url = "/v1/vendors/v-confirm/resource-groups"
    r = await client.post(url, json={"groupId": "double", "resourceIds": ROOMS,
                                     "strategy": "preferred",
                                     "preferredOrder": ["room-3", "room-1"]},
                          headers=world.auth("vendor"))
    assert r.status_code == 201, r.text
    assert r.json() == {"vendorId": "v-confirm", "groupId": "double", "resourceIds": ROOMS,
                        "strategy": "preferred", "preferredOrder": ["room-3", "room-1"]}
    r = await client.get(f"{url}/double", headers=world.auth("p1"))
    assert r.status_code == 200 and r.json()["resourceIds"] == ROOMS
    r = await client.patch(f"{url}/double", json={"strategy": "adjacent",
                                                  "anchorResourceId": "room-4"},
                           headers=world.auth("admin"))
    assert r.status_code == 200, r.text
    assert r.json()["strategy"] == "adjacent" and r.json()["anchorResourceId"] == "room-4"
    r = await client.delete(f"{url}/double", headers=world.auth("vendor"))
    assert r.status_code == 204
    r = await client.get(f"{url}/double", headers=world.auth("admin"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "UNKNOWN_RESOURCE_GROUP"


async def test_bad_groups_get_a_typed_4xx_and_change_nothing(app, client, world, redis):
    svc = app.state.services
    await add_rooms(app, "v-confirm")
    async with svc.pool.acquire() as conn:
        await directory.create_resource(conn, "theirs", "v-other")
        # A resource created before migration 0011 whose own id hashes to another shard.
        keys = svc.keyspace
        legacy = next(f"old-{n}" for n in range(1000)
                      if keys.shard_of(f"old-{n}") != keys.shard_of("v-confirm"))
        await directory.create_resource(conn, legacy, "v-confirm", shard_key=legacy)
    r = await client.post("/v1/vendors/v-confirm/resource-groups",
                          json={"groupId": "g", "resourceIds": ["room-1"],
                                "strategy": "first_fit"}, headers=world.auth("admin"))
    assert r.status_code == 201
    before_rows = await group_rows(svc.pool)
    before = await state_of(redis, svc.settings.key_prefix)
    url = "/v1/vendors/v-confirm/resource-groups"
    body = {"groupId": "g2", "resourceIds": ["room-1", "room-2"], "strategy": "first_fit"}
    cases = [
        ("admin", {**body, "resourceIds": ["room-1", "theirs"]}, 400,
         "RESOURCE_VENDOR_MISMATCH"),
        ("admin", {**body, "resourceIds": ["room-1", "nowhere"]}, 404, "UNKNOWN_RESOURCE"),
        ("admin", {**body, "resourceIds": []}, 400, "EMPTY_GROUP"),
        ("admin", {**body, "resourceIds": ["room-1", "room-1"]}, 400, "DUPLICATE_MEMBER"),
        ("admin", {**body, "strategy": "random"}, 400, "INVALID_FIELD"),
        ("admin", {**body, "strategy": "preferred"}, 400, "MISSING_FIELD"),
        ("admin", {**body, "preferredOrder": ["room-9"]}, 400, "INVALID_FIELD"),
        ("admin", {**body, "anchorResourceId": "room-5"}, 400, "INVALID_FIELD"),
        ("admin", {**body, "zones": {"east": ["room-5"]}}, 400, "INVALID_FIELD"),
        ("admin", {**body, "zones": {"east": ["room-1", "room-1"]}}, 400, "INVALID_FIELD"),
        ("admin", {**body, "resourceIds": ["room-1", legacy]}, 409, "GROUP_NOT_COLOCATED"),
        ("admin", {**body, "groupId": "g"}, 409, "ALREADY_EXISTS"),
        ("admin", {**body, "groupId": "bad id"}, 400, None),
        ("admin", {**body, "extra": 1}, 400, "UNKNOWN_FIELD"),
        ("vendor-other", body, 404, "UNKNOWN_VENDOR"),
        ("p1", body, 403, "FORBIDDEN"),
        ("ops", body, 403, "FORBIDDEN"),
    ]
    for who, payload, status, code in cases:
        r = await client.post(url, json=payload, headers=world.auth(who))
        assert r.status_code == status, (payload, r.text)
        if code:
            assert r.json()["error"]["code"] == code, (payload, r.text)
    r = await client.post("/v1/vendors/nobody/resource-groups", json=body,
                          headers=world.auth("admin"))
    assert r.status_code == 404
    r = await client.patch(f"{url}/g", json={"resourceIds": ["theirs"]},
                           headers=world.auth("admin"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "RESOURCE_VENDOR_MISMATCH"
    r = await client.patch(f"{url}/nope", json={"strategy": "best_fit"},
                           headers=world.auth("admin"))
    assert r.status_code == 404
    r = await client.delete(f"{url}/g", headers=world.auth("vendor-other"))
    assert r.status_code == 404
    assert await group_rows(svc.pool) == before_rows
    assert await state_of(redis, svc.settings.key_prefix) == before


async def test_first_fit_takes_members_in_order_then_reports_the_pool_full(app, client,
                                                                           world, redis):
    svc = app.state.services
    await add_rooms(app)
    await make_group(client, world, "first_fit")
    chosen = []
    for _ in ROOMS:
        r = await hold(client, world)
        assert r.status_code == 201, r.text
        chosen.append(r.json()["resourceId"])
        rid = r.json()["reservationId"]
        got = await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))
        assert got.json()["resourceId"] == chosen[-1]
    assert chosen == ROOMS
    before = await state_of(redis, svc.settings.key_prefix)
    r = await hold(client, world)
    assert r.status_code == 409 and r.json()["error"]["code"] == "POOL_FULL"
    assert await state_of(redis, svc.settings.key_prefix) == before
    # Touching stays do not collide: the next hour has every member free again.
    r = await hold(client, world, start=60)
    assert r.status_code == 201 and r.json()["resourceId"] == "room-1"
    # The creation event names the member chosen and the group.
    keys = svc.keyspace
    entries = await redis.xrange(keys.events(keys.shard_of("v-instant")))
    created = [f for _, f in entries if f.get("resourceGroupId") == "double"]
    assert [f["resourceId"] for f in created] == ROOMS + ["room-1"]


async def test_preferred_adjacent_and_best_fit_choose_by_their_rule(app, client, world):
    await add_rooms(app)
    url = "/v1/vendors/v-instant/resource-groups/double"
    await make_group(client, world, "preferred", preferredOrder=["room-4", "room-2"])
    picks = [(await hold(client, world)).json()["resourceId"] for _ in range(3)]
    assert picks == ["room-4", "room-2", "room-1"]

    await client.patch(url, json={"strategy": "adjacent", "anchorResourceId": "room-3"},
                       headers=world.auth("admin"))
    picks = [(await hold(client, world, start=120)).json()["resourceId"] for _ in range(3)]
    assert picks == ["room-3", "room-2", "room-4"]
    r = await hold(client, world, start=120, nearResourceId="room-5")
    assert r.json()["resourceId"] == "room-5"
    # A zone: its members first, then the nearest to it.
    r = await client.patch(url, json={"zones": {"east": ["room-4", "room-5"]}},
                           headers=world.auth("admin"))
    assert r.status_code == 200 and r.json()["zones"] == {"east": ["room-4", "room-5"]}
    picks = [(await hold(client, world, start=900, nearZone="east")).json()["resourceId"]
             for _ in range(3)]
    assert picks == ["room-4", "room-5", "room-3"]

    # best_fit: room-2 has a one-hour gap at 6:00..7:00 between two holds; room-1 is open.
    await client.patch(url, json={"strategy": "first_fit"}, headers=world.auth("admin"))
    for start in (300, 420):
        body = create_body("v-instant", start, 60, resourceId="room-2")
        assert (await client.post("/v1/reservations", json=body,
                                  headers=world.auth("p1"))).status_code == 201
    await client.patch(url, json={"strategy": "best_fit"}, headers=world.auth("admin"))
    r = await hold(client, world, start=360)
    assert r.status_code == 201 and r.json()["resourceId"] == "room-2"
    # Every other member has more free units each side than the window (8 units) sees:
    # a tie, which goes to the earliest in the group's order.
    r = await hold(client, world, start=360)
    assert r.json()["resourceId"] == "room-1"
    # A gap that fits on a later member beats the order: room-4 free only 11:00-12:00.
    for start in (600, 720):
        r = await client.post("/v1/reservations", json=create_body(
            "v-instant", start, 60, resourceId="room-4"), headers=world.auth("p1"))
        assert r.status_code == 201
    r = await hold(client, world, start=660)
    assert r.json()["resourceId"] == "room-4"


async def test_pooled_bad_input_changes_nothing(app, client, world, redis):
    svc = app.state.services
    await add_rooms(app)
    await make_group(client, world, "first_fit")
    before = await state_of(redis, svc.settings.key_prefix)
    cases = [
        (pooled(resourceId="room-1"), 400, "INVALID_FIELD"),
        (create_body("v-instant", 0, 60, resourceGroupId="nope"), 404,
         "UNKNOWN_RESOURCE_GROUP"),
        (create_body("v-confirm", 0, 60, resourceGroupId="double"), 404,
         "UNKNOWN_RESOURCE_GROUP"),
        (pooled(nearResourceId="room-2"), 400, "INVALID_FIELD"),  # not an adjacent group
        (pooled(nearZone="east"), 400, "INVALID_FIELD"),  # no such zone
        (create_body("v-instant", 0, 60, nearResourceId="room-2"), 400, "INVALID_FIELD"),
        (pooled(start=7), 400, "SLOT_NOT_ALIGNED"),
    ]
    for payload, status, code in cases:
        r = await client.post("/v1/reservations", json=payload, headers=world.auth("p1"))
        assert r.status_code == status, (payload, r.text)
        assert r.json()["error"]["code"] == code, (payload, r.text)
    assert await state_of(redis, svc.settings.key_prefix) == before


async def test_group_availability_counts_free_members_per_slot(app, client, world):
    await add_rooms(app)
    await make_group(client, world, "first_fit")
    for _ in range(2):
        assert (await hold(client, world, start=60)).status_code == 201
    r = await client.get("/v1/vendors/v-instant/resource-groups/double/availability",
                         params={"startTime": at(0), "endTime": at(180),
                                 "slotDuration": "60"}, headers=world.auth("p2"))
    assert r.status_code == 200, r.text
    assert [(s["startTime"], s["freeMembers"], s["members"]) for s in r.json()["slots"]] == [
        (at(0), 5, 5), (at(60), 3, 5), (at(120), 5, 5)]
    r = await client.get("/v1/vendors/v-instant/resource-groups/double/availability",
                         params={"startTime": at(0)}, headers=world.auth("p2"))
    assert r.status_code == 400


async def test_rekey_moves_booked_markers_and_refuses_live_holds(app, world, redis):
    svc = app.state.services
    keys = svc.keyspace
    legacy = next(f"old-{n}" for n in range(1000)
                  if keys.shard_of(f"old-{n}") != keys.shard_of("v-confirm"))
    async with svc.pool.acquire() as conn:
        await directory.create_resource(conn, legacy, "v-confirm", shard_key=legacy)
    marker = keys.unit(legacy, 100, legacy)
    await redis.set(marker, "B|rsv_0_x", px=3_600_000)
    expires = await redis.pexpiretime(marker)
    await redis.set(keys.fence(legacy, legacy), 41)
    live = keys.unit(legacy, 200, legacy)
    await redis.set(live, "rsv_1_y", px=3_600_000)
    async with svc.pool.acquire() as conn:
        try:
            await rekey_vendor(conn, redis, keys, "v-confirm", apply=True)
            raise AssertionError("rekey went ahead over a live hold")
        except Exception as exc:  # noqa: BLE001
            assert getattr(exc, "code", None) == "LIVE_HOLDS", exc
        assert (await directory.get_resource(conn, legacy)).shard_key == legacy
        assert await redis.get(marker) == "B|rsv_0_x"
        await redis.delete(live)
        dry = await rekey_vendor(conn, redis, keys, "v-confirm", apply=False)
        assert dry.markers_moved == 1 and not dry.applied
        assert (await directory.get_resource(conn, legacy)).shard_key == legacy
        done = await rekey_vendor(conn, redis, keys, "v-confirm", apply=True)
        assert done.applied and done.markers_moved == 1 and done.resources == [legacy]
        assert (await directory.get_resource(conn, legacy)).shard_key == "v-confirm"
    moved = keys.unit(legacy, 100, "v-confirm")
    assert await redis.get(marker) is None
    assert await redis.get(moved) == "B|rsv_0_x"
    assert await redis.pexpiretime(moved) == expires
    assert await redis.get(keys.fence(legacy, "v-confirm")) == "41"

