"""The ``slotguard`` command end to end: migrate, create a partner, a vendor and keys in
separate processes, then ``slotguard serve`` (a real uvicorn) on a free port, driven over
loopback. The server learns of a vendor created after it started (catalog miss path)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import asyncpg
import httpx
import pytest

from engine.keys import KeySpace
from slotguard.cli import SUBCOMMAND_MODULES, build_parser
from tests.conftest import DATABASE_URL, REDIS_URL
from tests.test_api_fixtures import at, create_body

CLI = [sys.executable, "-m", "slotguard"]


@pytest.fixture
def cli_env(settings):
    env = {**os.environ, "REDIS_URL": REDIS_URL, "DATABASE_URL": DATABASE_URL,
           "SLOTGUARD_KEY_PREFIX": settings.key_prefix,
           "SLOTGUARD_DB_SCHEMA": settings.db_schema, "SLOTGUARD_SHARDS": str(settings.shards)}
    yield env
    subprocess.run(["psql", DATABASE_URL, "-qc",
                    f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE'],
                   capture_output=True, check=False)
    # What the processes of the test wrote under its prefix, arq's cron bookkeeping included.
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for pattern in (f"{settings.key_prefix}*", f"arq:*{settings.key_prefix}*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.unlink(*keys)
    client.close()


def run(env, *args: str) -> str:
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parser_has_the_commands():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert {"serve", "migrate", "partners", "vendors", "keys"} <= set(commands)
    assert "slotguard.cli" in SUBCOMMAND_MODULES
    args = parser.parse_args(["keys", "create", "--role", "partner", "--partner", "p1"])
    assert (args.role, args.partner_id) == ("partner", "p1")
    with pytest.raises(SystemExit):
        parser.parse_args(["keys", "create", "--role", "root"])


async def test_cli_and_uvicorn_end_to_end(cli_env, settings, redis):
    from yoyo import read_migrations

    from engine.db import MIGRATIONS

    shipped = len(read_migrations(MIGRATIONS))
    assert f"applied {shipped} migration(s)" in run(cli_env, "migrate")
    assert "applied 0 migration(s)" in run(cli_env, "migrate")  # idempotent
    run(cli_env, "partners", "create", "--id", "acme")
    out = run(cli_env, "vendors", "create", "--id", "dentist", "--free",
              "--buffer-after-minutes", "15")
    assert "confirmation required" in out and "payment waived" in out
    partner_key = run(cli_env, "keys", "create", "--role", "partner", "--partner", "acme"
                      ).strip().splitlines()[-1]
    vendor_key = run(cli_env, "keys", "create", "--role", "vendor", "--vendor", "dentist"
                     ).strip().splitlines()[-1]
    assert partner_key.startswith("sg_live_") and vendor_key.startswith("sg_live_")
    # Only a digest is stored.
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        stored = await conn.fetch(f'SELECT * FROM "{settings.db_schema}".api_keys')
    finally:
        await conn.close()
    assert len(stored) == 2
    assert all(partner_key not in str(dict(row)) for row in stored)
    # The worker rehydrates booked markers before holds are accepted; stand in for it.
    keys = KeySpace(settings.key_prefix, settings.shards)
    for shard in range(settings.shards):
        await redis.set(keys.ready(shard), "1")

    port = free_port()
    server = subprocess.Popen([*CLI, "serve", "--port", str(port), "--no-access-log"],
                              env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            deadline = time.monotonic() + 120  # generous: a loaded machine is normal here
            while True:
                try:
                    if (await client.get("/health/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not become ready"
                assert server.poll() is None, server.stdout.read().decode()
                await asyncio.sleep(0.1)
            auth = {"Authorization": f"Bearer {partner_key}"}
            r = await client.post("/v1/reservations", json=create_body("dentist"), headers=auth)
            assert r.status_code == 201, r.text
            rid = r.json()["reservationId"]
            r = await client.post("/v1/reservations", json=create_body("dentist", start=30),
                                  headers=auth)
            assert r.status_code == 409  # the 15-minute buffer
            r = await client.post(f"/v1/reservations/{rid}/vendor-confirmation",
                                  headers={"Authorization": f"Bearer {vendor_key}"})
            assert r.status_code == 200 and r.json()["state"] == "AUTHORIZED_BOTH"
            # A vendor created by another process after the server started: the miss is
            # remembered only briefly (how briefly is test_clock's business, on a manual
            # clock), then the server finds it. Until then the answer stays a clean 404.
            r = await client.post("/v1/reservations", json=create_body("late-vendor"),
                                  headers=auth)
            assert r.status_code == 404 and r.json()["error"]["code"] == "UNKNOWN_VENDOR"
            run(cli_env, "vendors", "create", "--id", "late-vendor", "--free", "--instant")
            deadline = time.monotonic() + 60
            while True:
                r = await client.post("/v1/reservations", json=create_body("late-vendor"),
                                      headers=auth)
                if r.status_code != 404:
                    break
                assert r.json()["error"]["code"] == "UNKNOWN_VENDOR"
                assert time.monotonic() < deadline, "the server never saw the new vendor"
                await asyncio.sleep(0.1)
            assert r.status_code == 201, r.text
            r = await client.get("/v1/vendors/dentist/availability",
                                 params={"startTime": at(0), "endTime": at(60)}, headers=auth)
            assert r.status_code == 200
            assert [s["status"] for s in r.json()["slots"]] == ["held"]
            metrics = (await client.get("/metrics")).text
            assert 'slotguard_http_request_seconds_count{method="POST",' \
                   'route="/v1/reservations",status="201"}' in metrics
    finally:
        server.terminate()
        server.wait(timeout=60)
