"""Expiry latency (issue 14): 10,000 holds expiring within one minute, measured from each
hold's deadline to (1) its EXPIRED transition (the reaper's script, Redis TIME), (2) its
outbox row (committed by the commit queue: ``webhook_events.emitted_at``) and (3) the
webhook's arrival at a receiver in another process.

Everything is the production path: a real ``python -m jobs`` worker (the reaper task,
jobs/reaper.py; the commit-queue drain; the webhook dispatcher, its child process), a
Starlette receiver under uvicorn in its own process, Redis and Postgres from
``REDIS_URL``/``DATABASE_URL`` under a private key prefix and schema (dropped afterwards).
Holds are created paced so their deadlines spread evenly over ``--spread-s`` seconds.

    python -m benchmarks.expiry_latency [--holds 10000] [--spread-s 60] [--workers 1]
                                        [--no-webhooks] [--json PATH]

The ``outbox`` mode measures the last leg alone, outbox row -> receiver: it writes
``--deliveries`` events (``reservation.expired``, one reservation each) through
:func:`engine.webhook_events.emit` at ``--rate`` per second (as the commit-queue drain
does, in transactions of one tick's rows), while the same worker process(es) and receiver
run; latency is each event's ``emitted_at`` (commit) to its arrival at the receiver.

    python -m benchmarks.expiry_latency outbox [--deliveries 10000] [--rate 167]
                                               [--workers 1] [--json PATH]

Targets (issue 14): p99 deadline -> event <= 1.5 s, deadline -> receiver <= 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from engine import db, directory
from engine.runtime import Runtime
from engine.settings import Settings
from engine.webhook_service import new_secret

HOUR_MS = 3_600_000
BASE_MS = 1_924_992_000_000  # 2031-01-01T00:00Z: always in the future here
VENDORS = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the receiver (its own process) -------------------------------------------------------
def receiver_main(port: int, out: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    sink = open(out, "a", buffering=1)

    async def hook(request: Request) -> Response:
        body = json.loads(await request.body())
        received = time.time_ns() // 1_000_000
        data = body.get("data", {})
        sink.write(f"{data.get('reservationId')} {body.get('type')} {received} "
                   f"{data.get('occurredAt')}\n")
        return Response(status_code=204)

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")


# ---- the run --------------------------------------------------------------------------------
def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"p50": q(0.50), "p99": q(0.99), "max": ordered[-1], "n": len(ordered)}


def start_workers(settings: Settings, log, workers: int) -> list:
    """``workers`` worker processes (each with its dispatcher)."""
    procs = [subprocess.Popen([sys.executable, "-m", "jobs"], env=worker_env(settings),
                              stdout=log, stderr=subprocess.STDOUT) for _ in range(workers)]
    print(f"worker pids {[p.pid for p in procs]}", file=sys.stderr, flush=True)
    return procs


def worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url,
        "SLOTGUARD_KEY_PREFIX": settings.key_prefix, "SLOTGUARD_DB_SCHEMA": settings.db_schema,
        "SLOTGUARD_SHARDS": str(settings.shards),
        "SLOTGUARD_PARTNER_MAX_LIVE_HOLDS": "0",
        "SLOTGUARD_AUTHORIZED_TTL_MS": str(settings.authorized_ttl_ms),
        "SLOTGUARD_WEBHOOK_ALLOW_PRIVATE": "true",
        "SLOTGUARD_REAPER_INTERVAL_MS": str(settings.reaper_interval_ms),
        "PYTHONUNBUFFERED": "1",
    })
    return env



async def add_endpoint(conn: asyncpg.Connection, port: int) -> None:
    """One ops endpoint for ``reservation.expired`` at the benchmark's receiver."""
    await conn.execute(
        "INSERT INTO webhook_endpoints (id, owner_kind, owner_id, url, events, secret) "
        "VALUES ('whe_bench', 'ops', '', $1, ARRAY['reservation.expired'], $2)",
        f"http://127.0.0.1:{port}/hook", new_secret())


