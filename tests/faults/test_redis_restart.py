"""Item 3 of issue 11: a kill -9 and restart of Redis under a running API (``slotguard
serve``, a real uvicorn) and a running ``slotguard worker``, both real processes on a private
Redis. Readiness comes back (scripts registered again, shards rehydrated), the worker does not
exit, and every commit the API accepted (202) ends COMMITTED with exactly one booking row and
one audit row per transition."""

from __future__ import annotations

import time

import asyncpg
import httpx
import pytest

from tests.faults.edge_servers import PrivateRedis, answers, cli, env_for, free_port, spawn, stop
from tests.test_api_fixtures import at

DOWN_S = 3.0  # longer than arq's poll loop used to survive an unreachable Redis


@pytest.fixture
def stack(settings, tmp_path):
    redis = PrivateRedis(tmp_path)
    redis.start()
    env = env_for(settings, redis.url, SLOTGUARD_DRAIN_BLOCK_MS="100",
                  SLOTGUARD_RECLAIM_IDLE_MS="1000", SLOTGUARD_PARTNER_RATE_BURST="2000",
                  SLOTGUARD_IP_RATE_BURST="4000")
    cli(env, "migrate")
    cli(env, "partners", "create", "--id", "acme")
    cli(env, "vendors", "create", "--id", "salon", "--free", "--instant")
    key = cli(env, "keys", "create", "--role", "partner", "--partner", "acme"
              ).strip().splitlines()[-1]
    port = free_port()
    worker = spawn(env, tmp_path / "worker.log", "worker")
    api = spawn(env, tmp_path / "api.log", "serve", "--port", str(port), "--no-access-log")
    try:
        yield redis, api, worker, f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    finally:
        for proc in (api, worker):
            stop(proc)
        redis.stop()
        import subprocess
        subprocess.run(["psql", settings.database_url, "-qc",
                        f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE'],
                       capture_output=True, check=False)


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _script_shas() -> list[str]:
    from engine.scripts import scripts

    return [script.sha for script in scripts().values()]


def ready(client: httpx.Client) -> bool:
    try:
        return client.get("/health/ready").status_code == 200
    except httpx.HTTPError:
        return False


def create_and_commit(client: httpx.Client, auth: dict, slot: int) -> str:
    r = client.post("/v1/reservations", headers=auth, json={
        "vendorId": "salon", "slotStartTime": at(slot * 60),
        "slotEndTime": at(slot * 60 + 30), "requesterId": f"req-{slot}"})
    assert r.status_code == 201, r.text
    rid = r.json()["reservationId"]
    r = client.post(f"/v1/reservations/{rid}/commit", headers=auth)
    assert r.status_code in (200, 202), r.text  # 200: the worker was quicker than the answer
    return rid


def all_committed(client: httpx.Client, auth: dict, ids: list[str]) -> bool:
    states = [client.get(f"/v1/reservations/{rid}", headers=auth).json()["state"]
              for rid in ids]
    return all(s == "COMMITTED" for s in states)


def test_api_and_worker_ride_through_a_redis_kill_9(stack, settings):
    redis, api, worker, base, auth = stack
    with httpx.Client(base_url=base, timeout=10) as client:
        wait_until(lambda: ready(client) or api.poll() is not None, 60, "the API to be ready")
        assert api.poll() is None
        accepted = [create_and_commit(client, auth, slot) for slot in range(3)]
        # The worker is up and draining (it starts slower than the API) ...
        wait_until(lambda: all_committed(client, auth, accepted), 90, "the first commits")
        # ... and more commits are in flight when Redis dies.
        accepted += [create_and_commit(client, auth, slot) for slot in range(3, 8)]

        redis.kill9()
        time.sleep(DOWN_S)  # the worker's poll loop and the API see Redis gone
        assert not ready(client)
        r = client.post("/v1/reservations", headers=auth, json={
            "vendorId": "salon", "slotStartTime": at(600), "slotEndTime": at(630),
            "requesterId": "req-down"})
        assert r.status_code == 503, r.text  # an honest "try again", not a 500
        redis.start()
        answered = time.monotonic()
        assert answers(redis.port)
        wait_until(lambda: ready(client), 60, "readiness after the restart")
        recovery_s = time.monotonic() - answered
        print(f"\nreadiness back {recovery_s:.3f} s after Redis answered again")

        assert worker.poll() is None, "the worker exited on the Redis restart"
        assert api.poll() is None
        # A flushed script cache (the private server's) heals at the next readiness probe,
        # before any request happens to meet NOSCRIPT.
        import redis as redis_py

        with redis_py.Redis(port=redis.port) as direct:
            direct.script_flush()
            assert not all(direct.script_exists(*_script_shas()))
        wait_until(lambda: ready(client), 30, "readiness after a SCRIPT FLUSH")
        # Holds and commits work again, and a slot booked before the restart stays booked.
        accepted += [create_and_commit(client, auth, slot) for slot in range(100, 104)]
        r = client.post("/v1/reservations", headers=auth, json={
            "vendorId": "salon", "slotStartTime": at(0), "slotEndTime": at(30),
            "requesterId": "req-again"})
        assert r.status_code == 409, r.text

        wait_until(lambda: all_committed(client, auth, accepted), 90,
                   "every accepted commit to be COMMITTED")
        assert worker.poll() is None

    async def rows():
        conn = await asyncpg.connect(settings.database_url,
                                     server_settings={"search_path": settings.db_schema})
        try:
            bookings = await conn.fetch("SELECT reservation_id FROM bookings")
            audit = await conn.fetch(
                "SELECT event_id, count(*) AS n FROM audit_log GROUP BY event_id")
        finally:
            await conn.close()
        return [b[0] for b in bookings], audit

    import asyncio

    bookings, audit = asyncio.run(rows())
    assert sorted(bookings) == sorted(accepted)  # exactly one booking per accepted commit
    assert all(row["n"] == 1 for row in audit)  # every transition audited once


async def test_script_connection_backs_off_and_registers_scripts_on_reconnect(tmp_path):
    """The raw-RESP layer alone: calls fail (ConnectionError, never hang) while Redis is
    down; after the restart the reconnect registers every script
    (no NOSCRIPT round trip); a flushed script cache is refilled after one NOSCRIPT."""
    import asyncio

    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError

    from engine.access import RedisAccess
    from engine.keys import KeySpace

    server = PrivateRedis(tmp_path)
    server.start()
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    access = RedisAccess(client, backoff_max_s=30.0)  # a long backoff: no retry storm
    keys = KeySpace("t:", 4)
    rate = keys.partner_rate("p1")
    try:
        assert int((await access.call("rate_limit", [rate], [60, 10, 1]))[0]) == 1
        assert access.wire.connects == 1
        server.kill9()
        for _ in range(50):
            with pytest.raises(RedisConnectionError):
                await access.call("rate_limit", [rate], [60, 10, 1])
        assert access.wire.connects == 1
        server.start()
        access.wire.reset_backoff()  # what the Redis watch does when Redis answers
        assert int((await access.call("rate_limit", [rate], [60, 10, 1]))[0]) == 1
        assert access.wire.connects == 2
        assert await access.scripts_loaded()  # registered by the reconnect itself

        await client.script_flush()  # the private server's cache only
        assert not await access.scripts_loaded()
        assert int((await access.call("rate_limit", [rate], [60, 10, 1]))[0]) == 1

        async def reloaded():
            deadline = time.monotonic() + 30
            while not await access.scripts_loaded():
                assert time.monotonic() < deadline, "scripts were not registered again"
                await asyncio.sleep(0.05)

        await reloaded()
    finally:
        await access.close()
        await client.aclose()
        server.stop()
