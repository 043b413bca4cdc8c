"""No double booking under real contention: several processes, many tasks each, random
overlapping intervals (buffers included), checked over the whole history afterwards."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
from collections import defaultdict

import pytest

from engine.access import RedisAccess
from engine.connection import open_redis
from engine.errors import HoldConflict
from benchmarks.holds import BOOKED_PREFIX, HoldEngine
from engine.keys import KeySpace
from engine.reservations import ReservationEngine
from engine.resources import MINUTE_MS, Resource, ResourceCatalog, Vendor
from engine.settings import Settings
from tests.conftest import REDIS_URL

T0 = 1_893_456_000_000
UNIT = 15 * MINUTE_MS
PROCESSES = 4


def contention_catalog() -> ResourceCatalog:
    return ResourceCatalog(
        [Resource("plain", unit_ms=UNIT, vendor_id="v1"),
         Resource("buffered", unit_ms=UNIT, buffer_before_ms=UNIT, buffer_after_ms=2 * UNIT,
                  vendor_id="v1"),
         Resource("rooms", unit_ms=86_400_000, vendor_id="v2")],
        [Vendor("v1", "plain", confirmation_required=True),
         Vendor("v2", "rooms", confirmation_required=False)],
    )


def _worker(prefix: str, seed: int, attempts: int, start, identical: bool, out,
            target: tuple[str, bool] = (REDIS_URL, False)):
    async def run():
        redis_url, cluster = target
        settings = Settings.from_env({}, redis_url=redis_url, redis_cluster=cluster,
                                     key_prefix=prefix, shards=8)
        client = open_redis(settings)
        access = RedisAccess(client)
        keys = KeySpace(prefix, settings.shards)
        catalog = contention_catalog()
        holds = HoldEngine(access, keys, catalog, settings)
        reservations = ReservationEngine(access, keys, catalog, settings)
        await reservations.mark_ready()
        rng = random.Random(seed)

        async def attempt(i: int):
            if identical:
                resource, start, end = "buffered", T0, T0 + 4 * UNIT
            else:
                resource = rng.choice(["plain", "buffered", "rooms"])
                unit = 86_400_000 if resource == "rooms" else UNIT
                start = T0 + rng.randrange(0, 40) * unit
                end = start + rng.randrange(1, 6) * unit
            try:
                if i % 2:
                    hold = await holds.place(resource, start, end, owner=f"p{seed}")
                    return ("ok", hold.hold_id, resource, hold.first_unit, hold.last_unit,
                            hold.fence_token)
                vendor = "v2" if resource == "rooms" else "v1"
                moved = await reservations.create(
                    partner_id=f"p{seed}", vendor_id=vendor, resource_id=resource,
                    start_ms=start, end_ms=end, requester_id="r")
                got = await reservations.get(moved.reservation_id)
                first = got.block_start_ms // catalog.get(resource).unit_ms
                last = got.block_end_ms // catalog.get(resource).unit_ms - 1
                return ("ok", moved.reservation_id, resource, first, last, None)
            except HoldConflict as exc:
                return ("conflict", exc.holder, resource, exc.unit, None, None)

        # Every process is connected and ready before any attempts: they start together on
        # a barrier, not at a wall-clock instant a slow spawn could miss.
        start.wait(120)
        results = await asyncio.gather(*(attempt(i) for i in range(attempts)))
        await client.aclose()
        return results

    out.put(asyncio.run(run()))


@pytest.fixture
def contention_target() -> tuple[str, bool]:
    """The Redis the processes contend on: (REDIS_URL, cluster mode). The cluster suite
    (tests/cluster/conftest.py) overrides it with its local cluster."""
    return (REDIS_URL, False)


def run_processes(prefix: str, attempts: int, identical: bool,
                  target: tuple[str, bool] = (REDIS_URL, False)) -> list[tuple]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start = ctx.Barrier(PROCESSES)
    procs = [ctx.Process(target=_worker, args=(prefix, seed, attempts, start, identical,
                                                queue, target)) for seed in range(PROCESSES)]
    for p in procs:
        p.start()
    results = []
    for _ in procs:
        results.extend(queue.get(timeout=300))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


async def test_overlapping_random_intervals_from_several_processes(redis, prefix,
                                                                  contention_target):
    results = run_processes(prefix, attempts=150, identical=False, target=contention_target)
    assert len(results) == PROCESSES * 150
    winners = [r for r in results if r[0] == "ok"]
    conflicts = [r for r in results if r[0] == "conflict"]
    assert winners and conflicts  # the load really contended

    # 1. No two successful holds overlap on one resource (buffers included).
    owner_of: dict[tuple[str, int], str] = {}
    for _, hold_id, resource, first, last, _ in winners:
        for unit in range(first, last + 1):
            assert (resource, unit) not in owner_of, (
                f"double booking on {resource} unit {unit}: {owner_of[(resource, unit)]} "
                f"and {hold_id}")
            owner_of[(resource, unit)] = hold_id

    # 2. The final Redis state agrees with the history: every winner owns its units.
    keys = KeySpace(prefix, 8)
    for (resource, unit), hold_id in owner_of.items():
        assert await redis.get(keys.unit(resource, unit)) == hold_id

    # 3. Every conflict names a holder that won, on a unit that holder really owns.
    winner_ids = {w[1] for w in winners}
    for _, holder, resource, unit, _, _ in conflicts:
        assert not holder.startswith(BOOKED_PREFIX)
        assert holder in winner_ids
        assert owner_of[(resource, unit)] == holder

    # 4. Fencing tokens of plain holds are unique per resource.
    tokens = defaultdict(list)
    for _, _, resource, _, _, token in winners:
        if token is not None:
            tokens[resource].append(token)
    for resource, values in tokens.items():
        assert len(values) == len(set(values)), resource


async def test_identical_requests_from_several_processes_one_winner(redis, prefix,
                                                                   contention_target):
    results = run_processes(prefix, attempts=60, identical=True, target=contention_target)
    winners = [r for r in results if r[0] == "ok"]
    assert len(winners) == 1
    assert {r[1] for r in results if r[0] == "conflict"} == {winners[0][1]}
