"""Waitlist handoff under a storm from several processes (issue 16), over real Redis: traffic
processes create short holds, cancel them and put entries on the waitlist of random slots of
one resource, while two reaper processes expire overdue holds. Checked over the whole
history: the shard's commit-queue stream is the order in which the scripts ran, so replaying
it must never show a hold taking a unit another live, not yet lapsed hold owns; no entry is
fulfilled twice; and at the end (every hold reaped) no waiting entry is lost: each one still
waiting finds its slot held."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time

import redis.asyncio as aioredis

from engine.access import RedisAccess
from engine.errors import EngineError
from engine.keys import KeySpace
from engine.reservations import ReservationEngine
from engine.resources import MINUTE_MS, Resource, ResourceCatalog, Vendor
from engine.settings import Settings
from engine.waitlist import EntryPlacement, WaitlistEngine
from tests.conftest import REDIS_URL
from tests.timing import server_ms

T0 = 1_893_456_000_000
UNIT = 15 * MINUTE_MS
SHARDS = 4
TRAFFIC, REAPERS = 3, 2
SECONDS = 6.0
TERMINAL_STATES = {"CANCELLED", "EXPIRED", "FAILED_VENDOR_TIMEOUT", "FAILED_AVAILABILITY_CHANGED",
                   "FAILED_VENDOR_AUTH", "FAILED_REQUESTER_AUTH", "FAILED_COMMIT", "COMMITTED"}


def _settings(prefix: str) -> Settings:
    return Settings.from_env({}, redis_url=REDIS_URL, key_prefix=prefix, shards=SHARDS,
                             hold_ttl_ms=700)


def _catalog() -> ResourceCatalog:
    return ResourceCatalog([Resource("plain", unit_ms=UNIT, vendor_id="v1")],
                           [Vendor("v1", "plain", confirmation_required=True)])


def _traffic(prefix: str, seed: int, barrier, out) -> None:
    async def run() -> None:
        settings = _settings(prefix)
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        access = RedisAccess(client)
        keys = KeySpace(prefix, SHARDS)
        catalog = _catalog()
        engine = ReservationEngine(access, keys, catalog, settings)
        waitlist = WaitlistEngine(access, keys, settings)
        resource, vendor = catalog.get("plain"), catalog.vendor("v1")
        rng = random.Random(seed)
        mine: list[str] = []
        counts = {"created": 0, "conflict": 0, "entries": 0, "cancelled": 0}
        await asyncio.to_thread(barrier.wait, 120)  # every process set up: start together
        start_at = time.time()

        async def task() -> None:
            while time.time() < start_at + SECONDS:
                start = T0 + rng.randrange(0, 12) * UNIT
                end = start + rng.randrange(1, 4) * UNIT
                roll = rng.random()
                try:
                    if roll < 0.45:
                        moved = await engine.create(partner_id=f"p{seed}", vendor_id="v1",
                                                    resource_id="plain", start_ms=start,
                                                    end_ms=end, requester_id="r")
                        mine.append(moved.reservation_id)
                        counts["created"] += 1
                    elif roll < 0.8:
                        first, last = resource.units(start, end, settings.max_hold_units)
                        await waitlist.add(EntryPlacement(
                            entry_id=keys.new_waitlist_entry_id(resource.shard_name),
                            partner_id=f"w{seed}", vendor=vendor, resource=resource,
                            start_ms=start, end_ms=end, first_unit=first, last_unit=last,
                            block_start_ms=first * UNIT, block_end_ms=(last + 1) * UNIT,
                            requester_id="r", ttl_ms=rng.randrange(1_000, 4_000),
                            metadata_text="{}"), cap_expires_at_ms=T0)
                        counts["entries"] += 1
                    elif mine:
                        await engine.act(mine.pop(rng.randrange(len(mine))), "cancel",
                                         actor="partner")
                        counts["cancelled"] += 1
                except EngineError:
                    counts["conflict"] += 1

        try:
            await asyncio.gather(*(task() for _ in range(8)))
        finally:
            await access.close()
            await client.aclose()
        out.put(("traffic", counts))

    asyncio.run(run())


def _reaper(prefix: str, barrier, out) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        access = RedisAccess(client)
        keys = KeySpace(prefix, SHARDS)
        engine = ReservationEngine(access, keys, _catalog(), _settings(prefix))
        handed = 0
        await asyncio.to_thread(barrier.wait, 120)
        start_at = time.time()
        try:
            while time.time() < start_at + SECONDS + 1:
                for shard in range(SHARDS):
                    for moved in await engine.reap(shard):
                        handed += len(moved.handoffs)
                await asyncio.sleep(0.03)
        finally:
            await access.close()
            await client.aclose()
        out.put(("reaper", handed))

    asyncio.run(run())


async def test_a_storm_never_double_books_never_gives_twice_never_loses(redis, prefix):
    keys = KeySpace(prefix, SHARDS)
    access = RedisAccess(redis)
    engine = ReservationEngine(access, keys, _catalog(), _settings(prefix))
    await engine.mark_ready()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    barrier = ctx.Barrier(TRAFFIC + REAPERS)
    procs = [ctx.Process(target=_traffic, args=(prefix, seed, barrier, out))
             for seed in range(TRAFFIC)]
    procs += [ctx.Process(target=_reaper, args=(prefix, barrier, out)) for _ in range(REAPERS)]
    for p in procs:
        p.start()
    results = [await asyncio.to_thread(out.get, True, 180) for _ in procs]
    for p in procs:
        await asyncio.to_thread(p.join, 60)
        assert p.exitcode == 0
    traffic = [r for kind, r in results if kind == "traffic"]
    assert sum(t["created"] for t in traffic) > 0 and sum(t["entries"] for t in traffic) > 0

    # Reap until nothing is overdue (handed-over holds are fresh: they may need a round).
    shard = keys.shard_of("plain")
    for _ in range(20):
        overdue = await redis.zrangebyscore(keys.deadlines(shard), "-inf",
                                            await server_ms(redis))
        if not overdue:
            break
        await engine.reap(shard)
    await access.close()

    # 1. Replay the stream in order: a creation never takes a unit of a live, unlapsed hold.
    live: dict[int, tuple[str, int]] = {}  # unit -> (reservation, its deadline)
    place: dict[str, tuple[int, int]] = {}
    by_entry: dict[str, list[str]] = {}
    history = await redis.xrange(keys.events(shard))
    assert history
    for _, e in history:
        rid, at = e["reservationId"], int(e["timestamp"])
        if e.get("fromState") == "INTENT_CREATED":
            first, last = int(e["blockStart"]) // UNIT, int(e["blockEnd"]) // UNIT - 1
            for unit in range(first, last + 1):
                holder = live.get(unit)
                assert holder is None or holder[1] < at, (rid, unit, holder, at)
                live[unit] = (rid, int(e["expiresAt"]))
            place[rid] = (first, last)
            if e.get("origin") == "waitlist":
                by_entry.setdefault(e["waitlistEntryId"], []).append(rid)
        elif e["toState"] in TERMINAL_STATES:
            first, last = place[rid]
            for unit in range(first, last + 1):
                if live.get(unit, ("",))[0] == rid:
                    del live[unit]
    # 2. Never given twice: one hold per fulfilled entry, and it is the entry's own id.
    assert by_entry, "the storm handed no slot over"
    for entry_id, rids in by_entry.items():
        assert rids == ["rsv" + entry_id.removeprefix("wl")], (entry_id, rids)
    # 3. Never lost: an entry still waiting (and not expired) finds some unit of its slot
    # held, every freed interval having served the waitlist; or a hold overlapping it lapsed
    # since the last reap (handed-over holds are fresh, 700 ms): the next reap serves it.
    async def lapsed_spans() -> list[tuple[int, int]]:
        spans = []
        for rid in await redis.zrangebyscore(keys.deadlines(shard), "-inf",
                                             await server_ms(redis)):
            rec = await redis.hgetall(keys.reservation(rid))
            spans.append((int(rec["f"]), int(rec["l"])))
        return spans

    waiting = 0
    async for key in redis.scan_iter(match=f"{prefix}*:wl:wl_*", count=1000):
        entry = await redis.hgetall(key)
        if entry["st"] == "fulfilled":
            assert entry["r"] in place
            continue
        if entry["st"] != "waiting" or int(entry["x"]) <= await server_ms(redis):
            continue
        waiting += 1
        units = range(int(entry["f"]), int(entry["l"]) + 1)
        owners = [await redis.get(keys.unit("plain", u)) for u in units]
        lapsed = await lapsed_spans()  # read after the units: a lapse meanwhile is seen
        if int(entry["x"]) <= await server_ms(redis):
            continue  # it expired meanwhile: a slot freed after that is not owed to it
        assert any(owners) or any(f <= units[-1] and units[0] <= l for f, l in lapsed), \
            (key, entry, lapsed)
    fulfilled = sum(len(v) for v in by_entry.values())
    assert fulfilled == sum(1 for _ in by_entry)
    print(f"storm: {fulfilled} handed over, {waiting} still waiting, "
          f"{sum(t['created'] for t in traffic)} created directly")
