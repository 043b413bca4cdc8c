"""Redis round trips per route, counted on the access layer's batches (every script call goes
through it; one batch is one write and one read on the wire). The counts are those of
docs/architecture.md: a create 2, a transition 1 plus the rate limits' 1, a read 1. The cap
and idempotency bookkeeping that a response does not wait for is queued and goes out in a
batch of its own afterwards; it is listed apart."""

from __future__ import annotations

import pytest

from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    api_settings,
    app,
    client,
    create_body,
    migrated,
    world,
)

# Calls a response never waits for (queued after the answer is known).
QUEUED = {"idempotency_complete", "idempotency_abandon", "cap_release", "cap_touch"}


@pytest.fixture
def batches(app):
    """Every batch the app's access layer sends, as the sorted names of its scripts."""
    access = app.state.services.access
    sent: list[tuple[str, ...]] = []
    send = access._send  # noqa: SLF001  (instrumented, not replaced: the real batch goes out)

    async def counting(batch, *lane):  # the lane: the cluster node (None on one Redis)
        sent.append(tuple(sorted(script.name for script, *_ in batch)))
        return await send(batch, *lane)

    access._send = counting  # noqa: SLF001
    yield sent
    access._send = send  # noqa: SLF001


async def settle(app) -> None:
    """Wait until the queued bookkeeping has been answered (FIFO on the access layer)."""
    access = app.state.services.access
    keys = app.state.services.keyspace
    await access.call("partner_usage", [keys.partner_holds("p1"),
                                        keys.partner_reputation("p1")], [])


def split(sent: list[tuple[str, ...]]) -> tuple[list, list]:
    """(batches a response waited for, queued bookkeeping); settle()'s own call removed."""
    sent = [tuple(n for n in b if n != "partner_usage") for b in sent]
    awaited = [b for b in sent if b and not set(b) <= QUEUED]
    queued = [b for b in sent if b and set(b) <= QUEUED]
    return awaited, queued


async def test_round_trips_per_route(app, client, world, batches):
    p1 = world.auth("p1")

    async def count(call):
        await settle(app)
        batches.clear()
        response = await call()
        await settle(app)
        return response, *split(batches)

    r, awaited, queued = await count(lambda: client.post(
        "/v1/reservations", json=create_body(start=0), headers=p1))
    assert r.status_code == 201
    assert awaited == [("cap_acquire", "rate_limit", "rate_limit"), ("create_reservation",)]
    assert queued == []
    rid = r.json()["reservationId"]

    r, awaited, queued = await count(lambda: client.post(
        "/v1/reservations", json=create_body(start=60),
        headers={**p1, "Idempotency-Key": "rt-1"}))
    assert r.status_code == 201
    assert awaited == [("cap_acquire", "idempotency_begin", "rate_limit", "rate_limit"),
                       ("create_reservation",)]
    assert queued == [("idempotency_complete",)]

    # A conflict gives its cap slot back without the response waiting for it.
    r, awaited, queued = await count(lambda: client.post(
        "/v1/reservations", json=create_body(start=0), headers=p1))
    assert r.status_code == 409
    assert awaited == [("cap_acquire", "rate_limit", "rate_limit"), ("create_reservation",)]
    assert queued == [("cap_release",)]

    r, awaited, queued = await count(lambda: client.get(f"/v1/reservations/{rid}",
                                                        headers=p1))
    assert r.status_code == 200
    assert awaited == [("rate_limit", "rate_limit", "read_reservation")]

    r, awaited, queued = await count(lambda: client.get(
        "/v1/vendors/v-confirm/availability",
        params={"startTime": create_body()["slotStartTime"],
                "endTime": create_body(start=120)["slotStartTime"],
                "resourceId": "v-confirm"}, headers=p1))
    assert r.status_code == 200, r.text
    assert awaited == [("rate_limit", "rate_limit", "read_units")]
    # Issue 13: the union over the vendor's two resources is still one round trip (the
    # rules' published revision comes back with each resource's units).
    r, awaited, queued = await count(lambda: client.get(
        "/v1/vendors/v-confirm/availability",
        params={"startTime": create_body()["slotStartTime"],
                "endTime": create_body(start=120)["slotStartTime"]}, headers=p1))
    assert r.status_code == 200, r.text
    assert r.json()["resourceIds"] == ["v-confirm", "v-confirm-room2"]
    assert awaited == [("rate_limit", "rate_limit", "read_units", "read_units")]

    r, awaited, queued = await count(lambda: client.post(
        f"/v1/reservations/{rid}/vendor-confirmation", json={},
        headers=world.auth("vendor")))
    assert r.status_code == 200 and r.json()["state"] == "AUTHORIZED_BOTH"
    assert awaited == [("rate_limit", "rate_limit"), ("transition",)]
    assert queued == [("cap_touch",)]

    r, awaited, queued = await count(lambda: client.post(f"/v1/reservations/{rid}/cancel",
                                                         json={}, headers=p1))
    assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
    assert awaited == [("rate_limit", "rate_limit"), ("transition",)]
    assert queued == [("cap_release",)]


async def test_a_transition_without_rate_limits_is_one_round_trip(app, client, world, batches):
    services = app.state.services
    r = await client.post("/v1/reservations", json=create_body(start=0),
                          headers=world.auth("p1"))
    rid = r.json()["reservationId"]
    limits = services.reservations.limits
    original = limits.settings
    limits.settings = original.replace(partner_rate_per_minute=0, ip_rate_per_minute=0)
    try:
        await settle(app)
        batches.clear()
        r = await client.post(f"/v1/reservations/{rid}/cancel", json={},
                              headers=world.auth("p1"))
        assert r.status_code == 200
        await settle(app)
        assert split(batches)[0] == [("transition",)]
    finally:
        limits.settings = original


async def test_commit_answers_the_state_its_own_transition_wrote(app, client, world):
    """202 COMMIT_IN_PROGRESS with the version the commit wrote, even when the record has
    moved on before the response is rendered (here: finalized by the engine at once, as a
    quick worker would)."""
    services = app.state.services
    r = await client.post("/v1/reservations", json=create_body(vendor="v-instant", start=0),
                          headers=world.auth("p1"))
    assert r.json()["state"] == "AUTHORIZED_BOTH"
    rid = r.json()["reservationId"]
    engine = services.reservations.engine
    act = engine.act

    async def commit_then_finalize(reservation_id, action, **kwargs):
        moved = await act(reservation_id, action, **kwargs)
        if action == "commit":  # a worker finishing the commit before the response renders
            await act(reservation_id, "finalize-commit", actor="system", booking_id="b-1")
        return moved

    engine.act = commit_then_finalize
    try:
        r = await client.post(f"/v1/reservations/{rid}/commit", json={},
                              headers=world.auth("p1"))
    finally:
        engine.act = act
    assert r.status_code == 202
    body = r.json()
    assert body["state"] == "COMMIT_IN_PROGRESS"
    assert body["stateHistory"][-1]["toState"] == "COMMIT_IN_PROGRESS"
    assert body["version"] == body["stateHistory"][-1]["version"]
    got = await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))
    assert got.json()["state"] == "COMMITTED"  # it did move on; the answer did not follow
