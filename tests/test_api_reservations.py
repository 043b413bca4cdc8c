"""The reservation routes over HTTP against real Redis and Postgres: creation, reads, every
action, CAS, conflicts, terminal reads from Postgres, availability, request ids."""

from __future__ import annotations

import asyncio

from engine.store import commit as store_commit
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    T0,
    api_settings,
    app,
    at,
    client,
    create_body,
    migrated,
    world,
)


async def test_create_read_confirm_commit(client, world):
    r = await client.post("/v1/reservations", json=create_body(metadata={"note": "x"}),
                          headers={**world.auth("p1"), "X-Request-Id": "req-abc"})
    assert r.status_code == 201, r.text
    assert r.headers["x-request-id"] == "req-abc"
    created = r.json()
    assert created["state"] == "AWAITING_VENDOR_CONFIRMATION"
    assert created["vendorConfirmationRequired"] is True
    assert created["expiresAt"].endswith("Z")
    rid = created["reservationId"]

    r = await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))
    assert r.status_code == 200
    view = r.json()
    assert view["slotStartTime"] == T0 and view["slotEndTime"] == at(30)
    assert view["vendorId"] == "v-confirm" and view["resourceId"] == "v-confirm"
    assert [h["toState"] for h in view["stateHistory"]] == ["HELD",
                                                           "AWAITING_VENDOR_CONFIRMATION"]
    first = view["stateHistory"][0]
    assert first["fromState"] == "INTENT_CREATED" and first["triggeredBy"] == "partner"
    assert first["metadata"] == {"requestId": "req-abc", "note": "x"}

    # The vendor confirms; payment is waived, so it walks to AUTHORIZED_BOTH.
    r = await client.post(f"/v1/reservations/{rid}/vendor-confirmation",
                          headers={**world.auth("vendor"), "If-Match": str(view["version"])})
    assert r.status_code == 200, r.text
    confirmed = r.json()
    assert confirmed["state"] == "AUTHORIZED_BOTH"
    assert confirmed["stateHistory"][2]["triggeredBy"] == "vendor"

    # A stale version is a 412; the current one commits (202, in progress).
    r = await client.post(f"/v1/reservations/{rid}/commit",
                          headers={**world.auth("p1"), "If-Match": str(view["version"])})
    assert r.status_code == 412 and r.json()["error"]["code"] == "VERSION_MISMATCH"
    r = await client.post(f"/v1/reservations/{rid}/commit",
                          headers={**world.auth("p1"), "If-Match": f'"{confirmed["version"]}"'})
    assert r.status_code == 202 and r.json()["state"] == "COMMIT_IN_PROGRESS"
    # Nothing can cancel a commit under way.
    r = await client.post(f"/v1/reservations/{rid}/cancel", headers=world.auth("p1"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "COMMIT_IN_PROGRESS"


async def test_instant_vendor_and_authorization_outcomes(client, world):
    r = await client.post("/v1/reservations", json=create_body("v-instant"),
                          headers=world.auth("p1"))
    assert r.status_code == 201
    assert r.json()["state"] == "AUTHORIZED_BOTH"
    assert r.json()["vendorConfirmationRequired"] is False
    rid = r.json()["reservationId"]
    # Payment is waived: the authorization steps are already passed.
    r = await client.post(f"/v1/reservations/{rid}/requester-authorization",
                          json={"outcome": "failed"}, headers=world.auth("p1"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "INVALID_TRANSITION"
    r = await client.post(f"/v1/reservations/{rid}/requester-authorization",
                          json={"outcome": "maybe"}, headers=world.auth("p1"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_OUTCOME"


async def test_payment_vendor_refused_at_creation(client, world):
    r = await client.post("/v1/reservations", json=create_body("v-paid"),
                          headers=world.auth("p1"))
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "PAYMENT_PROVIDER_UNAVAILABLE"


async def test_conflict_names_the_slot_not_the_other_tenant(client, world):
    r = await client.post("/v1/reservations", json=create_body(), headers=world.auth("p1"))
    assert r.status_code == 201
    r = await client.post("/v1/reservations", json=create_body(start=15),
                          headers=world.auth("p2"))
    assert r.status_code == 409
    err = r.json()["error"]
    assert err["code"] == "SLOT_UNAVAILABLE" and err["retryable"] is False
    assert err["retryAfter"] is None
    assert err["details"]["resourceId"] == "v-confirm" and err["details"]["booked"] is False
    assert "conflictingReservationId" not in err["details"]
    # The 15-minute buffer after the first slot blocks [30, 45); 45 is free.
    r = await client.post("/v1/reservations", json=create_body(start=30),
                          headers=world.auth("p2"))
    assert r.status_code == 409
    r = await client.post("/v1/reservations", json=create_body(start=45),
                          headers=world.auth("p2"))
    assert r.status_code == 201


async def test_cancel_extend_and_terminal(client, world):
    r = await client.post("/v1/reservations", json=create_body(), headers=world.auth("p1"))
    rid = r.json()["reservationId"]
    r = await client.post(f"/v1/reservations/{rid}/extend", json={"ttlMs": 120_000},
                          headers=world.auth("p1"))
    assert r.status_code == 200, r.text
    r = await client.post(f"/v1/reservations/{rid}/cancel", json={"reason": "changed mind"},
                          headers=world.auth("vendor"))
    assert r.status_code == 200
    assert r.json()["state"] == "CANCELLED"
    assert r.json()["stateHistory"][-1]["reason"] == "changed mind"
    for action in ("cancel", "extend", "commit"):
        r = await client.post(f"/v1/reservations/{rid}/{action}", headers=world.auth("p1"))
        assert r.status_code == 409 and r.json()["error"]["code"] == "RESERVATION_TERMINAL"
    # The slot is free again.
    r = await client.post("/v1/reservations", json=create_body(), headers=world.auth("p2"))
    assert r.status_code == 201


async def test_terminal_reservation_readable_from_postgres(app, client, world, redis):
    svc = app.state.services
    r = await client.post("/v1/reservations", json=create_body(), headers=world.auth("p1"))
    rid = r.json()["reservationId"]
    await client.post(f"/v1/reservations/{rid}/cancel", headers=world.auth("p1"))
    # Drain the shard's stream into Postgres as the commit-queue worker does.
    shard = svc.keyspace.shard_of_id(rid)
    entries = await redis.xrange(svc.keyspace.events(shard))
    async with svc.pool.acquire() as conn:
        await store_commit.apply_events(conn, [fields for _, fields in entries])
    # Redis forgets the record (retention passed).
    await redis.delete(svc.keyspace.reservation(rid), svc.keyspace.history(rid))
    r = await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["state"] == "CANCELLED"
    assert [h["toState"] for h in view["stateHistory"]][-1] == "CANCELLED"
    assert (await client.get(f"/v1/reservations/{rid}", headers=world.auth("p2"))
            ).status_code == 404
    r = await client.post(f"/v1/reservations/{rid}/cancel", headers=world.auth("p1"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "RESERVATION_TERMINAL"


async def test_expired_hold_answers_reservation_expired(app, client, world, redis):
    from engine.times import parse_time
    from tests.timing import until_server_ms

    svc = app.state.services
    svc.reservations.engine.settings = svc.settings.replace(authorized_ttl_ms=200)
    try:
        r = await client.post("/v1/reservations", json=create_body("v-instant"),
                              headers=world.auth("p1"))
    finally:
        svc.reservations.engine.settings = svc.settings
    rid = r.json()["reservationId"]
    # Past the deadline the server returned, by the server's clock (not a guessed sleep).
    await until_server_ms(redis, parse_time(r.json()["expiresAt"], "expiresAt") + 1)
    r = await client.post(f"/v1/reservations/{rid}/commit", headers=world.auth("p1"))
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] in ("RESERVATION_EXPIRED", "HOLD_LOST")


async def test_availability_reports_held_and_buffers(client, world):
    await client.post("/v1/reservations", json=create_body(start=60),
                      headers=world.auth("p1"))
    r = await client.get("/v1/vendors/v-confirm/availability",
                         params={"startTime": T0, "endTime": at(180), "slotDuration": "30",
                                 "includeConfidence": "true", "resourceId": "v-confirm"},
                         headers=world.auth("p2"))
    assert r.status_code == 200, r.text
    body = r.json()
    slots = {s["startTime"]: s for s in body["slots"]}
    assert len(slots) == 6
    assert slots[at(60)]["status"] == "held" and not slots[at(60)]["isAvailable"]
    assert slots[at(60)]["confidence"] == 0.0 and slots[at(60)]["reasons"] == ["held"]
    # [30, 60) is free but a hold of it would need the buffer unit [60, 75) (issue 13's
    # vocabulary: "buffer", confidence 0.8).
    assert slots[at(30)]["status"] == "free" and not slots[at(30)]["isAvailable"]
    assert slots[at(30)]["reasons"] == ["buffer"] and slots[at(30)]["confidence"] == 0.8
    assert slots[at(0)]["isAvailable"] and slots[at(0)]["confidence"] == 1.0
    assert slots[at(0)]["reasons"] == []
    # With no resourceId the vendor's two resources are one union: room2 is free.
    r = await client.get("/v1/vendors/v-confirm/availability",
                         params={"startTime": T0, "endTime": at(180), "slotDuration": "30"},
                         headers=world.auth("p2"))
    assert r.status_code == 200, r.text
    union = {s["startTime"]: s for s in r.json()["slots"]}
    assert r.json()["resourceIds"] == ["v-confirm", "v-confirm-room2"]
    assert union[at(60)]["isAvailable"] and union[at(60)]["resourceIds"] == ["v-confirm-room2"]
    assert union[at(0)]["resourceIds"] == ["v-confirm", "v-confirm-room2"]
    # [90, 120) needs [90, 135) free: the hold [60, 105) (buffer included) touches it.
    assert slots[at(120)]["isAvailable"]
    assert body["metadata"]["confidenceThreshold"] == 0.5
    r = await client.get("/v1/vendors/v-confirm/availability",
                         params={"startTime": T0, "endTime": at(180)},
                         headers=world.auth("vendor-other"))
    assert r.status_code == 404


async def test_request_id_reaches_the_logs_and_503s(app, client, world, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="slotguard")
    logging.getLogger("slotguard.api").warning("outside any request")
    await app.state.services.pool.close()  # Postgres stops answering this process
    missing = "rsv_0_01ARZ3NDEKTSV4RRFFQ69G5FAV"
    r = await client.get(f"/v1/reservations/{missing}",
                         headers={**world.auth("p1"), "X-Request-Id": "trace-77"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "SERVICE_UNAVAILABLE" and r.json()["error"]["retryable"]
    assert [rec.request_id for rec in caplog.records] == ["-", "trace-77"]
    # A generated id when the client sends none (or an unusable one).
    r = await client.get("/health/live", headers={"X-Request-Id": "bad id with spaces"})
    assert len(r.headers["x-request-id"]) == 32


async def test_union_availability_sees_a_resource_another_process_adds(app, client, world):
    """A vendor this process already knows gains a resource in Postgres (the CLI, another
    API worker): the union answer lists it once the vendor's list is older than the catalog's
    freshness bound, never only after a restart."""
    from engine import clock, directory
    from engine.catalog_cache import NEGATIVE_TTL_S
    from engine.clock import ManualClock
    from tests.test_api_fixtures import T0_MS

    params = {"startTime": T0, "endTime": at(60), "slotDuration": "30"}
    with clock.use(ManualClock(T0_MS - 86_400_000)) as fake:
        r = await client.get("/v1/vendors/v-confirm/availability", params=params,
                             headers=world.auth("p2"))
        assert r.status_code == 200, r.text
        assert r.json()["resourceIds"] == ["v-confirm", "v-confirm-room2"]
        async with app.state.services.pool.acquire() as conn:
            await directory.create_resource(conn, "v-confirm-room3", "v-confirm")
        fake.advance(NEGATIVE_TTL_S)
        r = await client.get("/v1/vendors/v-confirm/availability", params=params,
                             headers=world.auth("p2"))
        assert r.status_code == 200, r.text
        assert r.json()["resourceIds"] == ["v-confirm", "v-confirm-room2", "v-confirm-room3"]
        assert r.json()["slots"][0]["resourceIds"] == [
            "v-confirm", "v-confirm-room2", "v-confirm-room3"]