def start_processes(settings: Settings, workdir: Path, port: int, workers: int):
    """The receiver (its own process, writing what it gets to ``received.txt``) and the
    worker processes: (received path, receiver, worker log, workers)."""
    received_path = workdir / "received.txt"
    receiver = subprocess.Popen([sys.executable, "-m", "benchmarks.expiry_latency",
                                 "receiver", "--port", str(port), "--out",
                                 str(received_path)])
    worker_log = open(workdir / "worker.log", "ab")
    return received_path, receiver, worker_log, start_workers(settings, worker_log, workers)


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process, then wait up to 20 s each (SIGKILL after)."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()

async def run(holds: int, spread_s: float, ttl_ms: int, settings: Settings,
              workdir: Path, workers: int = 1, webhooks: bool = True) -> dict:
    await asyncio.to_thread(db.migrate, settings)
    conn = await asyncpg.connect(settings.database_url,
                                 server_settings={"search_path": settings.db_schema})
    port = _free_port()
    try:
        for v in range(VENDORS):
            await directory.create_vendor(conn, f"bench-v{v}", unit_minutes=60,
                                          confirmation_required=False)
        if webhooks:
            await add_endpoint(conn, port)
    finally:
        await conn.close()

    received_path, receiver, worker_log, worker_procs = start_processes(settings, workdir,
                                                                        port, workers)
    rt = await Runtime.open(settings)
    deadlines: dict[str, int] = {}
    try:
        await rt.rehydrate_if_needed()
        # the worker is up once arq writes its health-check key
        for _ in range(1200):
            if await rt.redis.exists(f"{settings.key_prefix}arq:health-check"):
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("the worker did not start")
        load_before = os.getloadavg()
        per_tick = max(1, holds // max(1, int(spread_s * 10)))
        started = time.monotonic()
        n = 0
        while n < holds:
            batch = []
            for _ in range(min(per_tick, holds - n)):
                vendor, slot = n % VENDORS, n // VENDORS
                start = BASE_MS + slot * HOUR_MS
                batch.append(rt.reservations.create(
                    partner_id="bench", vendor_id=f"bench-v{vendor}", resource_id=None,
                    start_ms=start, end_ms=start + HOUR_MS, requester_id="r"))
                n += 1
            for moved in await asyncio.gather(*batch):
                deadlines[moved.reservation_id] = moved.deadline_ms
            # pace: deadline i lands at i * spread / holds after the first
            ahead = started + n * spread_s / holds - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        created_s = time.monotonic() - started
        last_deadline = max(deadlines.values())
        # wait for every expired webhook (or give up 15 minutes after the last deadline);
        # without webhooks, for every expired event in the outbox
        give_up = last_deadline + 900_000
        got: dict[str, tuple[int, int]] = {}
        while time.time() * 1000 < give_up:
            if not webhooks:
                async with rt.pool.acquire() as c:
                    if await c.fetchval("SELECT count(*) FROM webhook_events WHERE type = "
                                        "'reservation.expired'") >= len(deadlines):
                        break
                await asyncio.sleep(1.0)
                continue
            if received_path.exists():
                for line in received_path.read_text().splitlines():
                    rid, kind, received, occurred = line.split(" ")
                    if kind == "reservation.expired" and rid in deadlines:
                        from engine.times import parse_time
                        got[rid] = (int(received), parse_time(occurred, "occurredAt"))
            if len(got) >= len(deadlines):
                break
            await asyncio.sleep(1.0)
        load_after = os.getloadavg()
        async with rt.pool.acquire() as c:
            outbox = await c.fetch(
                "SELECT reservation_id, (extract(epoch FROM emitted_at) * 1000)::bigint, "
                "(extract(epoch FROM occurred_at) * 1000)::bigint "
                "FROM webhook_events WHERE type = 'reservation.expired'")
            emitted = {r[0]: int(r[1]) for r in outbox}
            occurred = {r[0]: int(r[2]) for r in outbox}
            attempts = await c.fetchval("SELECT sum(attempts) FROM webhook_deliveries")
            outbox_to_delivered = [float(r[0]) for r in await c.fetch(
                "SELECT extract(epoch FROM delivered_at - created_at) FROM webhook_deliveries "
                "WHERE delivered_at IS NOT NULL")]
    finally:
        await rt.close()
        stop_processes([*worker_procs, receiver])
        worker_log.close()
    # the transition's time (the reaper's script, Redis TIME) as the outbox row records it
    to_transition = [(occurred[r] - d) / 1000 for r, d in deadlines.items() if r in occurred]
    to_outbox = [(emitted[r] - d) / 1000 for r, d in deadlines.items() if r in emitted]
    to_receiver = [(got[r][0] - d) / 1000 for r, d in deadlines.items() if r in got]
    return {
        "holds": holds, "workers": workers, "spread_s": spread_s, "ttl_ms": ttl_ms,
        "created_in_s": created_s,
        "webhooks": webhooks, "received": len(got), "emitted": len(emitted),
        "attempts": attempts,
        "deadline_to_transition_s": quantiles(to_transition),
        "deadline_to_outbox_s": quantiles(to_outbox),
        "deadline_to_receiver_s": quantiles(to_receiver),
        "outbox_to_delivered_s": quantiles(outbox_to_delivered),
        "load_before": load_before, "load_after": load_after,
        "reaper_interval_ms": settings.reaper_interval_ms,
    }


async def wait_for_worker(rt: Runtime, settings: Settings) -> None:
    # the worker is up once arq writes its health-check key
    for _ in range(1200):
        if await rt.redis.exists(f"{settings.key_prefix}arq:health-check"):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("the worker did not start")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc; NaN where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def read_received(path: Path) -> dict[str, int]:
    """reservation id -> arrival (ms, the receiver's clock) of its expired webhook."""
    got: dict[str, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rid, kind, received, _ = line.split(" ")
            if kind == "reservation.expired":
                got.setdefault(rid, int(received))
    return got


async def run_outbox(deliveries: int, rate: float, settings: Settings, workdir: Path,
                     workers: int = 1) -> dict:
    """Outbox row -> receiver alone: events written at ``rate``/s, one endpoint."""
    from engine.times import format_time
    from engine.webhook_events import emit, payload

    await asyncio.to_thread(db.migrate, settings)
    port = _free_port()
    conn = await asyncpg.connect(settings.database_url,
                                 server_settings={"search_path": settings.db_schema})
    try:
        await add_endpoint(conn, port)
    finally:
        await conn.close()
    received_path, receiver, worker_log, worker_procs = start_processes(settings, workdir,
                                                                        port, workers)
    print(f"receiver pid {receiver.pid}", file=sys.stderr, flush=True)
    rt = await Runtime.open(settings)
    ids: list[str] = []
    try:
        await wait_for_worker(rt, settings)
        await asyncio.sleep(1.0)  # the dispatcher's first idle poll
        load_before = os.getloadavg()
        cpu_before = [cpu_s(p.pid) for p in (*worker_procs, receiver)]
        tick = 0.1
        run_id = uuid.uuid4().hex[:8]
        started = time.monotonic()
        n = 0
        while n < deliveries:
            due = min(deliveries, int((time.monotonic() - started + tick) * rate)) - n
            rows = []
            for _ in range(max(0, due)):
                rid = f"res_{run_id}_{n:06d}"
                at = time.time_ns() // 1_000_000
                data = {"reservationId": rid, "state": "EXPIRED", "version": 2,
                        "fromState": "HELD", "vendorId": "bench-v", "partnerId": "bench",
                        "slotStartTime": format_time(BASE_MS), "expiresAt": format_time(at),
                        "slotEndTime": format_time(BASE_MS + HOUR_MS),
                        "triggeredBy": "system", "occurredAt": format_time(at)}
                # version 1: no earlier version to wait for (no reservation_history rows)
                rows.append((f"{rid}:expired", "reservation.expired", "tenants", "bench",
                             "bench-v", rid, 1, payload("reservation.expired", at,
                                                        data).decode(), at))
                ids.append(rid)
                n += 1
            if rows:
                async with rt.pool.acquire() as c:
                    async with c.transaction():
                        await emit(c, rows)
            await asyncio.sleep(max(0.0, started + (n / rate) - time.monotonic()))
        written_s = time.monotonic() - started
        give_up = time.monotonic() + 900
        got: dict[str, int] = {}
        while time.monotonic() < give_up:
            got = read_received(received_path)
            if len(got) >= len(ids):
                break
            await asyncio.sleep(0.5)
        load_after = os.getloadavg()
        cpu_after = [cpu_s(p.pid) for p in (*worker_procs, receiver)]
        async with rt.pool.acquire() as c:
            emitted = {r[0]: int(r[1]) for r in await c.fetch(
                "SELECT reservation_id, (extract(epoch FROM emitted_at) * 1000)::bigint "
                "FROM webhook_events")}
            attempts = await c.fetchval("SELECT sum(attempts) FROM webhook_deliveries")
            first, last = await c.fetchrow(
                "SELECT min(delivered_at), max(delivered_at) FROM webhook_deliveries")
            attempt_ms = [float(r[0]) for r in await c.fetch(
                "SELECT last_latency_ms FROM webhook_deliveries WHERE last_latency_ms "
                "IS NOT NULL")]
    finally:
        await rt.close()
        stop_processes([*worker_procs, receiver])
        worker_log.close()
    latency = [(got[r] - emitted[r]) / 1000 for r in ids if r in got and r in emitted]
    span = (last - first).total_seconds() if first and last else float("nan")
    return {
        "mode": "outbox", "deliveries": deliveries, "rate": rate, "workers": workers,
        "written_in_s": written_s, "received": len(got), "emitted": len(emitted),
        "attempts": attempts, "delivered_per_s": len(got) / span if span else float("nan"),
        "outbox_to_receiver_s": quantiles(latency),
        "attempt_ms": quantiles(attempt_ms),  # request to response, the dispatcher's clock
        # CPU per delivery of the worker process(es) and of the receiver, in ms
        "worker_cpu_ms_per_delivery": 1000 * sum(
            a - b for a, b in zip(cpu_after[:-1], cpu_before[:-1])) / max(1, len(got)),
        "receiver_cpu_ms_per_delivery": 1000 * (cpu_after[-1] - cpu_before[-1])
        / max(1, len(got)),
        "load_before": load_before, "load_after": load_after,
    }


async def drop(settings: Settings) -> None:
    import redis.asyncio as aioredis

    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.key_prefix}*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.unlink(*keys[i:i + 500])
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.expiry_latency")
    sub = parser.add_subparsers(dest="command")
    rec = sub.add_parser("receiver")
    rec.add_argument("--port", type=int, required=True)
    rec.add_argument("--out", required=True)
    box = sub.add_parser("outbox", help="outbox row -> receiver alone")
    box.add_argument("--deliveries", type=int, default=10_000)
    box.add_argument("--rate", type=float, default=167.0, help="events written per second")
    box.add_argument("--workers", type=int, default=1)
    box.add_argument("--json")
    parser.add_argument("--holds", type=int, default=10_000)
    parser.add_argument("--spread-s", type=float, default=60.0)
    parser.add_argument("--ttl-ms", type=int, default=30_000,
                        help="each hold's lifetime (its deadline = creation + this)")
    parser.add_argument("--reaper-interval-ms", type=int, default=1_000,
                        help="SLOTGUARD_REAPER_INTERVAL_MS: the reaper's longest sleep")
    parser.add_argument("--workers", type=int, default=1,
                        help="`python -m jobs` processes (reaper, drain, dispatcher each)")
    parser.add_argument("--no-webhooks", action="store_true",
                        help="no endpoint: measure deadline -> transition and -> outbox only "
                             "(the dispatcher idle)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.command == "receiver":
        receiver_main(args.port, args.out)
        return 0
    settings = Settings.from_env(
        key_prefix=f"bx{uuid.uuid4().hex[:8]}:", db_schema=f"bx_{uuid.uuid4().hex[:8]}",
        partner_max_live_holds=0, authorized_ttl_ms=args.ttl_ms,
        reaper_interval_ms=args.reaper_interval_ms, webhook_allow_private=True)
    workdir = Path(tempfile.mkdtemp(prefix="sg-expiry-"))
    try:
        if args.command == "outbox":
            result = asyncio.run(run_outbox(args.deliveries, args.rate, settings, workdir,
                                            args.workers))
        else:
            result = asyncio.run(run(args.holds, args.spread_s, args.ttl_ms, settings,
                                     workdir, args.workers, webhooks=not args.no_webhooks))
    finally:
        asyncio.run(drop(settings))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
