"""The webhook dispatcher's own mechanics (issue 14, delivery throughput): a notification
from the outbox insert wakes it (not its poll), one endpoint receives attempts of different
reservations concurrently, private targets are refused when the attempt is made (an IP
literal before it, a host name by the session's resolver when connecting), and a Postgres
restart under it breaks nothing for good (its kept connections are replaced)."""

from __future__ import annotations

import asyncio

import asyncpg
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



async def test_the_dispatcher_outlives_a_postgres_restart(receiver, settings):
    # A Postgres of this test's own, stopped and started again under a running dispatcher:
    # its kept connections (claims, writes) and its LISTEN connection break, and are
    # replaced; deliveries written after the restart still go out.
    import shutil
    import tempfile
    from pathlib import Path

    from engine import db
    from engine.webhook_delivery import Dispatcher
    from engine.webhook_events import emit, payload
    from engine.webhook_service import new_secret
    from tests.test_worker import PrivatePostgres
    from tests.timing import eventually

    data_dir = tempfile.mkdtemp(prefix="slotguard-pg-")
    pg = PrivatePostgres(Path(data_dir))
    s = settings.replace(database_url=pg.url, webhook_allow_private=True, webhook_poll_ms=50,
                         webhook_retry_schedule_s="0.2,0.5,1", webhook_timeout_ms=2_000)
    await asyncio.to_thread(db.migrate, s)
    pool = await db.create_pool(s, max_size=4)
    stop = asyncio.Event()
    dispatcher = Dispatcher(pool, s)
    receiver.secrets["pg"].append(new_secret())

    async def write(n: int) -> None:
        rid = f"res_{n}"
        row = (f"{rid}:created", "reservation.created", "tenants", "p1", "v1", rid, 1,
               payload("reservation.created", 0, {"reservationId": rid}).decode(), 0)
        async with pool.acquire() as conn:
            async with conn.transaction():
                await emit(conn, [row])

    try:
        async with pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO webhook_endpoints (id, owner_kind, owner_id, url, events, secret)"
                " VALUES ('whe_pg', 'ops', '', $1, ARRAY['*'], $2)", receiver.url("pg"),
                receiver.secrets["pg"][0])
        task = asyncio.create_task(dispatcher.run(stop))
        await write(1)

        def received(n: int):
            async def check() -> bool:
                return len(receiver.of("pg")) >= n
            return check

        async def listening() -> bool:
            return dispatcher._listener is not None and not dispatcher._listener.is_closed()

        await eventually(received(1), timeout_s=60, what="the first delivery")
        await eventually(listening, timeout_s=30, what="the LISTEN connection")
        pg.stop()
        await asyncio.sleep(1.0)  # the dispatcher's claims fail meanwhile; it keeps going
        assert not task.done()
        pg.start()
        await eventually(lambda: _written(pool, write, 2), timeout_s=60,
                         what="a write after the restart")
        await eventually(received(2), timeout_s=60, what="the delivery after it")
        assert [g.event["data"]["reservationId"] for g in receiver.of("pg")] == [
            "res_1", "res_2"]
        assert all(g.verified_with == [0] for g in receiver.of("pg"))
        # the LISTEN connection is back too (re-opened on the loop's next rounds)
        await eventually(listening, timeout_s=60, what="LISTEN again")
        stop.set()
        await asyncio.wait_for(task, timeout=30)
    finally:
        stop.set()
        await pool.close()
        pg.close()
        shutil.rmtree(data_dir, ignore_errors=True)


async def _written(pool, write, n: int) -> bool:
    try:
        await write(n)
        return True
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
