"""Requests per second of ``POST /v1/reservations`` next to a hello-world route, both under
the same uvicorn setup (1 worker, uvloop, httptools, no access log), loopback only.

    python -m benchmarks.api_http [--seconds 5] [--clients 4] [--connections 32]

It uses the configured Redis and Postgres (``REDIS_URL`` / ``DATABASE_URL``) under a
throwaway key prefix and schema, removed afterwards. Every reservation asks for a different
slot (1-minute units), so every request is a real hold (201); rate limits and the hold cap
are off for the run. The load comes from ``--clients`` processes, each with
``--connections`` concurrent keep-alive connections (a minimal HTTP/1.1 client over asyncio
streams); the hello-world number is the ceiling this client and machine can measure.
Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import uuid

import httpx
import orjson
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

T0_MS = 1_893_456_000_000  # 2030-01-01T00:00Z


async def _hello(request):
    return Response(b'{"hello":"world"}', media_type="application/json")


hello_app = Starlette(routes=[Route("/hello", _hello)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _iso(ms: int) -> str:
    from api.validation import format_time

    return format_time(ms)


async def _load(url: str, seconds: float, connections: int, key: str | None,
                first_slot: int) -> tuple[int, dict[int, int]]:
    """Raw HTTP/1.1 keep-alive over asyncio streams: much cheaper per request than a full
    client library, so the server, not the load generator, is what gets measured."""
    parsed = httpx.URL(url)
    statuses: dict[int, int] = {}
    slot = first_slot
    deadline = time.perf_counter() + seconds

    def request_bytes() -> bytes:
        nonlocal slot
        if key is None:
            return (f"GET {parsed.raw_path.decode()} HTTP/1.1\r\nHost: bench\r\n\r\n").encode()
        slot += 1
        start = T0_MS + slot * 60_000
        body = orjson.dumps({"vendorId": "bench", "slotStartTime": _iso(start),
                             "slotEndTime": _iso(start + 60_000), "requesterId": "bench"})
        head = (f"POST {parsed.raw_path.decode()} HTTP/1.1\r\nHost: bench\r\n"
                f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
        try:
            while time.perf_counter() < deadline:
                writer.write(request_bytes())
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                status = int(status_line.split()[1])
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*[worker() for _ in range(connections)])
    return sum(statuses.values()), statuses


def _client_process(args) -> tuple[int, dict[int, int]]:
    url, seconds, connections, key, first_slot = args
    return asyncio.run(_load(url, seconds, connections, key, first_slot))


def _measure(url: str, key: str | None, opts) -> tuple[float, dict[int, int]]:
    jobs = [(url, opts.seconds, opts.connections, key, i * 10_000_000)
            for i in range(opts.clients)]
    with multiprocessing.get_context("spawn").Pool(opts.clients) as pool:
        results = pool.map(_client_process, jobs)
    statuses: dict[int, int] = {}
    for _, per in results:
        for status, count in per.items():
            statuses[status] = statuses.get(status, 0) + count
    return sum(statuses.values()) / opts.seconds, statuses


def _wait_ready(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("server exited")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not become ready")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--connections", type=int, default=32)
    opts = parser.parse_args(argv)

    prefix, schema = f"bench{uuid.uuid4().hex[:8]}:", f"bench_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "SLOTGUARD_KEY_PREFIX": prefix, "SLOTGUARD_DB_SCHEMA": schema,
           "SLOTGUARD_PARTNER_RATE_PER_MINUTE": "0", "SLOTGUARD_IP_RATE_PER_MINUTE": "0",
           "SLOTGUARD_PARTNER_MAX_LIVE_HOLDS": "0", "SLOTGUARD_MAX_HOLD_UNITS": "10"}
    cli = [sys.executable, "-m", "slotguard"]

    def run(*args: str) -> str:
        return subprocess.run([*cli, *args], env=env, check=True, capture_output=True,
                              text=True).stdout

    run("migrate")
    run("partners", "create", "--id", "bench")
    run("vendors", "create", "--id", "bench", "--unit-minutes", "1", "--free")
    key = run("keys", "create", "--role", "partner", "--partner", "bench").strip().splitlines()[-1]
    results = {}
    try:
        hello_port, api_port = _free_port(), _free_port()
        hello = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "benchmarks.api_http:hello_app", "--port",
             str(hello_port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
             "--log-level", "warning"], env=env)
        api = subprocess.Popen([*cli, "serve", "--port", str(api_port), "--no-access-log",
                                "--log-level", "warning"], env=env)
        try:
            _wait_ready(f"http://127.0.0.1:{hello_port}/hello", hello)
            _wait_ready(f"http://127.0.0.1:{api_port}/health/ready", api)
            results["GET /hello (hello world)"] = _measure(
                f"http://127.0.0.1:{hello_port}/hello", None, opts)
            results["POST /v1/reservations"] = _measure(
                f"http://127.0.0.1:{api_port}/v1/reservations", key, opts)
        finally:
            for server in (hello, api):
                server.terminate()
                server.wait(timeout=10)
    finally:
        _cleanup(prefix, schema)
    print(f"uvicorn 1 worker (uvloop, httptools); load: {opts.clients} client processes x "
          f"{opts.connections} connections, {opts.seconds:.0f} s each")
    for name, (rate, statuses) in results.items():
        print(f"  {name:28s} {rate:9.0f} req/s   statuses {dict(sorted(statuses.items()))}")
    return 0


def _cleanup(prefix: str, schema: str) -> None:
    import asyncpg
    import redis.asyncio as aioredis

    from engine.settings import Settings

    settings = Settings.from_env()

    async def go() -> None:
        from engine.connection import open_redis

        client = open_redis(settings, decode_responses=False, health_check_interval=0)
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            await client.unlink(key)
        await client.aclose()
        conn = await asyncpg.connect(settings.database_url)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()

    asyncio.run(go())


if __name__ == "__main__":
    raise SystemExit(main())
