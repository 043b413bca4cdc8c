"""Hold transfer under real concurrency (issue 16): three processes, each a partner with its
own Redis connection, accept the same open offers at once (several tasks per offer). For
every reservation exactly one acceptance wins; the others are TRANSFER_TOKEN_USED; the
record, the shard's stream (one 'transferred' entry) and the partners' caps agree with it."""

from __future__ import annotations

import asyncio
import multiprocessing

import redis.asyncio as aioredis

from engine.access import RedisAccess
from engine.errors import EngineError
from engine.keys import KeySpace
from engine.limits import Limits
from engine.reservations import ReservationEngine
from engine.resources import MINUTE_MS, Resource, ResourceCatalog, Vendor
from engine.settings import Settings
from engine.transfer import TransferEngine
from tests.conftest import REDIS_URL
from tests.timing import eventually

T0 = 1_893_456_000_000
UNIT = 15 * MINUTE_MS
SHARDS = 4
TAKERS = ("p2", "p3", "p4")
OFFERS = 24


def _settings(prefix: str) -> Settings:
    return Settings.from_env({}, redis_url=REDIS_URL, key_prefix=prefix, shards=SHARDS)


def _catalog() -> ResourceCatalog:
    return ResourceCatalog([Resource(f"room-{i}", unit_ms=UNIT, vendor_id="v1")
                            for i in range(4)],
                           [Vendor("v1", "room-0", confirmation_required=True)])


def _taker(prefix: str, partner: str, offers: list[tuple[str, str]], barrier, out) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        access = RedisAccess(client)
        keys = KeySpace(prefix, SHARDS)
        engine = TransferEngine(access, keys, Limits(access, keys, _settings(prefix)))

        async def accept(rid: str, token: str) -> tuple[str, str]:
            try:
                await engine.accept(rid, token, partner)
                return rid, "won"
            except EngineError as exc:
                return rid, exc.code

        await asyncio.to_thread(barrier.wait, 120)
        try:
            results = await asyncio.gather(*(accept(rid, token) for rid, token in offers
                                             for _ in range(3)))
            await asyncio.sleep(0.2)  # the queued cap bookkeeping leaves before the close
        finally:
            await access.close()
            await client.aclose()
        out.put((partner, results))

    asyncio.run(run())


async def test_partners_racing_the_same_tokens(redis, prefix):
    keys = KeySpace(prefix, SHARDS)
    access = RedisAccess(redis)
    settings = _settings(prefix)
    limits = Limits(access, keys, settings)
    reservations = ReservationEngine(access, keys, _catalog(), settings, limits=limits)
    transfers = TransferEngine(access, keys, limits)
    await reservations.mark_ready()
    offers = []
    for i in range(OFFERS):
        moved = await reservations.create(partner_id="p1", vendor_id="v1",
                                          resource_id=f"room-{i % 4}",
                                          start_ms=T0 + i * 4 * UNIT,
                                          end_ms=T0 + (i * 4 + 2) * UNIT, requester_id="r")
        offer = await transfers.offer(moved.reservation_id, holder="p1", to_partner_id=None,
                                      ttl_ms=600_000)
        offers.append((moved.reservation_id, offer.acceptance_token))

    ctx = multiprocessing.get_context("spawn")
    out, barrier = ctx.Queue(), ctx.Barrier(len(TAKERS))
    procs = [ctx.Process(target=_taker, args=(prefix, p, offers, barrier, out))
             for p in TAKERS]
    for p in procs:
        p.start()
    results = dict([await asyncio.to_thread(out.get, True, 180) for _ in procs])
    for p in procs:
        await asyncio.to_thread(p.join, 60)
        assert p.exitcode == 0

    winners: dict[str, list[str]] = {}
    for partner, outcomes in results.items():
        for rid, outcome in outcomes:
            if outcome == "won":
                winners.setdefault(rid, []).append(partner)
            else:
                assert outcome == "TRANSFER_TOKEN_USED", outcome
    assert sorted(winners) == sorted(rid for rid, _ in offers)
    for rid, who in winners.items():
        assert len(who) == 1, (rid, who)
        assert await redis.hget(keys.reservation(rid), "p") == who[0]
        assert int(await redis.hget(keys.reservation(rid), "v")) == 3  # created at 2, + 1
        shard = keys.shard_of_id(rid)
        moves = [e for _, e in await redis.xrange(keys.events(shard))
                 if e["reservationId"] == rid and e.get("reason") == "transferred"]
        assert [(m["transferredFromPartnerId"], m["transferredToPartnerId"]) for m in moves] \
            == [("p1", who[0])]

    async def caps_agree() -> bool:
        for rid, who in winners.items():
            holders = [p for p in ("p1", *TAKERS)
                       if await redis.zscore(keys.partner_holds(p), rid) is not None]
            if holders != who:
                return False
        return True

    await eventually(caps_agree, what="each reservation counted in its winner's cap only")
    await access.close()
