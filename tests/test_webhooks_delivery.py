"""Webhook delivery end to end (issue 14): the API acts, the commit queue records, the
dispatcher signs and sends to a real receiver (uvicorn) that verifies every signature with
the standardwebhooks package. Tenancy, order per reservation, retries, timeouts,
Retry-After, rotation, a dead endpoint beside a healthy one."""

from __future__ import annotations

import asyncio

from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    app,
    client,
    create_body,
    migrated,
    world,
)
from tests.timing import eventually
from tests.webhook_fixtures import (  # noqa: F401  (fixtures)
    Loops,
    api_settings,
    receiver,
    worker_loops,
)

TENANT_FIELDS = ("reservationId", "state", "version", "vendorId", "partnerId",
                 "slotStartTime", "slotEndTime", "expiresAt")


async def register(client, world, receiver, key: str, name: str, events=("*",)) -> str:
    r = await client.post("/v1/webhook-endpoints", headers=world.auth(key),
                          json={"url": receiver.url(name), "events": list(events)})
    assert r.status_code == 201, r.text
    receiver.secrets[name].append(r.json()["secret"])
    return r.json()["id"]


async def deliveries(client, world, key: str, endpoint_id: str) -> list[dict]:
    out, cursor = [], None
    while True:
        r = await client.get(f"/v1/webhook-endpoints/{endpoint_id}/deliveries",
                             headers=world.auth(key),
                             params={"limit": 3, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        out += r.json()["data"]
        cursor = r.json()["nextCursor"]
        if cursor is None:
            return out


async def settled(client, world, key: str, endpoint_id: str, count: int) -> list[dict]:
    """Wait until the endpoint has ``count`` deliveries, none pending."""
    found: list[dict] = []

    async def done() -> bool:
        found[:] = await deliveries(client, world, key, endpoint_id)
        return len(found) == count and all(d["status"] != "pending" for d in found)

    await eventually(done, timeout_s=60, what=f"{count} settled deliveries")
    return found


async def test_every_event_type_reaches_its_tenants_and_no_other(client, world, receiver,
                                                                 worker_loops):
    ids = {}
    for key, name in (("p1", "p1"), ("p2", "p2"), ("vendor", "vendor"),
                      ("vendor-other", "vendor-other"), ("ops", "ops")):
        ids[name] = await register(client, world, receiver, key, name)
    ids["p1-cancelled"] = await register(client, world, receiver, "p1", "p1-cancelled",
                                         ["reservation.cancelled"])
    # r1: created, awaiting confirmation, confirmed (payment waived: authorized), extended,
    # committed.
    r = await client.post("/v1/reservations", json=create_body(), headers=world.auth("p1"))
    r1 = r.json()["reservationId"]
    r = await client.post(f"/v1/reservations/{r1}/vendor-confirmation",
                          headers=world.auth("vendor"))
    assert r.status_code == 200, r.text
    r = await client.post(f"/v1/reservations/{r1}/extend", headers=world.auth("p1"),
                          json={"ttlMs": 2_400_000})
    assert r.status_code == 200, r.text
    r = await client.post(f"/v1/reservations/{r1}/commit", headers=world.auth("p1"))
    assert r.status_code == 202, r.text
    # r2 cancelled by the partner, r3 released by ops, r4 and r5 bulk-released.
    rids = []
    for start in (60, 120, 180, 240):
        r = await client.post("/v1/reservations", json=create_body(start=start),
                              headers=world.auth("p1"))
        assert r.status_code == 201, r.text
        rids.append(r.json()["reservationId"])
    r2, r3, r4, r5 = rids
    assert (await client.post(f"/v1/reservations/{r2}/cancel",
                              headers=world.auth("p1"))).status_code == 200
    r = await client.post(f"/v1/ops/reservations/{r3}/release", headers=world.auth("ops"),
                          json={"reason": "double entry"})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/ops/releases", headers=world.auth("ops"),
                          json={"reason": "room closed", "reservationIds": [r4, r5]})
    assert len(r.json()["released"]) == 2
    # r1's booking cancelled (issue 12's route): once its commit is drained, a cancel; a
    # second cancel answers the same and records nothing more.
    booking: list[str] = []

    async def booked() -> bool:
        body = (await client.get(f"/v1/reservations/{r1}", headers=world.auth("p1"))).json()
        booking[:] = [body.get("bookingId")] if body["state"] == "COMMITTED" else []
        return bool(booking)

    await eventually(booked, timeout_s=60, what="r1 committed")
    for _ in range(2):
        r = await client.post(f"/v1/bookings/{booking[0]}/cancel", headers=world.auth("p1"),
                              json={"reason": "plans changed"})
        assert r.status_code == 200, r.text

    tenant_types = {
        "reservation.created", "reservation.awaiting_vendor_confirmation",
        "reservation.vendor_confirmed", "reservation.vendor_authorized",
        "reservation.authorized_both", "reservation.extended", "reservation.committed",
        "reservation.cancelled", "booking.cancelled"}
    # created + awaiting for all five; r1's confirmed/authorized/both/extended/committed;
    # four cancellations; r1's booking cancelled (once)
    tenant_count = 5 * 2 + 5 + 4 + 1
    for name, key in (("p1", "p1"), ("vendor", "vendor")):
        found = await settled(client, world, key, ids[name], tenant_count)
        assert {d["type"] for d in found} == tenant_types
        assert all(d["status"] == "delivered" and d["attempts"] == 1 for d in found)
    ops = await settled(client, world, "ops", ids["ops"], tenant_count + 2)
    assert {d["type"] for d in ops} == tenant_types | {"hold.manually_released",
                                                       "hold.bulk_released"}
    only_cancelled = await settled(client, world, "p1", ids["p1-cancelled"], 4)
    assert {d["type"] for d in only_cancelled} == {"reservation.cancelled"}
    assert receiver.of("p2") == [] and receiver.of("vendor-other") == []
    assert await deliveries(client, world, "p2", ids["p2"]) == []

    # Every request verified with the endpoint's secret; the payload carries what a
    # receiver needs; each transition arrived once per endpoint.
    for name in ("p1", "vendor", "ops", "p1-cancelled"):
        got = receiver.of(name)
        assert got and all(g.verified_with == [0] for g in got)
        ids_seen = [g.headers["webhook-id"] for g in got]
        assert len(ids_seen) == len(set(ids_seen))
        for g in got:
            event = g.event
            assert set(event) == {"type", "timestamp", "data"}
            if event["type"].startswith("reservation."):
                assert all(event["data"].get(f) is not None for f in TENANT_FIELDS
                           if not (f == "expiresAt" and event["type"] in (
                               "reservation.committed", "reservation.cancelled"))), event
                assert event["data"]["partnerId"] == "p1"
                assert event["data"]["vendorId"] == "v-confirm"
    [cancelled] = [g.event for g in receiver.of("p1") if g.event["type"] == "booking.cancelled"]
    data = cancelled["data"]
    assert all(data.get(f) is not None for f in TENANT_FIELDS if f != "expiresAt"), data
    assert (data["reservationId"], data["state"], data["fromState"]) == (
        r1, "CANCELLED", "COMMITTED")
    assert (data["bookingId"], data["cancelledBy"], data["reason"]) == (
        booking[0], "partner", "plans changed")
    assert (data["requesterRefundAmount"], data["vendorRefundAmount"]) == (0, 0)
    assert (data["partnerId"], data["vendorId"]) == ("p1", "v-confirm")
    for name in ("vendor", "ops"):
        assert [g.event["data"]["reservationId"] for g in receiver.of(name)
                if g.event["type"] == "booking.cancelled"] == [r1]
    r = await client.get(f"/v1/reservations/{r1}", headers=world.auth("p1"))
    assert (r.json()["state"], r.json()["bookingId"]) == ("CANCELLED", booking[0])
    manual = [g.event for g in receiver.of("ops") if g.event["type"] == "hold.manually_released"]
    assert [m["data"]["reservationId"] for m in manual] == [r3]
    assert manual[0]["data"]["reason"] == "double entry"
    assert manual[0]["data"]["releasedBy"]["actor"] == "ops"
    [bulk] = [g.event for g in receiver.of("ops") if g.event["type"] == "hold.bulk_released"]
    assert sorted(bulk["data"]["reservationIds"]) == sorted([r4, r5])
    assert bulk["data"]["reason"] == "room closed"

    # Order per reservation: versions strictly increase at every endpoint.
    for name in ("p1", "vendor", "ops"):
        last: dict[str, int] = {}
        for g in receiver.of(name):
            data = g.event["data"]
            if "version" in data and "reservationId" in data and data.get("state"):
                key = (data["reservationId"], g.event["type"].startswith("hold."))
                assert last.get(key, 0) < data["version"], (name, g.event)
                last[key] = data["version"]


async def test_500_twice_then_200_is_one_delivery_three_attempts(client, world, receiver,
                                                                 worker_loops):
    eid = await register(client, world, receiver, "p1", "flaky", ["reservation.created"])
    receiver.script["flaky"] = [(500, {}, 0), (503, {}, 0)]
    r = await client.post("/v1/reservations", json=create_body(), headers=world.auth("p1"))
    assert r.status_code == 201
    [d] = await settled(client, world, "p1", eid, 1)
    assert d["status"] == "delivered" and d["attempts"] == 3 and d["lastStatusCode"] == 200
    assert d["type"] == "reservation.created" and d["lastLatencyMs"] is not None
    got = receiver.of("flaky")
    assert len(got) == 3
    assert {g.headers["webhook-id"] for g in got} == {d["webhookId"]}
    assert all(g.verified_with == [0] for g in got)
    # the schedule (0.2 s, then 0.5 s, jitter 10%) spaced them at least that far
    assert got[1].at - got[0].at >= 0.17 and got[2].at - got[1].at >= 0.44


async def test_a_final_4xx_is_not_retried_and_manual_retry_sends_again(client, world,
                                                                       receiver, worker_loops):
    eid = await register(client, world, receiver, "p1", "gone", ["reservation.created"])
    receiver.script["gone"] = [(410, {}, 0)]
    await client.post("/v1/reservations", json=create_body(), headers=world.auth("p1"))
    [d] = await settled(client, world, "p1", eid, 1)
    assert d["status"] == "failed" and d["attempts"] == 1 and d["lastStatusCode"] == 410
    r = await client.post(f"/v1/webhook-endpoints/{eid}/deliveries/{d['deliveryId']}/retry",
                          headers=world.auth("p1"))
    assert r.status_code == 202, r.text
    [d2] = await settled(client, world, "p1", eid, 1)
    assert d2["status"] == "delivered" and d2["attempts"] == 2
    assert [g.headers["webhook-id"] for g in receiver.of("gone")] == [d["webhookId"]] * 2
    # someone else's delivery id, or an unknown one: 404, nothing sent
    r = await client.post(f"/v1/webhook-endpoints/{eid}/deliveries/dlv_nope/retry",
                          headers=world.auth("p1"))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "WEBHOOK_DELIVERY_NOT_FOUND"
    r = await client.post(f"/v1/webhook-endpoints/{eid}/deliveries/{d['deliveryId']}/retry",
                          headers=world.auth("p2"))
    assert r.status_code == 404


async def test_a_hanging_receiver_times_out_and_is_retried(client, world, receiver,
                                                           worker_loops):
    eid = await register(client, world, receiver, "p1", "slow", ["reservation.created"])
    receiver.script["slow"] = [(200, {}, 30)]  # answers after 30 s: the 1 s timeout fires
    await client.post("/v1/reservations", json=create_body(), headers=world.auth("p1"))
    [d] = await settled(client, world, "p1", eid, 1)
    assert d["status"] == "delivered" and d["attempts"] == 2
    got = receiver.of("slow")
    assert len(got) == 2 and got[0].headers["webhook-id"] == got[1].headers["webhook-id"]
    # the second attempt came after the timeout (1 s) and the first delay (0.2 s)
    assert got[1].at - got[0].at >= 1.0


async def test_retry_after_is_honoured(client, world, receiver, worker_loops):
    eid = await register(client, world, receiver, "p1", "busy", ["reservation.created"])
    receiver.script["busy"] = [(429, {"Retry-After": "2"}, 0)]
    await client.post("/v1/reservations", json=create_body(), headers=world.auth("p1"))
    [d] = await settled(client, world, "p1", eid, 1)
    assert d["status"] == "delivered" and d["attempts"] == 2
    got = receiver.of("busy")
    assert got[1].at - got[0].at >= 1.9  # not the schedule's 0.2 s


async def test_dead_after_the_schedule_and_the_endpoint_is_flagged(client, world, receiver,
                                                                   worker_loops):
    eid = await register(client, world, receiver, "p1", "down", ["reservation.created"])
    receiver.script["down"] = [(502, {}, 0)] * 10
    await client.post("/v1/reservations", json=create_body(), headers=world.auth("p1"))
    [d] = await settled(client, world, "p1", eid, 1)
    assert d["status"] == "dead" and d["attempts"] == 4  # 3 delays: 4 attempts
    assert len(receiver.of("down")) == 4
    r = await client.get(f"/v1/webhook-endpoints/{eid}", headers=world.auth("p1"))
    assert r.json()["flagged"] is True and r.json()["failingSince"] is not None
    assert r.json()["disabled"] is False  # failing for less than 3 days


async def test_rotation_signs_with_both_secrets(client, world, receiver, worker_loops):
    eid = await register(client, world, receiver, "p1", "rot", ["reservation.created"])
    r = await client.post(f"/v1/webhook-endpoints/{eid}/rotate-secret",
                          headers=world.auth("p1"))
    receiver.secrets["rot"].append(r.json()["secret"])
    await client.post("/v1/reservations", json=create_body(), headers=world.auth("p1"))
    await settled(client, world, "p1", eid, 1)
    [got] = receiver.of("rot")
    assert got.verified_with == [0, 1]  # the old and the new secret both verify
    assert len(got.headers["webhook-signature"].split(" ")) == 2


async def test_test_route_sends_a_signed_ping(client, world, receiver, worker_loops):
    eid = await register(client, world, receiver, "vendor", "pinged", ["reservation.expired"])
    r = await client.post(f"/v1/webhook-endpoints/{eid}/test", headers=world.auth("vendor"))
    assert r.status_code == 202, r.text
    [d] = await settled(client, world, "vendor", eid, 1)
    assert d["type"] == "ping" and d["status"] == "delivered"
    [got] = receiver.of("pinged")
    assert got.event["type"] == "ping" and got.verified_with == [0]
    assert got.event["data"]["endpointId"] == eid


async def test_a_dead_endpoint_does_not_hold_back_another(client, world, receiver, app,
                                                          migrated):
    # Few slots and a timeout longer than the test's patience: only the per-endpoint cap
    # lets the live endpoint through while the dead one's attempts hang.
    loops = Loops(app, migrated.replace(webhook_concurrency=6, webhook_endpoint_concurrency=3,
                                        webhook_timeout_ms=600_000))
    try:
        await _dead_beside_live(client, world, receiver, app)
    finally:
        await loops.close()


async def _dead_beside_live(client, world, receiver, app):
    dead = await register(client, world, receiver, "p1", "dead", ["reservation.created"])
    live = await register(client, world, receiver, "p2", "live", ["reservation.created"])
    receiver.hang.add("dead")  # never answers: every attempt runs into the timeout
    for i in range(12):
        for partner in ("p1", "p2"):
            vendor = "v-confirm" if partner == "p1" else "v-other"
            r = await client.post("/v1/reservations", json=create_body(vendor, start=60 * i),
                                  headers=world.auth(partner))
            assert r.status_code == 201, r.text
    found = await settled(client, world, "p2", live, 12)
    assert all(d["status"] == "delivered" for d in found)
    # meanwhile the hanging endpoint has delivered nothing, and the commit queue recorded
    # everything
    dead_found = await deliveries(client, world, "p1", dead)
    assert not any(d["status"] == "delivered" for d in dead_found)
    async with app.state.services.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM reservations") == 24


async def test_failing_past_the_limit_disables_and_tells_the_owner(client, world, receiver,
                                                                   app, migrated):
    # Disable after 0 s of failing: the first failure disables (the default is 3 days).
    loops = Loops(app, migrated.replace(webhook_disable_after_s=0))
    try:
        broken = await register(client, world, receiver, "p1", "broken",
                                ["reservation.created"])
        other = await register(client, world, receiver, "p1", "other",
                               ["webhook_endpoint.disabled"])
        receiver.script["broken"] = [(500, {}, 0)] * 10
        await client.post("/v1/reservations", json=create_body(), headers=world.auth("p1"))
        [d] = await settled(client, world, "p1", other, 1)
        assert d["type"] == "webhook_endpoint.disabled" and d["status"] == "delivered"
        [note] = receiver.of("other")
        assert note.event["data"]["endpointId"] == broken and note.verified_with == [0]
        r = await client.get(f"/v1/webhook-endpoints/{broken}", headers=world.auth("p1"))
        assert r.json()["disabled"] is True
        assert r.json()["disabledReason"].startswith("failing since")
        # its pending delivery is not attempted any more; re-enabling resumes it
        assert len(receiver.of("broken")) == 1
        receiver.script["broken"].clear()
        r = await client.patch(f"/v1/webhook-endpoints/{broken}", headers=world.auth("p1"),
                               json={"disabled": False})
        assert r.json()["disabled"] is False and r.json()["failingSince"] is None
        [d] = await settled(client, world, "p1", broken, 1)
        assert d["status"] == "delivered" and d["attempts"] == 2
    finally:
        await loops.close()
