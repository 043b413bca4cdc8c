"""The availability engine through the API (issue 13), against real Redis and Postgres:
schedules and busy blocks, bad input that changes nothing, enforcement at placement, the
ETag, explain, revalidation to FAILED_AVAILABILITY_CHANGED, rules shared by two API
processes through Redis, ICS import, and availability/placement agreement.

Python's clock is pinned a day before the fixtures' T0 (2030-01-01T09:00Z) with
``clock.use(ManualClock(...))``: the time rules (past, notice, horizon) are decided from it,
so the slots held are "tomorrow" whatever the date the suite runs on."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from api.app import create_app
from engine import clock
from engine.clock import ManualClock
from tests.conftest import delete_prefix
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    T0,
    T0_MS,
    api_settings,
    app,
    at,
    client,
    create_body,
    migrated,
    row_counts,
    world,
)

DAY_MS = 86_400_000
WEEK = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# T0 is a Tuesday, 09:00 UTC = 10:00 in Berlin (CET).
BERLIN = {"timeZone": "Europe/Berlin",
          "weekly": {d: [["09:00", "12:00"], ["13:00", "18:00"]] for d in WEEK[:5]},
          "overrides": [{"date": "2030-01-03", "intervals": []}],
          "minimumNoticeMinutes": 60, "horizonDays": 14}


@pytest.fixture(autouse=True)
def pinned_clock():
    with clock.use(ManualClock(T0_MS - DAY_MS)) as fake:
        yield fake


async def put_schedule(client, world, doc=None, vendor="v-instant", key="admin"):
    r = await client.put(f"/v1/vendors/{vendor}/schedule", json=doc or BERLIN,
                         headers=world.auth(key))
    assert r.status_code == 200, r.text
    return r.json()


async def hold(client, world, start: int, minutes: int = 30, vendor: str = "v-instant",
               **extra):
    return await client.post("/v1/reservations",
                             json=create_body(vendor=vendor, start=start, minutes=minutes,
                                              **extra), headers=world.auth("p1"))


async def state_of(app) -> dict:
    """What a refused request must not change: Postgres rows and the vendors' rules."""
    pool = app.state.services.pool
    counts = await row_counts(pool)
    async with pool.acquire() as conn:
        for table in ("vendor_schedules", "busy_blocks", "availability_revisions"):
            counts[table] = [tuple(r) for r in await conn.fetch(
                f"SELECT * FROM {table} ORDER BY 1")]
    redis = app.state.services.redis
    keys = app.state.services.keyspace
    counts["redis"] = sorted(await redis.keys(keys.pattern()))
    return counts


