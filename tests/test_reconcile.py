"""Reconciliation against real Redis and Postgres: each kind of drift is found, the safe
ones are fixed, the rest escalated to the manual review queue; a second run finds nothing."""

from __future__ import annotations

import pytest

from engine import metrics
from engine.lifecycle import State
from jobs.commit_queue import CommitQueue
from jobs.metrics import WorkerMetrics
from jobs.reconcile import reconcile
from tests.test_db import drop_schema
from tests.test_worker import T0, UNIT, commit_many, open_stack


@pytest.fixture
async def rt(settings, redis):
    runtime = await open_stack(settings.replace(drain_block_ms=50))
    yield runtime
    await runtime.close()
    await drop_schema(settings.db_schema)


async def drain(rt) -> None:
    queue = CommitQueue(rt.access, rt.keys, rt.pool, rt.reservations, rt.settings, "t")
    await queue.ensure_groups()
    for _ in range(3):
        for shard in range(rt.keys.shards):
            await queue.drain_shard_once(shard)


async def test_drift_is_found_fixed_or_escalated(rt):
    keys, redis = rt.keys, rt.redis
    [booked] = await commit_many(rt, 1)
    await drain(rt)
    assert (await rt.reservations.get(booked)).state == State.COMMITTED

    # 1. A unit owned by a reservation Redis no longer knows.
    orphan = keys.unit("inst", T0 // UNIT + 500)
    await redis.set(orphan, keys.new_reservation_id("inst"))
    # 2. A cancelled reservation that still owns a unit.
    [live] = await commit_many(rt, 1, offset=10)
    cancelled = (await rt.reservations.create(
        partner_id="p1", vendor_id="inst", resource_id=None, start_ms=T0 + 100 * UNIT,
        end_ms=T0 + 101 * UNIT, requester_id="r")).reservation_id
    await rt.reservations.act(cancelled, "cancel", actor="partner")
    stale = keys.unit("inst", T0 // UNIT + 100)
    await redis.set(stale, cancelled)
    # 3. A booked marker with no booking in Postgres.
    ghost = keys.unit("inst", T0 // UNIT + 700)
    await redis.set(ghost, "B|rsv_0_01ARZ3NDEKTSV4RRFFQ69G5FAV")
    # 4. A booked unit that lost its marker.
    marker = keys.unit("inst", T0 // UNIT)
    await redis.delete(marker)

    worker_metrics = WorkerMetrics()
    before = metrics.RECONCILE_FIXES.labels(kind="unit_of_missing_reservation")._value.get()
    report = await reconcile(rt, worker_metrics)
    assert report.findings["unit_of_missing_reservation"] == 1
    assert report.fixes["unit_of_missing_reservation"] == 1
    assert report.findings["terminal_reservation_holds_unit"] == 1
    assert report.fixes["terminal_reservation_holds_unit"] == 1
    assert report.findings["marker_without_booking"] == 1
    assert report.escalated["marker_without_booking"] == 1
    assert report.fixes["booked_marker_missing"] == 1
    assert set(report.findings) | set(report.escalated) <= set(metrics.RECONCILE_KINDS)
    assert metrics.RECONCILE_FIXES.labels(
        kind="unit_of_missing_reservation")._value.get() == before + 1

    assert await redis.get(orphan) is None
    assert await redis.get(stale) is None
    assert await redis.get(ghost) is not None  # escalated, never deleted on a guess
    assert await redis.get(marker) == f"B|{booked}"
    assert (await rt.reservations.get(live)).state == State.COMMIT_IN_PROGRESS  # untouched
    async with rt.pool.acquire() as conn:
        review = await conn.fetch("SELECT kind FROM manual_review")
    assert [r["kind"] for r in review] == ["marker_without_booking"]

    again = await reconcile(rt)
    assert set(again.findings) == {"marker_without_booking"}  # only the escalated one stays
    assert not again.fixes


async def test_a_stuck_commit_with_a_booking_is_finished(rt):
    [rid] = await commit_many(rt, 1)
    # The worker wrote the booking, then died before ending the commit in Redis.
    from engine.store.commit import apply_events

    shard = rt.keys.shard_of_id(rid)
    entries = await rt.redis.xrange(rt.keys.events(shard))
    async with rt.pool.acquire() as conn:
        await apply_events(conn, [fields for _, fields in entries])
    await rt.redis.zadd(rt.keys.deadlines(shard), {rid: 1})  # and its deadline passed
    report = await reconcile(rt)
    assert report.fixes["stuck_commit"] == 1
    assert (await rt.reservations.get(rid)).state == State.COMMITTED


async def test_a_crafted_idempotency_key_does_not_break_reconciliation(rt):
    """Issue 11, case 4: an Idempotency-Key of ``a}:u:b`` once made reconciliation's own
    unit pattern match an idempotency record (a hash), and every run failed (WRONGTYPE).
    The patterns come from engine/keys.py, one exact shard tag each."""
    import fnmatch

    keys, redis = rt.keys, rt.redis
    [booked] = await commit_many(rt, 1)
    await drain(rt)
    crafted = keys.idempotency("p1", "a}:u:b")
    await redis.hset(crafted, mapping={"s": "p", "fp": "x"})  # as idempotency_begin writes
    for shard in range(keys.shards):
        assert not fnmatch.fnmatchcase(crafted, keys.unit_pattern(shard))
    # The pattern this run used to build itself did match it.
    assert fnmatch.fnmatchcase(crafted, f"{keys.prefix}{{sg:*}}:u:*")
    await redis.delete(keys.unit("inst", T0 // UNIT))  # a drift to find in the same run
    report = await reconcile(rt)
    assert report.fixes["booked_marker_missing"] == 1
    assert report.units_scanned >= 1 and "unexpected_key" not in report.findings
    assert await redis.hgetall(crafted) == {"s": "p", "fp": "x"}  # untouched
    assert await redis.get(keys.unit("inst", T0 // UNIT)) == f"B|{booked}"
