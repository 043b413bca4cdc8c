"""Multi-resource reservations racing single creates on the same units (issue 16, pool):
4 processes × 16 clients over 6 resources, random 2–3 item reservations, single holds and
cancels. The bench verifier checks the whole history (no two clients told they held one
unit at once, every live claim owns each of its items' units) and no unit is left owned by
anything but a live claim (a refused multi-resource create left nothing behind)."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time

import asyncpg
import redis.asyncio as aioredis

from benchmarks import history as h
from benchmarks.verifier import live_claims, scan_redis, verify
from engine.access import RedisAccess
from engine.errors import HoldConflict
from engine.keys import KeySpace
from engine.lifecycle import BOOKED_PREFIX
from engine.reservations import ReservationEngine
from engine.resources import DAY_MS, Resource, ResourceCatalog, Vendor
from engine.settings import Settings
from tests.conftest import DATABASE_URL, REDIS_URL
from tests.test_api_fixtures import api_settings, migrated  # noqa: F401  (fixtures)

T0 = 1_893_456_000_000
NAMES = [f"res-{n}" for n in range(6)]
PROCESSES, CLIENTS, ROUNDS, SHARDS, HORIZON = 4, 16, 10, 8, 30


def catalog() -> ResourceCatalog:
    return ResourceCatalog([Resource(r, unit_ms=DAY_MS, vendor_id="inn", shard_key="inn")
                            for r in NAMES],
                           [Vendor("inn", NAMES[0], confirmation_required=False)])


def _worker(prefix: str, seed: int, start_at: float, out) -> None:
    async def run():
        settings = Settings.from_env({}, redis_url=REDIS_URL, key_prefix=prefix,
                                     shards=SHARDS)
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        access = RedisAccess(client)
        cat = catalog()
        engine = ReservationEngine(access, KeySpace(prefix, SHARDS), cat, settings)
        vendor = cat.vendor("inn")
        entries: list[tuple] = []
        counts = {"multi": 0, "single": 0, "conflict": 0}

        async def one_client(c: int):
            rng = random.Random(seed * 1000 + c)
            mine: list[str] = []
            for _ in range(ROUNDS):
                if mine and rng.random() < 0.4:
                    rid = mine.pop(rng.randrange(len(mine)))
                    sent = time.monotonic()
                    await engine.act(rid, "cancel", actor="partner")
                    entries.append((h.CANCEL, h.OK, rid, "", 0, -1, sent, time.monotonic()))
                    continue
                n = rng.choice((1, 2, 3))
                picks = rng.sample(NAMES, n)
                items = []
                for name in picks:
                    first = T0 // DAY_MS + rng.randrange(HORIZON)
                    nights = rng.randrange(1, 3)
                    items.append((name, first * DAY_MS, (first + nights) * DAY_MS, first,
                                  first + nights - 1, first * DAY_MS, (first + nights) * DAY_MS))
                p = engine.placement(partner_id=f"p{seed}", vendor=vendor,
                                     resource=cat.get(picks[0]), start_ms=items[0][1],
                                     end_ms=items[0][2], requester_id="r", metadata_text="{}",
                                     idempotency_key="", triggered_by="partner")
                if n > 1:
                    import dataclasses
                    p = dataclasses.replace(p, items=tuple(items))
                sent = time.monotonic()
                try:
                    moved = await engine.place(p)
                except HoldConflict:
                    counts["conflict"] += 1
                    continue
                answered = time.monotonic()
                counts["multi" if n > 1 else "single"] += 1
                for it in items:
                    entries.append((h.CREATE, h.OK, moved.reservation_id, it[0], it[3], it[4],
                                    sent, answered))
                mine.append(moved.reservation_id)

        while time.time() < start_at:
            await asyncio.sleep(0.005)
        await asyncio.gather(*(one_client(c) for c in range(CLIENTS)))
        await access.close()
        await client.aclose()
        return entries, counts

    out.put(asyncio.run(run()))


async def test_multi_resource_creates_race_single_ones_without_overlap(migrated, redis):
    prefix = migrated.key_prefix
    keys = KeySpace(prefix, SHARDS)
    settings = Settings.from_env({}, redis_url=REDIS_URL, key_prefix=prefix, shards=SHARDS)
    await ReservationEngine(RedisAccess(redis), keys, catalog(), settings).mark_ready()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 3.0
    procs = [ctx.Process(target=_worker, args=(prefix, seed, start_at, queue))
             for seed in range(PROCESSES)]
    for p in procs:
        p.start()
    entries, counts = [], {"multi": 0, "single": 0, "conflict": 0}
    for _ in procs:
        got, got_counts = queue.get(timeout=600)
        entries += [h.Entry(*e) for e in got]
        for k, v in got_counts.items():
            counts[k] += v
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert counts["multi"] > 20 and counts["single"] > 20 and counts["conflict"] > 20, counts
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'SET search_path TO "{migrated.db_schema}"')
        report = await verify(redis, keys, conn, entries, drained=False)
    finally:
        await conn.close()
    assert report.violations == [], [v.as_dict() for v in report.violations[:5]]
    state = await scan_redis(redis, keys)
    owners = {claim[3] for claim in live_claims(state).values()}
    orphans = {v for v in state.units.values() if v not in owners
               and not v.startswith(BOOKED_PREFIX)}
    assert orphans == set()
    multi_live = [r for r in state.reservations.values()
                  if r.get("it") and r.get("st") == "AUTHORIZED_BOTH"]
    assert multi_live  # multi-resource reservations survived to the end and were checked
