"""Issue 17: lists with cursors. Real Redis and Postgres, rows written by the real commit
queue; pagination checked over the whole history while rows are being written."""

from __future__ import annotations

import asyncio

from engine.times import parse_time
from tests.conftest import snapshot
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    api_settings,
    app,
    client,
    create_body,
    migrated,
    row_counts,
    world,
)
from tests.test_modify import drain


async def create(client, world, who: str = "p1", vendor: str = "v-instant",
                 start: int = 0) -> str:
    r = await client.post("/v1/reservations", json=create_body(vendor, start=start),
                          headers=world.auth(who))
    assert r.status_code == 201, r.text
    return r.json()["reservationId"]


async def all_pages(client, path: str, headers: dict, **params) -> list[list[dict]]:
    pages, cursor = [], None
    while True:
        query = {**params, **({"startingAfter": cursor} if cursor else {})}
        r = await client.get(path, params=query, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body["data"])
        cursor = body["nextCursor"]
        if cursor is None:
            return pages


async def test_paging_while_rows_are_written_shows_each_row_once(app, client, world):
    svc = app.state.services
    before = [await create(client, world, start=30 * i) for i in range(23)]
    others = [await create(client, world, who="p2", start=30 * i) for i in range(23, 26)]
    await drain(svc)
    # Created before paging starts, written to Postgres only while it pages: these land
    # among the rows already paged (older creation times) and may or may not be seen.
    late = [await create(client, world, start=30 * i) for i in range(26, 31)]

    written = asyncio.Event()
    paging_done = asyncio.Event()
    during: list[str] = []

    async def writer() -> None:
        start = 31
        while not paging_done.is_set():
            during.append(await create(client, world, start=30 * start))
            start += 1
            await drain(svc)
            written.set()
            await asyncio.sleep(0)

    async def pager() -> list[list[dict]]:
        pages, cursor = [], None
        while True:
            params = {"limit": "4", **({"startingAfter": cursor} if cursor else {})}
            r = await client.get("/v1/reservations", params=params, headers=world.auth("p1"))
            assert r.status_code == 200, r.text
            pages.append(r.json()["data"])
            cursor = r.json()["nextCursor"]
            if cursor is None:
                paging_done.set()
                return pages
            written.clear()
            await written.wait()  # a row is written between every two pages

    pages, _ = await asyncio.gather(pager(), writer())
    seen = [row["reservationId"] for page in pages for row in page]
    assert len(pages) >= 6 and all(len(page) <= 4 for page in pages)
    assert len(seen) == len(set(seen)), "a row was listed twice"
    assert set(before) <= set(seen), "a row that existed before paging was skipped"
    assert set(seen) <= set(before) | set(late) | set(during)
    assert not set(others) & set(seen)  # p2's rows are not p1's
    assert len(during) >= len(pages) - 1
    # Newest first, and the whole list once more (after the writes) is exactly p1's rows.
    final = [row for page in await all_pages(client, "/v1/reservations", world.auth("p1"),
                                             limit="7") for row in page]
    assert {r["reservationId"] for r in final} == set(before) | set(late) | set(during)
    # compared as instants: a whole second renders without a fraction ("…:13Z"), which
    # sorts after "…:13.046Z" as text (seen once on a run that hit a whole second)
    created = [parse_time(r["createdAt"], "createdAt") for r in final]
    assert created == sorted(created, reverse=True)


