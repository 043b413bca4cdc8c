"""Items 11 and 12 of issue 11. The eviction policy is re-checked at run time: switched to
an evicting policy on a (private) Redis, readiness turns false and holds are refused until
it is switched back. The shard count is recorded in Redis at first start: a process started
with another SLOTGUARD_SHARDS refuses to start, with one clear line."""

from __future__ import annotations

import asyncio
import subprocess
import time

import httpx
import pytest
import redis.asyncio as aioredis

from api.app import create_app
from engine import db
from engine.errors import UnsafeRedis
from engine.runtime import Runtime
from tests.conftest import REDIS_URL
from tests.faults.edge_servers import CLI, PrivateRedis, clean_shared_redis, env_for
from tests.test_api_fixtures import build_world, create_body


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


async def eventually(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_an_evicting_policy_at_run_time_stops_readiness_and_holds(settings,
                                                                       private_redis):
    settings = settings.replace(redis_url=private_redis.url, eviction_check_interval_ms=200,
                                redis_watch_interval_ms=100)
    await asyncio.to_thread(db.migrate, settings)
    admin = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            world = await build_world(app.state.services.pool)
            transport = httpx.ASGITransport(app=app, client=("10.0.0.1", 40000))
            async with httpx.AsyncClient(transport=transport,
                                         base_url="http://slotguard.test") as client:
                async def ready() -> int:
                    return (await client.get("/health/ready")).status_code

                async def create(start: int) -> httpx.Response:
                    return await client.post("/v1/reservations", json=create_body(start=start),
                                             headers=world.auth("p1"))

                await eventually(lambda: _is(ready, 200), 30, "readiness")
                assert (await create(0)).status_code == 201

                await admin.config_set("maxmemory-policy", "allkeys-random")
                await eventually(lambda: _is(ready, 503), 30, "readiness to turn false")
                r = await client.get("/health/ready")
                assert r.json()["error"]["details"]["checks"]["evictionPolicy"] is False

                async def refused():
                    r = await create(60)
                    assert r.status_code in (201, 503), r.text
                    if r.status_code == 201:  # accepted before the watch saw the change:
                        await client.post(f"/v1/reservations/{r.json()['reservationId']}"
                                          "/cancel", headers=world.auth("p1"))
                    return r.status_code == 503 and r

                r = await eventually(refused, 30, "holds to be refused")
                assert r.json()["error"]["retryable"] is True
                for start in (120, 180, 240):  # and they stay refused
                    assert (await create(start)).status_code == 503

                await admin.config_set("maxmemory-policy", "noeviction")
                await eventually(lambda: _is(ready, 200), 30, "readiness to come back")
                assert (await create(300)).status_code == 201
                assert (await create(0)).status_code == 409  # the first hold still holds
    finally:
        await admin.aclose()
        from tests.test_db import drop_schema
        await drop_schema(settings.db_schema)


async def _is(probe, status: int) -> bool:
    return await probe() == status


async def test_another_shard_count_refuses_to_start(settings, redis):
    await asyncio.to_thread(db.migrate, settings)
    first = await Runtime.open(settings.replace(shards=4))
    try:
        assert await redis.get(first.keys.shard_count()) == "4"
        with pytest.raises(UnsafeRedis) as refused:
            await Runtime.open(settings.replace(shards=8))
        assert "SLOTGUARD_SHARDS is 8" in refused.value.message
        env = env_for(settings.replace(shards=8), REDIS_URL)
        for command in (["worker"], ["serve", "--port", "1"]):
            done = subprocess.run([*CLI, *command], env=env, capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 2, done.stderr
            # One refusal line (an informational "servers: ..." line may precede it).
            lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
            assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
            assert lines[0].startswith("error: SLOTGUARD_SHARDS is 8 but the data in this "
                                       "Redis was written with 4 shards"), lines
        # The same count starts.
        again = await Runtime.open(settings.replace(shards=4))
        await again.close()
    finally:
        await first.close()
        clean_shared_redis(REDIS_URL, settings.key_prefix)
        from tests.test_db import drop_schema
        await drop_schema(settings.db_schema)
