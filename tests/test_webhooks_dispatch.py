"""The webhook dispatcher's own mechanics (issue 14, delivery throughput): a notification
from the outbox insert wakes it (not its poll), one endpoint receives attempts of different
reservations concurrently, and private targets are refused when the attempt is made (an
IP literal before it, a host name by the session's resolver when connecting)."""

from __future__ import annotations

import asyncio

import pytest

from engine.webhook_delivery import PRIVATE_REFUSAL, PrivateAddress, PublicResolver
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    app,
    client,
    create_body,
    migrated,
    world,
)
from tests.test_webhooks_delivery import register, settled
from tests.webhook_fixtures import (  # noqa: F401  (fixtures)
    Loops,
    api_settings,
    receiver,
)


async def test_a_new_delivery_wakes_the_dispatcher_without_its_poll(client, world, receiver,
                                                                   app, migrated):
    # A poll interval of 10 minutes: only the NOTIFY of the outbox insert (migration 0016)
    # can make these deliveries go out within the test's patience.
    loops = Loops(app, migrated.replace(webhook_poll_ms=600_000))
    try:
        eid = await register(client, world, receiver, "p1", "woken", ["reservation.created"])
        await asyncio.sleep(0.5)  # the dispatcher's first claim has run and found nothing
        for start in (0, 60):
            r = await client.post("/v1/reservations", json=create_body(start=start),
                                  headers=world.auth("p1"))
            assert r.status_code == 201, r.text
            await settled(client, world, "p1", eid, 1 if start == 0 else 2)
        assert len(receiver.of("woken")) == 2
    finally:
        await loops.close()


async def test_one_endpoint_gets_different_reservations_concurrently(client, world, receiver,
                                                                     app, migrated):
    # The receiver holds every request until it has 3 at once (or 30 s pass): with attempts
    # sent one at a time it would never see more than 1.
    loops = Loops(app, migrated.replace(webhook_timeout_ms=60_000))
    in_flight, seen_max, enough = 0, 0, asyncio.Event()

    async def barrier() -> None:
        nonlocal in_flight, seen_max
        in_flight += 1
        seen_max = max(seen_max, in_flight)
        if in_flight >= 3:
            enough.set()
        try:
            await asyncio.wait_for(enough.wait(), timeout=30)
        except asyncio.TimeoutError:
            pass
        finally:
            in_flight -= 1

    receiver.gate["many"] = barrier
    try:
        eid = await register(client, world, receiver, "p1", "many", ["reservation.created"])
        for i in range(3):
            r = await client.post("/v1/reservations", json=create_body(start=60 * i),
                                  headers=world.auth("p1"))
            assert r.status_code == 201, r.text
        found = await settled(client, world, "p1", eid, 3)
        assert all(d["status"] == "delivered" and d["attempts"] == 1 for d in found)
        assert seen_max == 3
    finally:
        await loops.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_private_target_is_refused_when_sending(client, world, receiver, app,
                                                       migrated, host):
    # Registered where private targets are allowed; the dispatcher runs where they are not
    # (the address a name resolves to may change after registration).
    loops = Loops(app, migrated.replace(webhook_allow_private=False))
    try:
        r = await client.post("/v1/webhook-endpoints", headers=world.auth("p1"), json={
            "url": receiver.url("inside").replace("127.0.0.1", host),
            "events": ["reservation.created"]})
        assert r.status_code == 201, r.text
        eid = r.json()["id"]
        r = await client.post("/v1/reservations", json=create_body(), headers=world.auth("p1"))
        assert r.status_code == 201, r.text
        [d] = await settled(client, world, "p1", eid, 1)
        assert d["status"] == "failed" and d["attempts"] == 1  # final: not retried
        async with app.state.services.pool.acquire() as conn:
            assert await conn.fetchval("SELECT last_error FROM webhook_deliveries "
                                       "WHERE id = $1", d["deliveryId"]) == PRIVATE_REFUSAL
        assert receiver.of("inside") == []
    finally:
        await loops.close()


async def test_the_resolver_refuses_a_name_with_a_private_address():
    with pytest.raises(PrivateAddress):
        await PublicResolver().resolve("localhost", 80)

