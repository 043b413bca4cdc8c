"""Redis cost of pooled holds and moves against a single-resource create (issue 16, pool).

``python -m benchmarks.pool_cost [--calls N]`` starts a private redis-server
(benchmarks/private_redis.py), loads the scripts and runs each phase through the engine
(``ReservationEngine.place`` / ``modify``: exactly the script calls the API makes), 50 calls
in flight at a time. Per phase it reports, per call, the script time ``INFO commandstats``
gives EVALSHA (usec) and the redis-server process CPU (/proc), and the ratio to the
single-resource create. Phases:

- ``create``: one resource, a 30-minute slot (2 units), every call on free units;
- ``pooled_first_fit_free``: a 50-room group, every call on a fresh slot (the first member
  is free: the choice costs one member's check, plus the 50-candidate argument list);
- ``pooled_first_fit_filling``: a 50-room group, 50 calls per slot, so the i-th call of a slot
  checks i members (the mean is 25.5): the fill of a real day;
- ``pooled_best_fit_free``: best_fit over a free 50-room group: every member's gap is looked
  at (``SLOTGUARD_POOL_FIT_WINDOW_UNITS`` each side), the worst case of that strategy;
- ``pooled_best_fit_fragmented``: best_fit over a 50-room group whose day is fragmented
  (seeded: per room, taken runs of 1-8 units and free runs of 0-6, about 55 % taken), each
  call on a random 2-unit slot of it; a call finding the pool full still counts (its
  script ran) and is reported apart;
- ``modify``: a live hold moved to a slot that overlaps its own (as tests/test_modify does);
- ``multi_4_items``: a multi-resource reservation of 4 items (4 resources, 2 units each).

``--rules-revision REV`` passes REV as the availability rules revision of every creation, as
the API does when the availability engine runs (issue 13): each create script then confirms
it beside the resources it may take (a pooled create: every candidate; ``0`` matches the
revision of a vendor that never published one).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import time

import redis.asyncio as aioredis

from benchmarks.private_redis import PrivateRedis
from benchmarks.private_scenarios import counters
from engine.access import RedisAccess
from engine.errors import PoolFull
from engine.keys import KeySpace
from engine.pool import PoolChoice
from engine.reservations import ReservationEngine
from engine.resources import MINUTE_MS, Resource, ResourceCatalog, Vendor
from engine.settings import Settings

UNIT = 15 * MINUTE_MS
T0 = 1_893_456_000_000
ROOMS = [f"room-{i:02d}" for i in range(50)]
IN_FLIGHT = 50


def catalog() -> ResourceCatalog:
    rooms = [Resource(r, unit_ms=UNIT, vendor_id="hotel", shard_key="hotel") for r in ROOMS]
    single = Resource("chair", unit_ms=UNIT, vendor_id="hotel", shard_key="hotel")
    return ResourceCatalog(rooms + [single],
                           [Vendor("hotel", "chair", confirmation_required=True)])


async def run(calls: int, only: set[str] | None = None, rules_revision: str = "") -> dict:
    redis_server = PrivateRedis()
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    access = RedisAccess(client)
    try:
        settings = Settings.from_env({}, redis_url=redis_server.url, key_prefix="b:",
                                     shards=16, hold_ttl_ms=600_000)
        await access.load_scripts()
        cat = catalog()
        engine = ReservationEngine(access, KeySpace("b:", 16), cat, settings)
        await engine.mark_ready()
        place = engine.place

        async def revised_place(p):  # the revision the API would pass (issue 13)
            return await place(dataclasses.replace(p, rules_revision=rules_revision))
        vendor, chair = cat.vendor("hotel"), cat.get("chair")
        members = [cat.get(r) for r in ROOMS]

        def single(i: int):
            start = T0 + 2 * i * UNIT
            return engine.placement(partner_id="p", vendor=vendor, resource=chair,
                                    start_ms=start, end_ms=start + 2 * UNIT, requester_id="r",
                                    metadata_text="{}", idempotency_key="",
                                    triggered_by="partner")

        def pooled(slot: int, tightest: bool):
            start = T0 + 2 * slot * UNIT
            first = start // UNIT
            candidates = tuple((m, first, first + 1, start, start + 2 * UNIT)
                               for m in members)
            p = engine.placement(partner_id="p", vendor=vendor, resource=members[0],
                                 start_ms=start, end_ms=start + 2 * UNIT, requester_id="r",
                                 metadata_text="{}", idempotency_key="",
                                 triggered_by="partner")
            return dataclasses.replace(p, pool=PoolChoice("double", tightest, candidates))

        phases: dict[str, dict] = {}
        offset = [0]

        async def phase(name: str, make, n: int) -> None:
            if only and name != "create" and name not in only:
                return
            before = await counters(client, redis_server.pid)
            t0 = time.perf_counter()
            for chunk in range(0, n, IN_FLIGHT):
                await asyncio.gather(*(make(i) for i in range(chunk, min(n, chunk + IN_FLIGHT))))
            seconds = time.perf_counter() - t0
            after = await counters(client, redis_server.pid)
            calls_n, usec = after["commands"]["evalsha"]
            calls0, usec0 = before["commands"].get("evalsha", (0, 0))
            # The commands the scripts called, per script call (how many, and their time).
            inner = {}
            for cmd, (c1, u1) in after["commands"].items():
                c0, u0 = before["commands"].get(cmd, (0, 0))
                if c1 > c0 and cmd not in ("evalsha", "info", "script|load"):
                    inner[cmd] = [round((c1 - c0) / n, 2), round((u1 - u0) / n, 2)]
            phases[name] = {
                "calls": n, "evalsha_calls": calls_n - calls0,
                "script_usec_per_call": round((usec - usec0) / (calls_n - calls0), 2),
                "redis_cpu_us_per_call": round((after["cpu_s"] - before["cpu_s"]) / n * 1e6, 2),
                "calls_per_s": round(n / seconds),
                "inner_calls_and_usec_per_call": inner}

        async def do_single(i):
            await revised_place(single(offset[0] + i))

        await phase("create", do_single, calls)
        offset[0] += calls
        base = 100_000

        async def do_pooled_free(i):
            await revised_place(pooled(base + i, False))

        await phase("pooled_first_fit_free", do_pooled_free, calls)

        filling_slots = max(1, calls // len(ROOMS))

        async def do_filling(i):  # calls go slot by slot: one slot fills before the next
            await revised_place(pooled(base + calls + i // len(ROOMS), False))

        # In flight 50 at a time in call order: each chunk is one slot filling up.
        await phase("pooled_first_fit_filling", do_filling, filling_slots * len(ROOMS))

        async def do_best_fit(i):
            await revised_place(pooled(base + 2 * calls + 10 * i, True))

        await phase("pooled_best_fit_free", do_best_fit, calls)

        # A fragmented day: per room, taken runs of 1-8 units, free runs of 0-6 (seeded).
        rng = random.Random(16)
        day0 = (T0 + 2 * (base + 12 * calls) * UNIT) // UNIT
        span = max(400, calls // 2)
        pipe = client.pipeline(transaction=False)
        taken_units = 0
        for m in members:
            u = day0
            while u < day0 + span:
                u += rng.randrange(0, 7)
                run = rng.randrange(1, 9)
                for k in range(u, min(u + run, day0 + span)):
                    pipe.set(engine.keys.unit(m.id, k, m.shard_name), "B|rsv_fill")
                    taken_units += 1
                u += run
        await pipe.execute()
        slots = [day0 + 8 + rng.randrange(span - 18) for _ in range(calls)]
        full = [0]

        async def do_best_fit_fragmented(i):
            first = slots[i]
            candidates = tuple((m, first, first + 1, first * UNIT, (first + 2) * UNIT)
                               for m in members)
            p = dataclasses.replace(engine.placement(
                partner_id="p", vendor=vendor, resource=members[0], start_ms=first * UNIT,
                end_ms=(first + 2) * UNIT, requester_id="r", metadata_text="{}",
                idempotency_key="", triggered_by="partner"),
                pool=PoolChoice("double", True, candidates))
            try:
                await revised_place(p)
            except PoolFull:
                full[0] += 1

        await phase("pooled_best_fit_fragmented", do_best_fit_fragmented, calls)
        if "pooled_best_fit_fragmented" in phases:
            phases["pooled_best_fit_fragmented"].update(
                pool_full=full[0], taken_before=round(taken_units / (span * len(members)), 3))

        held = [await revised_place(single(10 * calls + 4 * i)) for i in range(calls)] \
            if not only or "modify" in only else []

        async def do_modify(i):
            start = T0 + (2 * (10 * calls + 4 * i) + 1) * UNIT  # overlaps its own slot
            await engine.modify(held[i].reservation_id, actor="partner", resource=chair,
                                start_ms=start, end_ms=start + 2 * UNIT)

        await phase("modify", do_modify, calls)

        def multi(i: int):
            start = T0 + 2 * (20 * calls + i) * UNIT
            first = start // UNIT
            items = tuple((m.id, start, start + 2 * UNIT, first, first + 1, start,
                           start + 2 * UNIT) for m in members[:4])
            p = engine.placement(partner_id="p", vendor=vendor, resource=members[0],
                                 start_ms=start, end_ms=start + 2 * UNIT, requester_id="r",
                                 metadata_text="{}", idempotency_key="",
                                 triggered_by="partner")
            return dataclasses.replace(p, items=items)

        async def do_multi(i):
            await revised_place(multi(i))

        await phase("multi_4_items", do_multi, calls)
        create = phases["create"]
        for figures in phases.values():
            figures["script_usec_vs_create"] = round(
                figures["script_usec_per_call"] / create["script_usec_per_call"], 2)
            figures["redis_cpu_vs_create"] = round(
                figures["redis_cpu_us_per_call"] / create["redis_cpu_us_per_call"], 2)
        return {"phases": phases, "load_average": os.getloadavg(), "cpus": os.cpu_count(),
                "fit_window_units": settings.pool_fit_window_units,
                "rules_revision": rules_revision}
    finally:
        await access.close()
        await client.aclose()
        redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--phases", default="", help="comma-separated phases to run (create, "
                        "the baseline, always runs); default all")
    parser.add_argument("--rules-revision", default="",
                        help="the availability rules revision every creation passes ('' none)")
    args = parser.parse_args()
    only = {p for p in args.phases.split(",") if p} or None
    print(json.dumps(asyncio.run(run(args.calls, only, args.rules_revision)), indent=2))


if __name__ == "__main__":
    main()
