"""Settings from the environment, and the refusal to run on an evicting Redis."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import redis.asyncio as aioredis

from engine.connection import check_eviction_policy
from engine.errors import UnsafeRedis
from engine.settings import Settings, SettingsError, env_names


def test_env_names_follow_the_convention():
    names = env_names()
    assert "REDIS_URL" in names and "DATABASE_URL" in names
    assert "SLOTGUARD_HOLD_TTL_MS" in names
    assert "SLOTGUARD_PARTNER_MAX_LIVE_HOLDS" in names
    assert "SLOTGUARD_PARTNER_RATE_PER_MINUTE" in names
    assert "SLOTGUARD_IP_RATE_PER_MINUTE" in names
    assert all(n in ("REDIS_URL", "DATABASE_URL") or n.startswith("SLOTGUARD_") for n in names)


def test_reads_environment():
    s = Settings.from_env({"SLOTGUARD_HOLD_TTL_MS": "1500", "SLOTGUARD_SHARDS": "32",
                           "REDIS_URL": "redis://h:1/2", "SLOTGUARD_ALLOW_EVICTION_POLICY": "yes"})
    assert (s.hold_ttl_ms, s.shards, s.redis_url, s.allow_eviction_policy) == (
        1500, 32, "redis://h:1/2", True)


@pytest.mark.parametrize("env", [
    {"SLOTGUARD_HOLD_TTL_MS": "ten"},
    {"SLOTGUARD_HOLD_TTL_MS": "0"},
    {"SLOTGUARD_SHARDS": "-1"},
    {"SLOTGUARD_ALLOW_EVICTION_POLICY": "maybe"},
    {"SLOTGUARD_DB_SCHEMA": "x; drop table y"},
])
def test_bad_settings_are_refused(env):
    with pytest.raises(SettingsError):
        Settings.from_env(env)


@pytest.fixture
def evicting_redis():
    """A private Redis with an evicting policy (never reconfigure the shared one)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is needed on PATH for this test")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--maxmemory-policy", "allkeys-lru"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60  # generous: a loaded machine is normal here
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_refuses_an_evicting_redis_unless_overridden(evicting_redis, caplog):
    client = aioredis.Redis.from_url(evicting_redis, decode_responses=True)
    try:
        with pytest.raises(UnsafeRedis):
            await check_eviction_policy(client, Settings.from_env({}))
        policy = await check_eviction_policy(
            client, Settings.from_env({"SLOTGUARD_ALLOW_EVICTION_POLICY": "1"}))
        assert policy == "allkeys-lru"
        assert "double booking" in caplog.text
    finally:
        await client.aclose()


async def test_accepts_noeviction(redis):
    assert await check_eviction_policy(redis, Settings.from_env({})) == "noeviction"
