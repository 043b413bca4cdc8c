"""The partner's live-hold cap around the reservation lifecycle: taken at creation, given
back on conflict (compensation), moved with the deadline, freed on every terminal state."""

from __future__ import annotations

import asyncio

import pytest

from engine.errors import CapExceeded, HoldConflict
from engine.limits import Limits
from engine.reservations import ReservationEngine
from engine.limits import PROVISIONAL_MARGIN_MS
from engine.resources import MINUTE_MS, Resource, ResourceCatalog, Vendor
from tests.timing import around, until_server_ms

T0 = 1_893_456_000_000
M = MINUTE_MS


@pytest.fixture
async def capped(access, keys, settings):
    tuned = settings.replace(partner_max_live_holds=3, hold_ttl_ms=10_000)
    catalog = ResourceCatalog([Resource("r1", unit_ms=15 * M, vendor_id="v1")],
                              [Vendor("v1", "r1", confirmation_required=True)])
    limits = Limits(access, keys, tuned)
    engine = ReservationEngine(access, keys, catalog, tuned, limits=limits)
    await engine.mark_ready()
    return engine, limits


async def create(engine, slot: int, partner="p1"):
    return await engine.create(partner_id=partner, vendor_id="v1", resource_id=None,
                               start_ms=T0 + slot * 30 * M, end_ms=T0 + (slot + 1) * 30 * M,
                               requester_id="r")


async def test_cap_refuses_then_recovers_on_cancel(capped):
    engine, limits = capped
    made = [await create(engine, i) for i in range(3)]
    with pytest.raises(CapExceeded) as caught:
        await create(engine, 10)
    assert caught.value.retry_after_ms > 0
    await create(engine, 10, partner="p2")  # another partner is not affected
    await engine.act(made[0].reservation_id, "cancel", actor="partner")
    assert await limits.live_holds("p1") == 2
    await create(engine, 11)


async def test_conflicts_never_leak_a_cap_slot(capped):
    engine, limits = capped
    results = await asyncio.gather(*(create(engine, 0) for _ in range(50)),
                                   return_exceptions=True)
    winners = [r for r in results if not isinstance(r, Exception)]
    assert len(winners) == 1
    assert all(isinstance(r, (HoldConflict, CapExceeded)) for r in results
               if isinstance(r, Exception))
    assert await limits.live_holds("p1") == 1
    assert (await limits.reputation("p1"))["placed"] == 1


async def test_expiry_and_commit_free_the_slot(capped, redis):
    engine, limits = capped
    engine.settings = engine.settings.replace(hold_ttl_ms=50)
    doomed = await create(engine, 0)
    await until_server_ms(redis, doomed.deadline_ms)  # due at its deadline
    assert [m.reservation_id for m in
            await engine.reap(engine.keys.shard_of_id(doomed.reservation_id))] == \
        [doomed.reservation_id]
    engine.settings = engine.settings.replace(hold_ttl_ms=10_000)
    kept = await create(engine, 1)
    await engine.act(kept.reservation_id, "vendor-confirmation", actor="vendor")
    await engine.act(kept.reservation_id, "commit", actor="partner")
    assert await limits.live_holds("p1") == 1  # pinned while committing
    await engine.act(kept.reservation_id, "finalize-commit", actor="system", booking_id="b1")
    assert await limits.live_holds("p1") == 0
    assert await limits.reputation("p1") == {"placed": 2, "committed": 1, "ratio": 0.5}


async def test_a_refused_admission_gives_the_cap_slot_back(capped, redis, prefix):
    """Rate limits ride in the cap's round trip; a refusal must leave nothing behind."""
    from engine.errors import RateLimited

    engine, limits = capped

    async def refuse():
        raise RateLimited("too many requests", retry_after_ms=100)

    with pytest.raises(RateLimited):
        await engine.create(partner_id="p1", vendor_id="v1", resource_id=None, start_ms=T0,
                            end_ms=T0 + 30 * M, requester_id="r", admission=refuse())
    assert await limits.live_holds("p1") == 0
    assert (await limits.reputation("p1"))["placed"] == 0
    assert await redis.get(engine.keys.unit("r1", T0 // (15 * M))) is None


async def test_the_cap_entry_expires_with_the_stage_the_reservation_stops_in(capped, redis):
    engine, limits = capped
    async with around(redis) as w:
        moved = await create(engine, 0)  # confirmation required: the hold stage (10 s here)
    score = await redis.zscore(engine.keys.partner_holds("p1"), moved.reservation_id)
    # Both scripts count the stage's ttl from their own instant; the cap's, taken first,
    # adds the margin for the clock between the two.
    assert w.before_ms + 10_000 <= moved.deadline_ms <= w.after_ms + 10_000
    assert w.before_ms + 10_000 + PROVISIONAL_MARGIN_MS <= score \
        <= w.after_ms + 10_000 + PROVISIONAL_MARGIN_MS
    # The entry outlives the deadline by the margin, less the time between the two scripts.
    assert PROVISIONAL_MARGIN_MS - (w.after_ms - w.before_ms) <= score - moved.deadline_ms \
        <= PROVISIONAL_MARGIN_MS
