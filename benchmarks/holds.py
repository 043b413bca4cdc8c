"""Hold placement throughput: HoldEngine (coalesced) against the bare script, one call at a
time (the naive client path), from one or more processes; and Redis memory per live hold.

    python -m benchmarks.holds --processes 1 --concurrency 64 --seconds 5

Every placement targets its own slot (no conflicts), so the figure is the engine's
placement rate; contention is measured by the scenarios of ``slotguard bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
import uuid

import redis.asyncio as aioredis

from engine.access import RedisAccess
from engine.holds import HoldEngine
from engine.keys import KeySpace
from engine.resources import MINUTE_MS, Resource, ResourceCatalog
from engine.settings import Settings

T0 = 1_893_456_000_000
UNIT = 15 * MINUTE_MS


def _catalog(tag: str, n: int = 64) -> ResourceCatalog:
    return ResourceCatalog([Resource(f"{tag}-{i}", unit_ms=UNIT) for i in range(n)])


async def _load(settings: Settings, mode: str, concurrency: int, seconds: float, tag: str,
                start_at: float) -> tuple[int, float]:
    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True,
                                     max_connections=concurrency + 8)
    access = RedisAccess(client, batch_max=settings.redis_batch_max,
                         max_inflight=settings.redis_max_inflight_batches)
    await access.load_scripts()
    keys = KeySpace(settings.key_prefix, settings.shards)
    catalog = _catalog(tag)
    engine = HoldEngine(access, keys, catalog, settings)
    resources = [f"{tag}-{i}" for i in range(64)]
    done = 0
    stop = 0.0

    async def caller(n: int) -> None:
        nonlocal done
        slot = n
        resource = resources[n % len(resources)]
        first = T0 // UNIT
        while time.time() < stop:
            start = (first + slot) * UNIT
            slot += concurrency
            if mode == "engine":
                await engine.place(resource, start, start + 2 * UNIT, ttl_ms=30_000)
            else:  # the bare script, one EVALSHA per call, no coalescing
                hold_id = keys.new_hold_id(resource)
                u = start // UNIT
                await access.call_once(
                    "place_hold",
                    [keys.unit_root(keys.shard_of(resource)), keys.hold(hold_id),
                     keys.fence(resource)],
                    [hold_id, resource, u, u + 1, 30_000, settings.max_hold_units, ""])
            done += 1

    while time.time() < start_at:
        await asyncio.sleep(0.001)
    began = time.time()
    stop = began + seconds
    cpu0 = time.process_time()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    elapsed = time.time() - began
    cpu = time.process_time() - cpu0
    await client.aclose()
    return done, elapsed, cpu


def _process(settings, mode, concurrency, seconds, tag, start_at, queue):
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    queue.put(asyncio.run(_load(settings, mode, concurrency, seconds, tag, start_at)))


def measure(settings: Settings, *, mode: str, processes: int, concurrency: int,
            seconds: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 2.0
    procs = [ctx.Process(target=_process, args=(settings, mode, concurrency, seconds,
                                                f"b{uuid.uuid4().hex[:6]}", start_at, queue))
             for _ in range(processes)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join()
    total = sum(r[0] for r in results)
    elapsed = max(r[1] for r in results)
    cpu = sum(r[2] for r in results)
    return {"mode": mode, "processes": processes, "concurrency": concurrency,
            "holds": total, "seconds": round(elapsed, 2),
            "holds_per_s": round(total / elapsed), "client_cpu_us_per_hold":
            round(cpu / max(total, 1) * 1e6, 1)}


async def memory_per_hold(settings: Settings, holds: int = 2000) -> dict:
    """Redis memory of the keys of live holds (record + units + fence counter share)."""
    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    access = RedisAccess(client)
    keys = KeySpace(settings.key_prefix, settings.shards)
    tag = f"m{uuid.uuid4().hex[:6]}"
    catalog = _catalog(tag, 16)
    engine = HoldEngine(access, keys, catalog, settings)
    await delete_keys(client, settings.key_prefix)
    placed = await asyncio.gather(*(
        engine.place(f"{tag}-{i % 16}", T0 + (i // 16) * 4 * UNIT, T0 + (i // 16 + 1) * 4 * UNIT,
                     ttl_ms=120_000) for i in range(holds)))
    total = 0
    key_count = 0
    async for key in client.scan_iter(match=f"{settings.key_prefix}*", count=1000):
        total += await client.memory_usage(key, samples=0) or 0
        key_count += 1
    per_hold = total / len(placed)
    await delete_keys(client, settings.key_prefix)
    await client.aclose()
    return {"holds": len(placed), "units_per_hold": 4, "keys": key_count,
            "bytes_per_hold": round(per_hold)}


async def delete_keys(client: aioredis.Redis, prefix: str) -> None:
    async for key in client.scan_iter(match=f"{prefix}*", count=5000):
        await client.unlink(key)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--mode", choices=["engine", "bare", "both"], default="both")
    args = parser.parse_args(argv)
    settings = Settings.from_env(key_prefix=f"bench{uuid.uuid4().hex[:6]}:")
    modes = ["bare", "engine"] if args.mode == "both" else [args.mode]
    for mode in modes:
        print(measure(settings, mode=mode, processes=args.processes,
                      concurrency=args.concurrency, seconds=args.seconds))
    print(asyncio.run(memory_per_hold(settings.replace(
        key_prefix=f"mem{uuid.uuid4().hex[:6]}:"))))
    asyncio.run(_cleanup(settings))  # leave nothing behind


async def _cleanup(settings: Settings) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    await delete_keys(client, settings.key_prefix)
    await client.aclose()


if __name__ == "__main__":
    main()
