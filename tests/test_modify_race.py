"""Moves racing creates on the same units (issue 16), from several processes and many tasks
each, over real Redis. Checked over the whole history: the shard's commit-queue stream is
the order in which the scripts ran, so replaying it (creations, moves, cancels) must never
show two live reservations on one unit at any moment, and must end where Redis is."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time

import redis.asyncio as aioredis

from engine.access import RedisAccess
from engine.errors import HoldConflict
from engine.keys import KeySpace
from engine.lifecycle import TERMINAL
from engine.reservations import ReservationEngine
from engine.resources import MINUTE_MS, Resource, ResourceCatalog, Vendor
from engine.settings import Settings
from engine.store.events import fields_dict
from tests.conftest import REDIS_URL

T0 = 1_893_456_000_000
UNIT = 15 * MINUTE_MS
PROCESSES = 4
SHARDS = 8


def second_resource() -> str:
    """A resource under the same hash tag as 'plain' (a move between them is one script)."""
    keys = KeySpace("x:", SHARDS)
    return next(f"plain-{n}" for n in range(1000)
                if keys.shard_of(f"plain-{n}") == keys.shard_of("plain"))


def race_catalog() -> ResourceCatalog:
    other = second_resource()
    return ResourceCatalog(
        [Resource("plain", unit_ms=UNIT, vendor_id="v1"),
         Resource(other, unit_ms=UNIT, buffer_after_ms=UNIT, vendor_id="v1")],
        [Vendor("v1", "plain", confirmation_required=True)])


def _worker(prefix: str, seed: int, own: list[str], start_at: float, identical: bool, out):
    async def run():
        settings = Settings.from_env({}, redis_url=REDIS_URL, key_prefix=prefix, shards=SHARDS)
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        access = RedisAccess(client)
        keys = KeySpace(prefix, SHARDS)
        catalog = race_catalog()
        engine = ReservationEngine(access, keys, catalog, settings)
        rng = random.Random(seed)
        names = ["plain", second_resource()]

        async def attempt(i: int):
            if identical:
                resource, start, end = "plain", T0, T0 + 4 * UNIT
            else:
                resource = rng.choice(names)
                start = T0 + rng.randrange(0, 30) * UNIT
                end = start + rng.randrange(1, 5) * UNIT
            try:
                if i % 2 and i // 2 < len(own):
                    moved = await engine.modify(own[i // 2], actor="partner",
                                                resource=catalog.get(resource),
                                                start_ms=start, end_ms=end)
                    return ("moved", moved.reservation_id, moved.version)
                if not identical and i % 7 == 0 and own:
                    try:
                        await engine.act(rng.choice(own), "cancel", actor="partner")
                        return ("cancelled", None, None)
                    except Exception:  # already cancelled by a sibling: nothing moved
                        return ("refused", None, None)
                moved = await engine.create(partner_id=f"p{seed}", vendor_id="v1",
                                            resource_id=resource, start_ms=start, end_ms=end,
                                            requester_id="r")
                return ("created", moved.reservation_id, moved.version)
            except HoldConflict as exc:
                return ("conflict", exc.holder, None)
            except Exception as exc:  # a move of a reservation a sibling cancelled
                return ("refused", type(exc).__name__, None)

        while time.time() < start_at:
            await asyncio.sleep(0.005)
        results = await asyncio.gather(*(attempt(i) for i in range(2 * len(own) + 20)))
        await client.aclose()
        return results

    out.put(asyncio.run(run()))


async def _seed(prefix: str, count: int) -> list[list[str]]:
    """Reservations every process will move: far from the contended range, one per slot."""
    settings = Settings.from_env({}, redis_url=REDIS_URL, key_prefix=prefix, shards=SHARDS)
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    engine = ReservationEngine(RedisAccess(client), KeySpace(prefix, SHARDS), race_catalog(),
                               settings)
    await engine.mark_ready()
    owned: list[list[str]] = []
    n = 0
    for p in range(PROCESSES):
        mine = []
        for _ in range(count):
            moved = await engine.create(partner_id=f"p{p}", vendor_id="v1",
                                        resource_id="plain", start_ms=T0 + (100 + 2 * n) * UNIT,
                                        end_ms=T0 + (101 + 2 * n) * UNIT, requester_id="r")
            mine.append(moved.reservation_id)
            n += 1
        owned.append(mine)
    await client.aclose()
    return owned


def run_processes(prefix: str, owned: list[list[str]], identical: bool) -> list[tuple]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 3.0
    procs = [ctx.Process(target=_worker, args=(prefix, seed, owned[seed], start_at, identical,
                                                queue)) for seed in range(PROCESSES)]
    for p in procs:
        p.start()
    results = []
    for _ in procs:
        results.extend(queue.get(timeout=180))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


async def replay(redis, prefix: str) -> tuple[dict[str, tuple[str, int, int]], int]:
    """Replay the shard's stream in order; assert no two live reservations share a unit at
    any moment. Returns the live reservations at the end (id -> (resource, first, last))
    and the number of moves replayed."""
    keys = KeySpace(prefix, SHARDS)
    entries = await redis.xrange(keys.events(keys.shard_of("plain")))
    live: dict[str, tuple[str, int, int]] = {}
    owner: dict[tuple[str, int], str] = {}
    moves = 0

    def take(rid: str, place: tuple[str, int, int]) -> None:
        resource, first, last = place
        for unit in range(first, last + 1):
            holder = owner.get((resource, unit))
            assert holder is None, f"{rid} and {holder} both hold {resource} unit {unit}"
            owner[(resource, unit)] = rid
        live[rid] = place

    def give_back(rid: str) -> None:
        resource, first, last = live.pop(rid)
        for unit in range(first, last + 1):
            assert owner.pop((resource, unit)) == rid

    for _, raw in entries:
        e = raw if isinstance(raw, dict) else fields_dict(raw)
        rid = e["reservationId"]
        if "blockStart" in e:
            take(rid, (e["resourceId"], int(e["blockStart"]) // UNIT,
                       int(e["blockEnd"]) // UNIT - 1))
        elif "movedToResourceId" in e:
            moves += 1
            old = live[rid]
            assert old == (e["movedFromResourceId"], int(e["movedFromBlockStart"]) // UNIT,
                           int(e["movedFromBlockEnd"]) // UNIT - 1)
            give_back(rid)
            take(rid, (e["movedToResourceId"], int(e["movedToBlockStart"]) // UNIT,
                       int(e["movedToBlockEnd"]) // UNIT - 1))
        elif e["toState"] in TERMINAL:
            give_back(rid)
    return live, moves


async def assert_redis_agrees(redis, prefix: str, live: dict[str, tuple[str, int, int]]):
    keys = KeySpace(prefix, SHARDS)
    for rid, (resource, first, last) in live.items():
        record = await redis.hgetall(keys.reservation(rid))
        assert (record["rs"], int(record["f"]), int(record["l"])) == (resource, first, last)
        for unit in range(first, last + 1):
            assert await redis.get(keys.unit(resource, unit)) == rid


async def test_moves_and_creates_for_one_slot_have_exactly_one_winner(redis, prefix):
    owned = await _seed(prefix, 10)
    keys = KeySpace(prefix, SHARDS)
    before = {rid: await redis.hgetall(keys.reservation(rid)) for mine in owned for rid in mine}
    results = run_processes(prefix, owned, identical=True)
    winners = [r for r in results if r[0] in ("moved", "created")]
    assert len(winners) == 1, winners
    assert {r[0] for r in results} <= {"moved", "created", "conflict"}
    assert {r[1] for r in results if r[0] == "conflict"} == {winners[0][1]}
    live, moves = await replay(redis, prefix)
    assert moves == (winners[0][0] == "moved")
    await assert_redis_agrees(redis, prefix, live)
    first = T0 // UNIT
    for unit in range(first, first + 4):
        assert await redis.get(keys.unit("plain", unit)) == winners[0][1]
    # Every losing move left its reservation exactly as it was (record and units).
    for rid, record in before.items():
        if rid != winners[0][1]:
            assert await redis.hgetall(keys.reservation(rid)) == record
            assert await redis.get(keys.unit("plain", int(record["f"]))) == rid


async def test_random_moves_creates_and_cancels_never_overlap(redis, prefix):
    owned = await _seed(prefix, 30)
    results = run_processes(prefix, owned, identical=False)
    kinds = {r[0] for r in results}
    assert {"moved", "conflict", "created"} <= kinds  # the load really contended
    live, moves = await replay(redis, prefix)
    assert moves == sum(r[0] == "moved" for r in results)
    await assert_redis_agrees(redis, prefix, live)