# ---- schedule ------------------------------------------------------------------------------
async def test_schedule_put_get_and_who_may(client, world):
    r = await client.get("/v1/vendors/v-confirm/schedule", headers=world.auth("vendor"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "NO_SCHEDULE"
    saved = await put_schedule(client, world, vendor="v-confirm", key="vendor")
    assert saved["slotDurationMinutes"] == 30 and saved["weekly"]["sat"] == []
    r = await client.get("/v1/vendors/v-confirm/schedule", headers=world.auth("vendor"))
    assert r.status_code == 200 and r.json() == saved
    r = await client.get("/v1/vendors/v-confirm/schedule", headers=world.auth("admin"))
    assert r.json() == saved
    # Another vendor's key: not found; a partner: forbidden.
    for key, status in (("vendor-other", 404), ("p1", 403)):
        r = await client.put("/v1/vendors/v-confirm/schedule", json=BERLIN,
                             headers=world.auth(key))
        assert r.status_code == status, r.text
    r = await client.put("/v1/vendors/nobody/schedule", json=BERLIN, headers=world.auth("admin"))
    assert r.status_code == 404


BAD_SCHEDULES = [
    ({"timeZone": "Mars/Olympus"}, 400, "UNKNOWN_TIME_ZONE"),
    ({"timeZone": "UTC", "weekly": {"mon": [["09:00", "12:00"], ["11:00", "13:00"]]}},
     400, "OVERLAPPING_INTERVALS"),
    ({"timeZone": "UTC", "weekly": {"mon": [["12:00", "09:00"]]}}, 400, "INVERTED_INTERVAL"),
    ({"timeZone": "UTC", "weekly": {"mon": [[f"{h:02}:00", f"{h:02}:30"] for h in range(9)]}},
     400, "TOO_MANY_INTERVALS"),
    ({"timeZone": "UTC", "horizonDays": 731}, 400, "INVALID_FIELD"),
    ({"timeZone": "UTC", "unknown": 1}, 400, "UNKNOWN_FIELD"),
    ({"weekly": {}}, 400, None),
]


async def test_bad_input_changes_nothing(app, client, world):
    await put_schedule(client, world)
    before = await state_of(app)
    for doc, status, code in BAD_SCHEDULES:
        r = await client.put("/v1/vendors/v-instant/schedule", json=doc,
                             headers=world.auth("admin"))
        assert r.status_code == status, (doc, r.text)
        if code:
            assert r.json()["error"]["code"] == code, r.text
    # A schedule of 1,000 intervals: refused (at the edge, its body is over the limit, or
    # by the schedule's own limit of 500).
    many = {"timeZone": "UTC", "overrides": [
        {"date": f"2031-{1 + d // 28:02}-{1 + d % 28:02}",
         "intervals": [[f"{h:02}:00", f"{h:02}:30"] for h in range(8)]} for d in range(125)]}
    r = await client.put("/v1/vendors/v-instant/schedule", json=many,
                         headers=world.auth("admin"))
    assert r.status_code in (400, 413) and r.json()["error"]["code"] in (
        "TOO_MANY_INTERVALS", "BODY_TOO_LARGE")
    for block, code in (({"start": at(60), "end": at(30)}, "INVERTED_INTERVAL"),
                        ({"start": at(0), "end": at(30), "status": "maybe"}, "INVALID_FIELD"),
                        ({"start": "tomorrow", "end": at(30)}, None),
                        ({"start": at(0), "end": at(30), "resourceId": "v-confirm"},
                         "RESOURCE_VENDOR_MISMATCH")):
        r = await client.post("/v1/vendors/v-instant/busy-blocks", json=block,
                              headers=world.auth("admin"))
        assert r.status_code == 400, r.text
        if code:
            assert r.json()["error"]["code"] == code
    for body, content_type, status in (
            (b"not a calendar", "text/calendar", 400),
            (b"BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nDTSTART:notadate\r\nEND:VEVENT\r\n"
             b"END:VCALENDAR\r\n", "text/calendar", 400),
            (b"BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n", "application/json", 415),
            (b"BEGIN:VCALENDAR\r\n" + b"X-PAD:" + b"x" * 10_000_000 + b"\r\nEND:VCALENDAR\r\n",
             "text/calendar", 413)):
        r = await client.put("/v1/vendors/v-instant/calendars/cal1", content=body,
                             headers={**world.auth("admin"), "Content-Type": content_type})
        assert r.status_code == status, r.text[:200]
    r = await client.delete("/v1/vendors/v-instant/busy-blocks/blk_nope",
                            headers=world.auth("admin"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "UNKNOWN_BUSY_BLOCK"
    assert await state_of(app) == before


# ---- busy blocks ---------------------------------------------------------------------------
async def test_busy_blocks_create_list_delete(client, world):
    r = await client.post("/v1/vendors/v-confirm/busy-blocks",
                          json={"start": at(60), "end": at(120), "status": "tentative",
                                "source": "phone"}, headers=world.auth("vendor"))
    assert r.status_code == 201, r.text
    block = r.json()
    assert block["blockId"].startswith("blk_") and block["status"] == "tentative"
    assert block["start"] == at(60) and block["source"] == "phone"
    r = await client.get("/v1/vendors/v-confirm/busy-blocks", headers=world.auth("vendor"))
    assert [b["blockId"] for b in r.json()["blocks"]] == [block["blockId"]]
    r = await client.get("/v1/vendors/v-confirm/busy-blocks", headers=world.auth("vendor-other"))
    assert r.status_code == 404
    r = await client.delete(f"/v1/vendors/v-confirm/busy-blocks/{block['blockId']}",
                            headers=world.auth("vendor"))
    assert r.status_code == 200 and r.json() == {"blockId": block["blockId"], "deleted": True}
    r = await client.get("/v1/vendors/v-confirm/busy-blocks", headers=world.auth("vendor"))
    assert r.json()["blocks"] == []


# ---- enforcement at placement -----------------------------------------------------------------
async def test_placement_refuses_what_the_rules_refuse_before_any_write(app, client, world,
                                                                       pinned_clock):
    await put_schedule(client, world)
    r = await client.post("/v1/vendors/v-instant/busy-blocks",
                          json={"start": at(180), "end": at(240)}, headers=world.auth("admin"))
    assert r.status_code == 201
    pinned_clock.set_ms(T0_MS - 30 * 60_000)  # T0 is 30 minutes away: inside the notice
    cases = [
        (0, ["minimum_notice"]),
        (-24 * 60 - 60, ["in_past"]),  # yesterday
        (180, ["busy"]),  # 13:00 Berlin
        (210, ["busy"]),
        (60 * 8 + 30, ["outside_hours"]),  # 18:30 Berlin
        (60 * 2 + 60 * 24 * 2, ["outside_hours"]),  # 2030-01-03: the override closes it
        (60 * 24 * 15, ["beyond_horizon"]),  # 15 days out, a Wednesday
    ]
    before = await state_of(app)
    for start, reasons in cases:
        r = await hold(client, world, start)
        assert r.status_code == 409, (start, r.text)
        error = r.json()["error"]
        assert error["code"] == "SLOT_UNAVAILABLE" and error["details"]["reasons"] == reasons
    assert await state_of(app) == before
    assert (await hold(client, world, 60)).status_code == 201  # 11:00 Berlin, all rules met


async def test_a_vendor_without_schedule_refuses_only_the_past(client, world):
    r = await client.post("/v1/reservations",
                          json={"vendorId": "v-confirm", "slotStartTime": "2020-01-01T09:00:00Z",
                                "slotEndTime": "2020-01-01T09:30:00Z", "requesterId": "r"},
                          headers=world.auth("p1"))
    assert r.status_code == 409 and r.json()["error"]["details"]["reasons"] == ["in_past"]
    # Always open otherwise: a Sunday night, years ahead.
    assert (await hold(client, world, 60 * 24 * 365 * 3 + 15 * 60, vendor="v-confirm")
            ).status_code == 201


# ---- the answer: ETag, 304, explain --------------------------------------------------------
async def test_availability_versions_etag_and_explain(client, world):
    await put_schedule(client, world)
    params = {"startTime": at(-90), "endTime": at(60 * 9), "includeConfidence": "true"}
    first = await client.get("/v1/vendors/v-instant/availability", params=params,
                             headers=world.auth("p1"))
    assert first.status_code == 200, first.text
    body = first.json()
    assert first.headers["etag"] == f'"{body["computedVersion"]}"'
    assert len(body["slots"]) == 21  # 30-minute slots: the schedule's default
    slots = {s["startTime"]: s for s in body["slots"]}
    assert slots[at(-90)]["reasons"] == ["outside_hours"]  # 08:30 Berlin; 09:00 opens
    assert slots[at(-90)]["confidence"] == 0.4
    assert slots[at(-60)]["isAvailable"]
    assert slots[at(0)]["isAvailable"] and slots[at(0)]["confidence"] == 1.0
    assert slots[at(120)]["reasons"] == ["outside_hours"]  # 12:00-13:00 lunch
    second = await client.get("/v1/vendors/v-instant/availability", params=params,
                              headers=world.auth("p1"))
    # The same inputs: the same slots and version (the clock is pinned, so computedAt too).
    assert second.json()["slots"] == body["slots"]
    assert second.headers["etag"] == first.headers["etag"]
    r = await client.get("/v1/vendors/v-instant/availability", params=params,
                         headers={**world.auth("p1"), "If-None-Match": first.headers["etag"]})
    assert r.status_code == 304 and r.headers["etag"] == first.headers["etag"]
    # A new input, a new version; so does a hold in the range.
    assert (await hold(client, world, 0)).status_code == 201
    third = await client.get("/v1/vendors/v-instant/availability", params=params,
                             headers={**world.auth("p1"), "If-None-Match": first.headers["etag"]})
    assert third.status_code == 200 and third.headers["etag"] != first.headers["etag"]
    assert {s["startTime"]: s for s in third.json()["slots"]}[at(0)]["reasons"] == ["held"]
    r = await client.get("/v1/vendors/v-instant/availability",
                         params={"startTime": at(120), "endTime": at(150), "explain": "true"},
                         headers=world.auth("p1"))
    (slot,) = r.json()["slots"]
    assert [step["rule"] for step in slot["explain"]] == [
        "in_past", "minimum_notice", "beyond_horizon", "outside_hours", "busy", "tentative",
        "buffer"]
    assert [step["rule"] for step in slot["explain"] if step["refused"]] == ["outside_hours"]


# ---- revalidation -----------------------------------------------------------------------------
async def test_a_busy_block_over_a_live_reservation_fails_its_next_step(client, world):
    r = await hold(client, world, 60, vendor="v-confirm")
    rid = r.json()["reservationId"]
    other = (await hold(client, world, 240, vendor="v-confirm")).json()["reservationId"]
    r = await client.post("/v1/vendors/v-confirm/busy-blocks",
                          json={"start": at(30), "end": at(120)}, headers=world.auth("vendor"))
    block = r.json()["blockId"]
    r = await client.post(f"/v1/reservations/{rid}/vendor-confirmation", json={},
                          headers=world.auth("vendor"))
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "FAILED_AVAILABILITY_CHANGED"
    assert error["details"]["reasons"] == ["busy"]
    assert error["details"]["state"] == "FAILED_AVAILABILITY_CHANGED"
    r = await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))
    assert r.json()["state"] == "FAILED_AVAILABILITY_CHANGED"
    assert "busy" in r.json()["failureReason"]
    # The other reservation is untouched; a block that goes away again leaves no mark.
    r = await client.post("/v1/vendors/v-confirm/busy-blocks",
                          json={"start": at(240), "end": at(250)}, headers=world.auth("vendor"))
    await client.delete(f"/v1/vendors/v-confirm/busy-blocks/{r.json()['blockId']}",
                        headers=world.auth("vendor"))
    r = await client.post(f"/v1/reservations/{other}/vendor-confirmation", json={},
                          headers=world.auth("vendor"))
    assert r.status_code == 200, r.text
    await client.delete(f"/v1/vendors/v-confirm/busy-blocks/{block}",
                        headers=world.auth("vendor"))


async def test_extend_and_commit_are_revalidated_too(client, world):
    rid = (await hold(client, world, 60)).json()["reservationId"]  # instant, free: AUTH_BOTH
    await put_schedule(client, world, {"timeZone": "UTC", "weekly": {"tue": [["00:00", "09:00"]]}})
    # A ttl that moves the deadline later (else 409 EXTEND_NOT_LATER, issue 17, first).
    r = await client.post(f"/v1/reservations/{rid}/extend", json={"ttlMs": 1_800_000},
                          headers=world.auth("p1"))
    assert r.status_code == 409 and r.json()["error"]["details"]["reasons"] == ["outside_hours"]
    rid = (await hold(client, world, 60 * 24 * 7 - 60 * 9 + 60)).json()  # next Tue 01:00
    assert "reservationId" in rid, rid
    await client.post("/v1/vendors/v-instant/busy-blocks",
                      json={"start": at(60 * 24 * 7 - 60 * 9), "end": at(60 * 24 * 7 - 60 * 7)},
                      headers=world.auth("admin"))
    r = await client.post(f"/v1/reservations/{rid['reservationId']}/commit", json={},
                          headers=world.auth("p1"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "FAILED_AVAILABILITY_CHANGED"


# ---- two API processes share the rules through Redis ---------------------------------------
async def test_rules_changed_by_another_process_are_enforced_at_once(app, client, world,
                                                                    migrated, redis):
    assert (await hold(client, world, 0)).status_code == 201  # this process caches the rules
    other = create_app(migrated)
    async with other.router.lifespan_context(other):
        transport = httpx.ASGITransport(app=other, client=("10.0.0.2", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://b.test") as b:
            r = await b.post("/v1/vendors/v-instant/busy-blocks",
                             json={"start": at(60), "end": at(90)}, headers=world.auth("admin"))
            assert r.status_code == 201
    r = await hold(client, world, 60)  # this process's cache is stale: the script says so
    assert r.status_code == 409 and r.json()["error"]["details"]["reasons"] == ["busy"]
    # A Redis that lost the published revision heals: the next create republishes it.
    keys = app.state.services.keyspace
    await redis.delete(keys.availability_revision("v-instant"))
    assert (await hold(client, world, 120)).status_code == 201
    assert await redis.get(keys.availability_revision("v-instant")) is not None


# ---- ICS through the API ------------------------------------------------------------------
ICS = (b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//t//EN\r\n"
       b"BEGIN:VEVENT\r\nUID:daily\r\nDTSTART:20300101T100000Z\r\nDTEND:20300101T110000Z\r\n"
       b"RRULE:FREQ=DAILY;COUNT=400\r\nEXDATE:20300102T100000Z\r\nEND:VEVENT\r\n"
       b"BEGIN:VEVENT\r\nUID:maybe\r\nDTSTART:20300101T130000Z\r\nDTEND:20300101T140000Z\r\n"
       b"STATUS:TENTATIVE\r\nEND:VEVENT\r\n"
       b"BEGIN:VEVENT\r\nUID:free\r\nDTSTART:20300101T150000Z\r\nDTEND:20300101T160000Z\r\n"
       b"TRANSP:TRANSPARENT\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")


async def test_calendar_import_replaces_its_blocks_over_the_horizon(client, world):
    await put_schedule(client, world, {"timeZone": "UTC", "horizonDays": 30,
                                       "weekly": {d: [["00:00", "24:00"]] for d in WEEK}})
    r = await client.put("/v1/vendors/v-instant/calendars/work", content=ICS,
                         headers={**world.auth("admin"), "Content-Type": "text/calendar"})
    assert r.status_code == 200, r.text
    result = r.json()
    # Daily from 2030-01-01 within 30 days of the clock (2029-12-31T09:00Z): 29 minus the
    # EXDATE, plus the tentative one.
    assert result["tentative"] == 1 and result["busy"] == 28 and result["removed"] == 0
    params = {"startTime": at(0), "endTime": at(24 * 60 + 120), "slotDuration": "60"}
    slots = {s["startTime"]: s for s in (await client.get(
        "/v1/vendors/v-instant/availability", params=params,
        headers=world.auth("p1"))).json()["slots"]}
    assert slots[at(60)]["reasons"] == ["busy"]
    assert slots[at(24 * 60 + 60)]["isAvailable"]  # the EXDATE
    assert slots[at(240)]["reasons"] == ["tentative"]
    assert slots[at(360)]["isAvailable"]  # transparent
    assert (await hold(client, world, 60)).status_code == 409
    r = await client.put("/v1/vendors/v-instant/calendars/work",
                         content=b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:t\r\nEND:VCALENDAR\r\n",
                         headers={**world.auth("admin"), "Content-Type": "text/calendar"})
    assert r.json()["removed"] == 29 and r.json()["blocks"] == 0
    assert (await hold(client, world, 60)).status_code == 201


# ---- availability and placement agree --------------------------------------------------------
async def test_every_slot_reported_available_can_be_held_and_every_refusal_says_why(
        client, world):
    await put_schedule(client, world, {**BERLIN, "bufferAfterMinutes": 30})
    for start, end, status in ((90, 150, "busy"), (300, 330, "tentative")):
        await client.post("/v1/vendors/v-instant/busy-blocks",
                          json={"start": at(start), "end": at(end), "status": status},
                          headers=world.auth("admin"))
    assert (await hold(client, world, 420)).status_code == 201
    params = {"startTime": at(-120), "endTime": at(60 * 10), "slotDuration": "30"}
    slots = (await client.get("/v1/vendors/v-instant/availability", params=params,
                              headers=world.auth("p1"))).json()["slots"]
    assert any(s["isAvailable"] for s in slots) and any(not s["isAvailable"] for s in slots)
    for s in slots:
        r = await client.post("/v1/reservations", json={
            "vendorId": "v-instant", "slotStartTime": s["startTime"],
            "slotEndTime": s["endTime"], "requesterId": "agree"}, headers=world.auth("p2"))
        if s["isAvailable"]:
            assert r.status_code == 201, (s, r.text)
            rid = r.json()["reservationId"]
            await client.post(f"/v1/reservations/{rid}/cancel", json={},
                              headers=world.auth("p2"))
        else:
            assert r.status_code == 409, (s, r.text)
            error = r.json()["error"]
            assert error["code"] == "SLOT_UNAVAILABLE"
            if "reasons" in error["details"]:
                assert set(error["details"]["reasons"]) <= set(s["reasons"]), (s, error)
            else:  # the hold script's own refusal: held or booked units
                assert set(s["reasons"]) & {"held", "booked"}, (s, error)


async def test_concurrent_creates_and_a_rules_change_never_leave_a_hold_in_a_block(
        app, client, world):
    """Many creates race one busy block: every hold that exists afterwards either lies
    outside the block or was failed by revalidation at its next step."""
    starts = list(range(0, 8 * 60, 30))
    block = {"start": at(0), "end": at(8 * 60)}

    async def create(start):
        return await hold(client, world, start)

    results = await asyncio.gather(
        *(create(s) for s in starts),
        client.post("/v1/vendors/v-instant/busy-blocks", json=block,
                    headers=world.auth("admin")))
    created = [r.json()["reservationId"] for r in results[:-1] if r.status_code == 201]
    refused = [r for r in results[:-1] if r.status_code == 409]
    assert len(created) + len(refused) == len(starts)
    for r in refused:
        assert r.json()["error"]["details"]["reasons"] == ["busy"]
    for rid in created:  # placed before the block: its next step fails
        r = await client.post(f"/v1/reservations/{rid}/extend", json={"ttlMs": 1_800_000},
                              headers=world.auth("p1"))
        assert r.status_code == 409 and \
            r.json()["error"]["code"] == "FAILED_AVAILABILITY_CHANGED", r.text


async def test_extending_a_slot_that_has_begun_is_refused(app, client, world):
    """The hold script decides "begun" by Redis TIME: a reservation placed through the
    engine (no rules) on a slot of 2020 cannot be extended through the API."""
    engine = app.state.services.reservations.engine
    await app.state.services.catalog.vendor("v-confirm")  # into this process's catalog
    moved = await engine.create(partner_id="p1", vendor_id="v-confirm", resource_id=None,
                                start_ms=1_577_869_200_000, end_ms=1_577_871_000_000,
                                requester_id="r")  # 2020-01-01T09:00Z, 30 minutes
    r = await client.post(f"/v1/reservations/{moved.reservation_id}/extend",
                          json={"ttlMs": 1_800_000}, headers=world.auth("p1"))
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "SLOT_UNAVAILABLE" and error["details"]["reasons"] == ["in_past"]
    r = await client.get(f"/v1/reservations/{moved.reservation_id}", headers=world.auth("p1"))
    assert r.json()["version"] == moved.version  # nothing changed