async def test_tenancy_and_filters(app, client, world):
    svc = app.state.services
    mine = await create(client, world, vendor="v-confirm", start=0)
    instant = await create(client, world, vendor="v-instant", start=0)
    theirs = await create(client, world, who="p2", vendor="v-confirm", start=60)
    await drain(svc)

    async def ids(who: str, **params) -> set[str]:
        return {row["reservationId"] for page in await all_pages(
            client, "/v1/reservations", world.auth(who), **params) for row in page}

    assert await ids("p1") == {mine, instant}
    assert await ids("p2") == {theirs}
    assert await ids("vendor") == {mine, theirs}  # the v-confirm vendor's key
    assert await ids("ops") == await ids("admin") == {mine, instant, theirs}
    assert await ids("p1", vendorId="v-confirm") == {mine}
    assert await ids("p1", state="AWAITING_VENDOR_CONFIRMATION") == {mine}
    assert await ids("p1", state="AWAITING_VENDOR_CONFIRMATION,AUTHORIZED_BOTH") == {
        mine, instant}
    assert await ids("ops", **{"from": "2030-01-01T09:30:00Z"}) == {theirs}
    assert await ids("ops", to="2030-01-01T09:30:00Z") == {mine, instant}
    r = await client.get("/v1/reservations", params={"vendorId": "v-instant"},
                         headers=world.auth("vendor"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "UNKNOWN_VENDOR"
    row = next(row for page in await all_pages(client, "/v1/reservations", world.auth("p1"),
                                               vendorId="v-confirm") for row in page)
    assert row["state"] == "AWAITING_VENDOR_CONFIRMATION" and row["partnerId"] == "p1"
    assert row["slotStartTime"] == "2030-01-01T09:00:00Z" and isinstance(row["version"], int)


async def test_bookings_list(app, client, world):
    svc = app.state.services
    rid = await create(client, world, vendor="v-instant", start=0)
    r = await client.post(f"/v1/reservations/{rid}/commit", headers=world.auth("p1"))
    assert r.status_code == 202, r.text
    await drain(svc)
    await drain(svc)
    pages = await all_pages(client, "/v1/bookings", world.auth("p1"))
    [booking] = [b for page in pages for b in page]
    assert booking["reservationId"] == rid and booking["cancelledAt"] is None
    assert booking["vendorId"] == "v-instant" and booking["bookingId"]
    assert await all_pages(client, "/v1/bookings", world.auth("p2")) == [[]]
    assert await all_pages(client, "/v1/bookings", world.auth("vendor")) == [[]]
    assert len((await all_pages(client, "/v1/bookings", world.auth("vendor-instant")))[0]) == 1


async def test_admin_lists_page_by_id_and_never_show_a_secret(app, client, world):
    for path, field in (("/v1/admin/vendors", "vendorId"),
                        ("/v1/admin/partners", "partnerId"),
                        ("/v1/admin/keys", "keyId")):
        pages = await all_pages(client, path, world.auth("admin"), limit="1")
        rows = [row[field] for page in pages for row in page]
        assert rows == sorted(rows) and len(rows) == len(set(rows)) == len(pages) >= 2
        r = await client.get(path, headers=world.auth("ops"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN"
    keys = [k for page in await all_pages(client, "/v1/admin/keys", world.auth("admin"),
                                          limit="3") for k in page]
    assert len(keys) == len(world.keys)
    text = str(keys)
    assert all(secret not in text for secret in world.keys.values())
    assert all("key" not in k for k in keys)
    partner_keys = await all_pages(client, "/v1/admin/keys", world.auth("admin"),
                                   role="partner")
    assert sorted(k["partnerId"] for k in partner_keys[0]) == ["p1", "p2"]
    vendors = (await all_pages(client, "/v1/admin/vendors", world.auth("system")))[0]
    assert {v["vendorId"] for v in vendors} >= {"v-confirm", "v-instant", "v-paid"}
    assert all(isinstance(v["unitMinutes"], int) for v in vendors)


async def test_audit_pages_with_a_cursor(app, client, world):
    svc = app.state.services
    for i in range(4):
        await create(client, world, start=30 * i)
    await drain(svc)
    r = await client.get("/v1/ops/audit", params={"limit": "1000"}, headers=world.auth("ops"))
    everything = [e["id"] for e in r.json()["data"]]
    assert r.json()["nextCursor"] is None and len(everything) >= 4
    assert r.json()["entries"] == r.json()["data"]
    pages = await all_pages(client, "/v1/ops/audit", world.auth("ops"), limit="3")
    assert [e["id"] for page in pages for e in page] == everything


async def test_bad_queries_are_typed_400s_and_change_nothing(app, client, world, redis):
    svc = app.state.services
    await create(client, world, start=0)
    await create(client, world, start=30)
    await drain(svc)
    first = (await client.get("/v1/reservations", params={"limit": "1"},
                              headers=world.auth("p1"))).json()
    cursor = first["nextCursor"]
    assert cursor is not None
    booking_cursor_like = (await client.get("/v1/admin/vendors", params={"limit": "1"},
                                            headers=world.auth("admin"))).json()["nextCursor"]
    counts = await row_counts(svc.pool)
    keys_before = await snapshot(redis, svc.settings.key_prefix)
    cases = [
        ("/v1/reservations", {"limit": "0"}, "INVALID_PARAMETER", "limit"),
        ("/v1/reservations", {"limit": "10000"}, "INVALID_PARAMETER", "limit"),
        ("/v1/reservations", {"limit": "ten"}, "INVALID_PARAMETER", "limit"),
        ("/v1/reservations", {"colour": "red"}, "UNKNOWN_PARAMETER", "colour"),
        ("/v1/reservations", {"state": "HAPPY"}, "INVALID_PARAMETER", "state"),
        ("/v1/reservations", {"vendorId": "no spaces"}, "INVALID_PARAMETER", "vendorId"),
        ("/v1/reservations", {"from": "yesterday"}, "INVALID_TIMESTAMP", "from"),
        ("/v1/reservations", {"from": "2030-01-02T00:00:00Z", "to": "2030-01-01T00:00:00Z"},
         "INVALID_TIME_RANGE", "to"),
        ("/v1/reservations", {"startingAfter": "not-a-cursor"}, "INVALID_CURSOR",
         "startingAfter"),
        ("/v1/reservations", {"startingAfter": booking_cursor_like}, "INVALID_CURSOR",
         "startingAfter"),
        ("/v1/reservations", {"startingAfter": cursor, "state": "HELD"}, "INVALID_CURSOR",
         "startingAfter"),
        ("/v1/bookings", {"startingAfter": cursor}, "INVALID_CURSOR", "startingAfter"),
        ("/v1/bookings", {"state": "HELD"}, "UNKNOWN_PARAMETER", "state"),
        ("/v1/admin/keys", {"role": "root"}, "INVALID_PARAMETER", "role"),
        ("/v1/admin/vendors", {"limit": "201"}, "INVALID_PARAMETER", "limit"),
        ("/v1/ops/audit", {"startingAfter": cursor}, "INVALID_CURSOR", "startingAfter"),
    ]
    for path, params, code, field in cases:
        who = "admin" if "admin" in path or "ops" in path else "p1"
        r = await client.get(path, params=params, headers=world.auth(who))
        assert r.status_code == 400, (path, params, r.text)
        error = r.json()["error"]
        assert (error["code"], error["details"]["field"]) == (code, field), (path, params)
    r = await client.get("/v1/reservations?limit=1&limit=2", headers=world.auth("p1"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "REPEATED_PARAMETER"
    # A cursor belongs to the caller's tenancy: another partner cannot page with it.
    r = await client.get("/v1/reservations", params={"startingAfter": cursor},
                         headers=world.auth("p2"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_CURSOR"
    assert await row_counts(svc.pool) == counts
    after = await snapshot(redis, svc.settings.key_prefix)
    # Only the rate limiter's own keys may have moved (for the requests that passed).
    changed = {k for k in set(after) | set(keys_before) if after.get(k) != keys_before.get(k)}
    assert all(k.endswith(":rate") for k in changed), changed


async def test_forged_cursors_are_400_not_500(client, world):
    from engine import cursor

    filters = {"partner": "p1", "vendor": None, "state": None, "from": None, "to": None}
    for position in ([2**62, "rsv_x"], [-(2**62), "rsv_x"], ["2030", "rsv_x"], [1],
                     [1, "a", 2]):
        forged = cursor.encode("reservations", position, filters)
        r = await client.get("/v1/reservations", params={"startingAfter": forged},
                             headers=world.auth("p1"))
        assert r.status_code == 400, (position, r.text)
        assert r.json()["error"]["code"] == "INVALID_CURSOR"
    # Well formed and for the caller's own filters: a position anywhere is harmless.
    ok = cursor.encode("reservations", [0, ""], filters)
    r = await client.get("/v1/reservations", params={"startingAfter": ok},
                         headers=world.auth("p1"))
    assert r.status_code == 200 and r.json() == {"data": [], "nextCursor": None}
