"""Issue 17: partner-readable details. A conflict names the interval in ISO times (and the
holder only when it is the caller's own), integral numbers are integers, and an extension
that cannot move the deadline later is a 409 that spends nothing."""

from __future__ import annotations

from engine.times import parse_time
from tests.conftest import snapshot
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    api_settings,
    app,
    at,
    client,
    create_body,
    migrated,
    world,
)
from tests.test_modify import drain


async def test_a_conflict_names_the_interval_and_only_an_own_holder(client, world):
    r = await client.post("/v1/reservations", json=create_body("v-confirm"),
                          headers=world.auth("p1"))
    assert r.status_code == 201
    mine = r.json()["reservationId"]
    # v-confirm has a 15-minute buffer after: the hold blocks [09:00, 09:45).
    for who, start in (("p2", 15), ("p2", 30), ("p1", 15), ("system", 0)):
        r = await client.post("/v1/reservations", json=create_body("v-confirm", start=start),
                              headers=world.auth(who))
        assert r.status_code == 409, r.text
        details = r.json()["error"]["details"]
        assert details["conflictingStart"] == at(0) == "2030-01-01T09:00:00Z"
        assert details["conflictingEnd"] == at(45)
        assert details["booked"] is False and details["resourceId"] == "v-confirm"
        assert "conflictingUnit" not in details
        if who == "p2":
            assert "conflictingReservationId" not in details
        else:  # the caller's own reservation, or a key that sees every tenant
            assert details["conflictingReservationId"] == mine


async def test_a_booked_conflict_and_a_move(app, client, world):
    r = await client.post("/v1/reservations", json=create_body("v-instant", start=60),
                          headers=world.auth("p1"))
    rid = r.json()["reservationId"]
    assert (await client.post(f"/v1/reservations/{rid}/commit",
                              headers=world.auth("p1"))).status_code == 202
    await drain(app.state.services)
    await drain(app.state.services)
    r = await client.post("/v1/reservations", json=create_body("v-instant", start=75),
                          headers=world.auth("p2"))
    assert r.status_code == 409
    details = r.json()["error"]["details"]
    assert details["booked"] is True
    assert (details["conflictingStart"], details["conflictingEnd"]) == (at(60), at(90))
    assert "conflictingReservationId" not in details
    # A move onto it: the same details.
    r = await client.post("/v1/reservations", json=create_body("v-instant", start=180),
                          headers=world.auth("p2"))
    other = r.json()["reservationId"]
    r = await client.post(f"/v1/reservations/{other}/modify",
                          json={"slotStartTime": at(60), "slotEndTime": at(90)},
                          headers=world.auth("p2"))
    assert r.status_code == 409
    assert r.json()["error"]["details"]["conflictingStart"] == at(60)


async def test_integral_numbers_are_integers(client, world):
    r = await client.post("/v1/reservations",
                          json={**create_body("v-confirm"), "slotStartTime": at(7),
                                "slotEndTime": at(37)}, headers=world.auth("p1"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "SLOT_NOT_ALIGNED"
    assert b'"unitMinutes":15' in r.content and b"15.0" not in r.content
    assert type(r.json()["error"]["details"]["unitMinutes"]) is int


async def test_an_extension_that_moves_nothing_is_409_and_spends_nothing(app, client, world,
                                                                        redis):
    settings = app.state.services.settings
    r = await client.post("/v1/reservations", json=create_body("v-confirm"),
                          headers=world.auth("p1"))
    rid = r.json()["reservationId"]
    before_read = (await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))).json()
    before = await snapshot(redis, settings.key_prefix)
    # The hold TTL is 60 s: 1 s from now is not later than the deadline.
    for ttl in (1_000, 2_000, 30_000):
        r = await client.post(f"/v1/reservations/{rid}/extend", json={"ttlMs": ttl},
                              headers=world.auth("p1"))
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "EXTEND_NOT_LATER"
        assert error["details"]["expiresAt"] == before_read["expiresAt"]
        # as instants: a whole second renders without a fraction and sorts wrong as text
        assert (parse_time(error["details"]["requestedExpiresAt"], "requested")
                < parse_time(before_read["expiresAt"], "expiresAt"))
    after = await snapshot(redis, settings.key_prefix)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert all(k.endswith(":rate") for k in changed), changed  # only the rate limiter
    assert (await client.get(f"/v1/reservations/{rid}",
                             headers=world.auth("p1"))).json() == before_read
    # Every one of the allowed extensions is still there.
    deadline = before_read["expiresAt"]
    for i in range(settings.max_extensions):
        r = await client.post(f"/v1/reservations/{rid}/extend",
                              json={"ttlMs": 120_000 + 10_000 * i}, headers=world.auth("p1"))
        assert r.status_code == 200, (i, r.text)
        assert parse_time(r.json()["expiresAt"], "expiresAt") > parse_time(deadline, "deadline")
        deadline = r.json()["expiresAt"]
    r = await client.post(f"/v1/reservations/{rid}/extend", json={"ttlMs": 600_000},
                          headers=world.auth("p1"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "EXTENSION_LIMIT"
