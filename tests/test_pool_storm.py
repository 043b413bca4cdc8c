"""A storm of pooled holds (issue 16, pool): 64 clients in 4 processes over a 20-room group,
random stays, creates and cancels, first_fit and best_fit mixed. Checked over the whole
history by the bench verifier (no double booking in Redis, Postgres or what clients were
told) and by benchmarks/pool_verifier.py (never POOL_FULL while a member was free)."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import random
import time

import asyncpg
import redis.asyncio as aioredis

from benchmarks import history as h
from benchmarks.pool_verifier import POOL_FULL, PoolFull, check_pool_full
from benchmarks.verifier import verify
from engine.access import RedisAccess
from engine.errors import PoolFull as PoolFullError
from engine.keys import KeySpace
from engine.pool import PoolChoice
from engine.reservations import ReservationEngine
from engine.resources import DAY_MS, Resource, ResourceCatalog, Vendor
from engine.settings import Settings
from tests.conftest import DATABASE_URL, REDIS_URL
from tests.test_api_fixtures import api_settings, migrated  # noqa: F401  (fixtures)

T0 = 1_893_456_000_000  # 2030-01-01, a night grid
ROOMS = [f"room-{n:02d}" for n in range(20)]
PROCESSES, CLIENTS, ROUNDS = 4, 16, 12
SHARDS = 8
HORIZON = 10  # nights the stays fall in: small, so the pool fills up and frees again


def catalog() -> ResourceCatalog:
    return ResourceCatalog([Resource(r, unit_ms=DAY_MS, vendor_id="inn", shard_key="inn")
                            for r in ROOMS],
                           [Vendor("inn", ROOMS[0], confirmation_required=False)])


def _worker(prefix: str, seed: int, start_at: float, out) -> None:
    async def run():
        settings = Settings.from_env({}, redis_url=REDIS_URL, key_prefix=prefix,
                                     shards=SHARDS)
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        access = RedisAccess(client)
        cat = catalog()
        engine = ReservationEngine(access, KeySpace(prefix, SHARDS), cat, settings)
        vendor = cat.vendor("inn")
        members = [cat.get(r) for r in ROOMS]
        entries: list[tuple] = []
        refusals: list[tuple] = []

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
                first = T0 // DAY_MS + rng.randrange(HORIZON)
                nights = rng.randrange(1, 4)
                start, end = first * DAY_MS, (first + nights) * DAY_MS
                order = members[:]
                rng.shuffle(order)  # each client's own preference order
                candidates = tuple((m, first, first + nights - 1, start, end) for m in order)
                choice = PoolChoice("double", rng.random() < 0.5, candidates)
                placement = dataclasses.replace(engine.placement(
                    partner_id=f"p{seed}", vendor=vendor, resource=members[0], start_ms=start,
                    end_ms=end, requester_id="r", metadata_text="{}", idempotency_key="",
                    triggered_by="partner"), pool=choice)
                sent = time.monotonic()
                try:
                    moved = await engine.place(placement)
                except PoolFullError:
                    refusals.append(("double", [(m.id, first, first + nights - 1)
                                                for m in order], sent, time.monotonic()))
                    continue
                entries.append((h.CREATE, h.OK, moved.reservation_id, moved.resource_id,
                                first, first + nights - 1, sent, time.monotonic()))
                mine.append(moved.reservation_id)

        while time.time() < start_at:
            await asyncio.sleep(0.005)
        await asyncio.gather(*(one_client(c) for c in range(CLIENTS)))
        await access.close()
        await client.aclose()
        return entries, refusals

    out.put(asyncio.run(run()))


async def test_pooled_storm_never_double_books_nor_reports_a_free_pool_full(migrated, redis):
    prefix = migrated.key_prefix
    keys = KeySpace(prefix, SHARDS)
    settings = Settings.from_env({}, redis_url=REDIS_URL, key_prefix=prefix, shards=SHARDS)
    engine = ReservationEngine(RedisAccess(redis), keys, catalog(), settings)
    await engine.mark_ready()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 3.0
    procs = [ctx.Process(target=_worker, args=(prefix, seed, start_at, queue))
             for seed in range(PROCESSES)]
    for p in procs:
        p.start()
    entries, refusals = [], []
    for _ in procs:
        got_entries, got_refusals = queue.get(timeout=600)
        entries += [h.Entry(*e) for e in got_entries]
        refusals += [PoolFull(g, tuple(map(tuple, m)), s, a) for g, m, s, a in got_refusals]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    created = [e for e in entries if e.op == h.CREATE]
    # The load really contended: the pool filled up and members were chosen all over.
    assert refusals and len(created) > 100
    assert len({e.resource for e in created}) == len(ROOMS)
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'SET search_path TO "{migrated.db_schema}"')
        report = await verify(redis, keys, conn, entries, drained=False)
    finally:
        await conn.close()
    assert report.violations == [], [v.as_dict() for v in report.violations[:5]]
    assert report.checked["reservations"] == len(created)
    assert check_pool_full(entries, refusals) == []
