"""Fencing in Postgres (issue 15): a booking carries the token of its commit decision, and a
booking older than one already committed on its units is refused.

The rule itself through the real write path (apply_events), then real worker processes: one
SIGSTOPped with a batch in hand, past the reclaim time; another takes the batch over and
commits it; the first, SIGCONTed, writes nothing twice."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import asyncpg
import pytest
from redis.exceptions import ResponseError

from engine.store.commit import BOOKING_LOCK, BOOKING_UNLOCK, apply_events
from engine.store.events import EventResult, booking_id_for
from jobs.commit_queue import GROUP
from tests.test_db import conn, count, db  # noqa: F401  (fixtures)
from tests.test_db_events import H, M, T0, event, rid, vendor  # noqa: F401  (fixtures)
from tests.test_worker import (  # noqa: F401  (fixtures)
    _all_committed,
    _audit_complete,
    assert_record_complete,
    commit_many,
    stack,
    start_worker,
    stop_worker,
    streams_drained,
    wait_for,
    worker_settings,
)


def fenced(reservation_id: str, token, **kwargs) -> dict[str, str]:
    entry = event(reservation_id, 9, "COMMIT_IN_PROGRESS", **kwargs)
    entry["fenceToken"] = str(token)
    return entry


async def token_of(conn, reservation_id: str):
    return await conn.fetchval("SELECT fence_token FROM bookings WHERE reservation_id = $1",
                               reservation_id)


async def test_an_older_token_is_refused_over_a_newer_booking(conn, vendor):
    newer = rid()
    [booked] = await apply_events(conn, [fenced(newer, 7)])
    assert booked.result == EventResult.BOOKED
    assert await token_of(conn, newer) == 7
    # The newer booking is released (cancelled): the exclusion constraint no longer stands
    # in the way; the fence still does, for a decision older than it.
    await conn.execute("UPDATE bookings SET cancelled_at = now() WHERE reservation_id = $1",
                       newer)
    older = rid()
    [refused] = await apply_events(conn, [fenced(older, 5, start=T0 + 30 * M,
                                                 end=T0 + 90 * M)])
    assert refused.result == EventResult.AVAILABILITY_CHANGED
    assert refused.conflicting_booking_id == booking_id_for(newer)
    assert await token_of(conn, older) is None
    # A newer decision passes; so does an older one on other units (the fence is per unit,
    # not per resource: commits of different slots arrive in any order).
    later, elsewhere = rid(), rid()
    outcomes = await apply_events(conn, [fenced(later, 9),
                                         fenced(elsewhere, 3, start=T0 + 2 * H,
                                                end=T0 + 3 * H)])
    assert [o.result for o in outcomes] == [EventResult.BOOKED, EventResult.BOOKED]
    assert (await token_of(conn, later), await token_of(conn, elsewhere)) == (9, 3)
    # A redelivery of a booked reservation is not refused by a newer token.
    [again] = await apply_events(conn, [fenced(elsewhere, 3, start=T0 + 2 * H,
                                               end=T0 + 3 * H)])
    assert again.result == EventResult.BOOKED and again.booking_id == booking_id_for(elsewhere)
    assert await count(conn, "bookings") == 3


@pytest.mark.parametrize("token", ["abc", "-1", "1e3", "9" * 19])
async def test_a_bad_token_is_rejected_and_writes_nothing(conn, vendor, token):
    [outcome] = await apply_events(conn, [fenced(rid(), token)])
    assert outcome.result == EventResult.REJECTED and "fenceToken" in outcome.reason
    assert await count(conn, "bookings") == 0
    assert await count(conn, "audit_log") == 0


async def pending_of(rt, consumer: str) -> int:
    total = 0
    for shard in range(rt.keys.shards):
        if not await rt.redis.exists(rt.keys.events(shard)):
            continue
        try:
            entries = await rt.redis.xpending_range(rt.keys.events(shard), GROUP, "-", "+", 1000,
                                                    consumername=consumer)
        except ResponseError:  # NOGROUP: the worker has not created its groups yet
            continue
        total += len(entries)
    return total


async def test_a_worker_paused_across_a_reclaim_writes_nothing_twice(stack, worker_settings,
                                                                     tmp_path):
    rt = stack
    # Hold the rehydration lock: the first worker reads its batch, then waits in Postgres
    # for the lock inside its transaction; there it is paused.
    lock = await asyncpg.connect(worker_settings.database_url,
                                 server_settings={"search_path": worker_settings.db_schema})
    await lock.execute(BOOKING_LOCK)
    stale = start_worker(worker_settings, tmp_path / "stale.log")
    fresh = None
    try:
        ids = await commit_many(rt, 30)
        consumer = f"{socket.gethostname()}-{stale.pid}"
        await wait_for(lambda: _has_pending(rt, consumer), 90, "the stale worker's batch")
        os.kill(stale.pid, signal.SIGSTOP)
        await lock.execute(BOOKING_UNLOCK)
        # Past reclaim_idle_ms, a fresh worker takes the paused one's entries over (its
        # writes then wait for the paused transaction's row locks: Postgres serialises
        # the two, which is the point of the test).
        fresh = start_worker(worker_settings, tmp_path / "fresh.log")
        await wait_for(lambda: _reclaimed(rt, consumer), 120, "the entries reclaimed")
        os.kill(stale.pid, signal.SIGCONT)  # it finishes its old transaction now
        await wait_for(lambda: _all_committed(rt, ids), 120, "every reservation COMMITTED")
        await wait_for(lambda: streams_drained(rt), 60, "streams drained")
        await wait_for(lambda: _audit_complete(rt, ids), 60, "audit rows")
        await asyncio.sleep(1.0)  # let the resumed worker finish whatever it had in hand
        await assert_record_complete(rt, ids)
        # Every booking carries its commit's token, as the reservation record has it.
        async with rt.pool.acquire() as c:
            tokens = dict(await c.fetch("SELECT reservation_id, fence_token FROM bookings"))
        for reservation_id in ids:
            recorded = await rt.redis.hget(rt.keys.reservation(reservation_id), "ct")
            assert tokens[reservation_id] == int(recorded)
        assert len(set(tokens.values())) == len(ids)
    finally:
        if stale.poll() is None:
            os.kill(stale.pid, signal.SIGCONT)
        stop_worker(stale)
        if fresh is not None:
            stop_worker(fresh)
        await lock.close()
    assert stale.returncode == 0, (tmp_path / "stale.log").read_text()[-3000:]
    assert fresh.returncode == 0, (tmp_path / "fresh.log").read_text()[-3000:]


async def _has_pending(rt, consumer: str) -> bool:
    return await pending_of(rt, consumer) > 0


async def _reclaimed(rt, consumer: str) -> bool:
    return await pending_of(rt, consumer) == 0


async def test_rehydration_raises_the_fencing_counters(stack):
    """After Redis lost its data the counters start again at 0: rehydration raises each to
    its resource's newest committed token, so a new commit is never older than a booking."""
    rt = stack
    ids = await commit_many(rt, 3)
    # A booking in Postgres with a token above every one Redis issued so far.
    recorded = [int(await rt.redis.hget(rt.keys.reservation(r), "ct")) for r in ids]
    newest = max(recorded)
    async with rt.pool.acquire() as c:
        await c.execute(
            "INSERT INTO bookings (id, reservation_id, resource_key, resource_id, vendor_id,"
            " partner_id, requester_id, slot_start, slot_end, block_start, block_end,"
            " fence_token) SELECT 'bkg_x', 'rsv_x', r.key, r.id, r.vendor_id, 'p1', 'r',"
            " now() + interval '400 days', now() + interval '401 days',"
            " now() + interval '400 days', now() + interval '401 days', $1"
            " FROM resources r WHERE r.id = 'inst'", newest + 100)
    fence = rt.keys.fence("inst")
    await rt.redis.delete(fence)  # the counter lost with Redis's data
    await rt.redis.delete(*(rt.keys.ready(s) for s in range(rt.keys.shards)))
    assert await rt.rehydrate_if_needed() is not None
    assert int(await rt.redis.get(fence)) == newest + 100
    # A new commit takes a newer token than every booking.
    [later] = await commit_many(rt, 1, offset=50)
    assert int(await rt.redis.hget(rt.keys.reservation(later), "ct")) > newest + 100
