"""A live API for the client, bench-target and locust tests: ``slotguard serve`` (a real
uvicorn) on a free port over the shared Redis and Postgres, under the test module's own key
prefix and schema, with the world of tests/test_api_fixtures.py (partners p1, p2; vendors
v-confirm, v-instant, v-other; a key per role). Optionally ``slotguard worker`` processes
drain the commit queue. Holds no tests itself."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import httpx

from engine import db
from engine.keys import KeySpace
from engine.settings import Settings
from tests.conftest import DATABASE_URL, REDIS_URL
from tests.test_api_fixtures import World, build_world

CLI = [sys.executable, "-m", "slotguard"]
READY_BOUND_S = 120.0  # generous: a loaded machine is normal here


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveApi:
    settings: Settings
    env: dict[str, str]
    world: World = field(default_factory=World)
    port: int = 0
    procs: list[subprocess.Popen] = field(default_factory=list)
    log_dir: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def key(self, name: str) -> str:
        return self.world.keys[name]


def start(*, workers: int = 0, **extra_env: str) -> LiveApi:
    suffix = uuid.uuid4().hex[:12]
    settings = Settings.from_env({}, redis_url=REDIS_URL, database_url=DATABASE_URL,
                                 key_prefix=f"t{suffix}:", db_schema=f"t_{suffix}", shards=4)
    env = {**os.environ, "REDIS_URL": REDIS_URL, "DATABASE_URL": DATABASE_URL,
           "SLOTGUARD_KEY_PREFIX": settings.key_prefix, "SLOTGUARD_DB_SCHEMA": settings.db_schema,
           "SLOTGUARD_SHARDS": "4", "SLOTGUARD_PARTNER_RATE_PER_MINUTE": "0",
           "SLOTGUARD_IP_RATE_PER_MINUTE": "0", "SLOTGUARD_PARTNER_MAX_LIVE_HOLDS": "0",
           **extra_env}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    live = LiveApi(settings, env, log_dir=tempfile.mkdtemp(prefix="slotguard-live-"))
    db.migrate(settings)
    live.world = asyncio.run(_world(settings, mark_ready=workers == 0))
    live.port = free_port()
    live.procs.append(_spawn(live, "api", "serve", "--port", str(live.port), "--no-access-log",
                             "--log-level", "warning"))
    for i in range(workers):
        live.procs.append(_spawn(live, f"worker-{i}", "worker"))
    _wait_ready(live)
    return live


def _spawn(live: LiveApi, name: str, *args: str) -> subprocess.Popen:
    out = open(os.path.join(live.log_dir, f"{name}.log"), "wb")
    return subprocess.Popen([*CLI, *args], env=live.env, stdout=out, stderr=subprocess.STDOUT)


def log_tail(live: LiveApi, name: str = "api") -> str:
    try:
        with open(os.path.join(live.log_dir, f"{name}.log"), "rb") as f:
            return f.read()[-4000:].decode("utf-8", "replace")
    except OSError:
        return ""


async def _world(settings: Settings, mark_ready: bool) -> World:
    pool = await db.create_pool(settings, min_size=1, max_size=2)
    try:
        world = await build_world(pool)
    finally:
        await pool.close()
    if mark_ready:  # no worker: stand in for its rehydration of booked markers
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        keys = KeySpace(settings.key_prefix, settings.shards)
        for shard in range(settings.shards):
            await client.set(keys.ready(shard), "1")
        await client.aclose()
    return world


def _wait_ready(live: LiveApi) -> None:
    deadline = time.monotonic() + READY_BOUND_S
    while True:
        try:
            if httpx.get(f"{live.url}/health/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or live.procs[0].poll() is not None:
            stop(live)
            raise RuntimeError(f"the API did not become ready:\n{log_tail(live)}")
        time.sleep(0.1)


def stop(live: LiveApi) -> None:
    import shutil

    for proc in live.procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in live.procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    subprocess.run(["psql", DATABASE_URL, "-qc",
                    f'DROP SCHEMA IF EXISTS "{live.settings.db_schema}" CASCADE'],
                   capture_output=True, check=False)
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for pattern in (f"{live.settings.key_prefix}*", f"arq:*{live.settings.key_prefix}*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i:i + 500])
    client.close()
    shutil.rmtree(live.log_dir, ignore_errors=True)
