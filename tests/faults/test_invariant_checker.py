"""The fault suite's checker sees what it must: a clean run passes, and each kind of damage
done behind the system's back (in the private stores, never the shared ones) is reported."""

from __future__ import annotations

import dataclasses

import asyncpg
import redis.asyncio as aioredis

from engine.keys import KeySpace
from slotguard.fault_invariants import check
from slotguard.fault_traffic import Traffic, accepted_commits


async def test_the_checker_passes_a_clean_run_and_reports_each_kind_of_damage(fault_stack):
    stack = await fault_stack(workers=1)
    traffic = Traffic(stack.api_url, stack.keys.partners, stack.keys.vendor)
    traffic.start()
    try:
        assert await traffic.wait_commits(10, 60)
    finally:
        await traffic.stop()
    clean = await check(traffic.history, stack.settings)
    assert clean.ok, clean.summary()
    assert clean.counts["bookings"] >= 10 and clean.counts["audit_rows"] > 0

    settings = stack.settings
    keys = KeySpace(settings.key_prefix, settings.shards)
    committed = sorted(accepted_commits(traffic.history))
    victim, other = committed[0], committed[1]
    redis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    conn = await asyncpg.connect(settings.database_url,
                                 server_settings={"search_path": settings.db_schema})
    try:
        # A booked unit handed to someone else; a history row lost; a dead letter.
        record = await redis.hgetall(keys.reservation(victim))
        unit_ms = 15 * 60_000
        stolen = keys.unit(record["rs"], int(record["bs"]) // unit_ms)
        await redis.set(stolen, "rsv_3_INTRUDER")
        await conn.execute("DELETE FROM reservation_history WHERE event_id = $1", f"{other}:1")
        await redis.xadd(keys.dead_letters(0), {"eventId": "x:1", "deadReason": "test"})
        # A history claiming a commit of a cancelled reservation was accepted, and a hold
        # overlapping a booking while it was live.
        cancelled = next(c.rid for c in traffic.history
                         if c.action == "cancel" and c.status == 200)
        first = next(c for c in traffic.history if c.action == "create" and c.rid == victim)
        twin = next(c for c in traffic.history if c.action == "create" and c.rid == other)
        forged = [
            dataclasses.replace(first, action="commit", rid=cancelled, status=202),
            dataclasses.replace(twin, slot=first.slot, t1=first.t1 + 1e-3),
        ]
        damaged = await check(traffic.history + forged, settings, settle_bound_s=30)
    finally:
        await redis.aclose()
        await conn.close()
    text = "\n".join(damaged.violations)
    assert f"unit {stolen} should be owned by B|{victim}, reads 'rsv_3_INTRUDER'" in text
    assert f"{other}: history rows" in text
    assert "1 entries dead-lettered" in text
    assert f"{cancelled}: commit accepted (202) but Redis says 'CANCELLED'" in text
    assert f"{cancelled}: commit accepted (202) with 0 booking rows" in text
    assert "overlap in slot and were both live" in text
