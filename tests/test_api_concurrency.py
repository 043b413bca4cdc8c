"""Idempotency over HTTP (replays, mismatches, concurrent duplicates), contention for one
slot, rate limits and caps with Retry-After, readiness, ops release, bulk release, audit."""

from __future__ import annotations

import asyncio
import collections

import httpx

from engine.store import commit as store_commit
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    api_settings,
    app,
    at,
    client,
    create_body,
    migrated,
    world,
)


async def test_idempotent_replay_and_mismatch(client, world):
    headers = {**world.auth("p1"), "Idempotency-Key": "order-42"}
    first = await client.post("/v1/reservations", json=create_body(), headers=headers)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    # The same body in another key order and with the key in the body too: a replay.
    again = await client.post("/v1/reservations", headers=world.auth("p1"), json={
        "requesterId": "req-1", "slotEndTime": at(30), "slotStartTime": at(0),
        "vendorId": "v-confirm", "idempotencyKey": "order-42"})
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    # Same key, different request.
    r = await client.post("/v1/reservations", json=create_body(start=60), headers=headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "IDEMPOTENCY_KEY_MISMATCH"
    # Another partner's key space is its own.
    r = await client.post("/v1/reservations", json=create_body(start=120),
                          headers={**world.auth("p2"), "Idempotency-Key": "order-42"})
    assert r.status_code == 201


async def test_a_conflict_is_replayed_too(client, world):
    await client.post("/v1/reservations", json=create_body(), headers=world.auth("p2"))
    headers = {**world.auth("p1"), "Idempotency-Key": "k-conflict"}
    r1 = await client.post("/v1/reservations", json=create_body(), headers=headers)
    r2 = await client.post("/v1/reservations", json=create_body(), headers=headers)
    assert r1.status_code == r2.status_code == 409
    assert r2.headers["idempotent-replayed"] == "true" and r2.content == r1.content


async def test_concurrent_duplicates_make_one_reservation(client, world):
    headers = {**world.auth("p1"), "Idempotency-Key": "dup-1"}
    replies = await asyncio.gather(*[
        client.post("/v1/reservations", json=create_body(), headers=headers)
        for _ in range(50)])
    statuses = collections.Counter(r.status_code for r in replies)
    assert set(statuses) <= {201, 409}, statuses
    created = {r.json()["reservationId"] for r in replies if r.status_code == 201}
    assert len(created) == 1
    for r in replies:
        if r.status_code == 409:
            err = r.json()["error"]
            assert err["code"] == "IDEMPOTENCY_KEY_IN_PROGRESS" and err["retryable"]
            assert int(r.headers["retry-after"]) >= 1
    # Once done, a retry replays the one reservation.
    r = await client.post("/v1/reservations", json=create_body(), headers=headers)
    assert r.status_code == 201 and r.json()["reservationId"] in created


async def test_200_concurrent_posts_for_one_slot_make_one_winner(client, world):
    async def attempt(i: int) -> httpx.Response:
        partner = "p1" if i % 2 else "p2"
        return await client.post("/v1/reservations",
                                 json={**create_body(start=300), "requesterId": f"req-{i}"},
                                 headers=world.auth(partner))

    replies = await asyncio.gather(*[attempt(i) for i in range(200)])
    statuses = collections.Counter(r.status_code for r in replies)
    assert statuses == {201: 1, 409: 199}, statuses
    assert {r.json()["error"]["code"] for r in replies if r.status_code == 409} == {
        "SLOT_UNAVAILABLE"}


async def test_rate_limit_and_cap_answer_429_with_retry_after(app, client, world):
    svc = app.state.services
    limits = svc.reservations.limits
    original = limits.settings
    limits.settings = original.replace(partner_rate_burst=3, partner_rate_per_minute=60)
    try:
        statuses = [(await client.get("/v1/ops/audit", headers=world.auth("ops"))).status_code
                    for _ in range(5)]
        assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
        r = await client.get("/v1/ops/audit", headers=world.auth("ops"))
        assert r.json()["error"]["code"] == "RATE_LIMITED" and r.json()["error"]["retryable"]
        assert int(r.headers["retry-after"]) == r.json()["error"]["retryAfter"] >= 1
    finally:
        limits.settings = original
    limits.settings = original.replace(partner_max_live_holds=2)
    try:
        codes = [(await client.post("/v1/reservations", json=create_body(start=60 * i),
                                    headers=world.auth("p2"))).status_code for i in range(3)]
        assert codes == [201, 201, 429]
        r = await client.post("/v1/reservations", json=create_body(start=600),
                              headers=world.auth("p2"))
        assert r.json()["error"]["code"] == "HOLD_CAP_EXCEEDED" and "retry-after" in r.headers
        # Another partner is not affected.
        r = await client.post("/v1/reservations", json=create_body(start=600),
                              headers=world.auth("p1"))
        assert r.status_code == 201
    finally:
        limits.settings = original


async def test_readiness_follows_postgres(app, client):
    r = await client.get("/health/ready")
    assert r.status_code == 200 and r.json()["checks"] == {
        "redis": True, "postgres": True, "scripts": True, "rehydrated": True,
        "evictionPolicy": True}
    pool = app.state.services.pool
    await pool.close()  # Postgres no longer answers this process
    r = await client.get("/health/ready")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["details"]["checks"]["postgres"] is False
    assert (await client.get("/health/live")).status_code == 200


async def test_ops_release_bulk_release_and_audit(app, client, world, redis):
    svc = app.state.services
    ids = []
    for i in range(4):
        r = await client.post("/v1/reservations", json=create_body(start=60 * i),
                              headers=world.auth("p1"))
        ids.append(r.json()["reservationId"])
    r = await client.post(f"/v1/ops/reservations/{ids[0]}/release",
                          json={"reason": "vendor closed"}, headers=world.auth("ops"))
    assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
    last = r.json()["stateHistory"][-1]
    assert (last["triggeredBy"], last["reason"]) == ("ops", "vendor closed")
    r = await client.post("/v1/ops/releases", json={"reason": "outage",
                                                     "reservationIds": [ids[1], ids[0]]},
                          headers=world.auth("admin"))
    assert r.status_code == 200
    assert [x["reservationId"] for x in r.json()["released"]] == [ids[1]]
    assert r.json()["failed"][0]["code"] == "RESERVATION_TERMINAL"
    # By resource and range: [120, 240) covers ids[2] and ids[3].
    r = await client.post("/v1/ops/releases", json={
        "reason": "flood", "resourceId": "v-confirm", "startTime": at(120),
        "endTime": at(240)}, headers=world.auth("ops"))
    assert sorted(x["reservationId"] for x in r.json()["released"]) == sorted(ids[2:])
    # The events reach Postgres through the normal path (as the worker drains them).
    events = []
    for shard in range(svc.settings.shards):
        events += [f for _, f in await redis.xrange(svc.keyspace.events(shard))]
    async with svc.pool.acquire() as conn:
        await store_commit.apply_events(conn, events)
    r = await client.get("/v1/ops/audit", params={"reservationId": ids[0]},
                         headers=world.auth("ops"))
    assert r.status_code == 200
    entries = r.json()["entries"]
    assert [e["actor"] for e in entries][-1] == "ops"
    r = await client.get("/v1/ops/audit", params={"actor": "admin", "limit": "10"},
                         headers=world.auth("admin"))
    assert [e["reservationId"] for e in r.json()["entries"]] == [ids[1]]
