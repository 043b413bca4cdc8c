"""Worker processes on a private cluster whose topology changes under them: a resharding
moves a shard's stream (and its units) to another master, then a master is killed and its
replica promoted. The same workers and the same runtime, never restarted, commit every
reservation exactly once; the run-id watch sees the new master and rehydrates."""

from __future__ import annotations

import asyncio
import time

from redis.crc import key_slot

from engine.lifecycle import State
from engine.rehydration import redis_run_id
from tests.test_db import drop_schema
from tests.test_worker import (
    T0,
    UNIT,
    _all_committed,
    _audit_complete,
    assert_record_complete,
    commit_many,
    open_stack,
    start_worker,
    stop_worker,
    streams_drained,
    wait_for,
)
from tests.timing import eventually


async def shard_answers(rt, reservation_id: str) -> None:
    """Wait until the shard of ``reservation_id`` answers script calls again (the cluster
    is between masters for a while after a kill)."""
    async def answers() -> bool:
        try:
            await rt.reservations.get(reservation_id)
        except Exception:
            return False
        return True

    await eventually(answers, timeout_s=90, what="the shard answering after the failover")


async def test_workers_ride_through_resharding_and_failover(own_cluster, settings, tmp_path):
    cluster = own_cluster()
    settings = settings.replace(redis_url=cluster.seed_url, reclaim_idle_ms=1_000,
                                drain_block_ms=100, partner_max_live_holds=0,
                                redis_watch_interval_ms=100)
    rt = await open_stack(settings)
    workers = [start_worker(settings, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        from engine.runtime import RedisWatch

        rt.watch = RedisWatch(rt)
        rt.watch.start()
        ids = await commit_many(rt, 40)
        await wait_for(lambda: _all_committed(rt, ids), 90, "first wave COMMITTED")

        # 1. Reshard: the slot of one shard's stream (with its units) to another master.
        shard = rt.keys.shard_of("inst")
        slot = key_slot(rt.keys.events(shard).encode())
        source = cluster.node_of_slot(slot)
        target = next(n for n in cluster.master_nodes() if n is not source)
        assert await asyncio.to_thread(cluster.move_slot, slot, target) > 0
        ids += await commit_many(rt, 40, offset=100)
        await wait_for(lambda: _all_committed(rt, ids), 90, "second wave COMMITTED")

        # 2. Kill the master that now serves the shard; its replica takes over.
        run_id = await redis_run_id(rt.access)
        recoveries = rt.watch.recoveries
        cluster.kill(target)
        promoted = await asyncio.to_thread(cluster.wait_promoted, target, slot, 90)
        assert promoted is not target
        await shard_answers(rt, ids[-1])
        ids += await commit_many(rt, 40, offset=200)
        await wait_for(lambda: _all_committed(rt, ids), 120, "third wave COMMITTED")
        await wait_for(lambda: streams_drained(rt), 60, "streams drained")
        await wait_for(lambda: _audit_complete(rt, ids), 60, "audit rows")
        # Exactly one booking per COMMITTED reservation, one audit row per transition.
        await assert_record_complete(rt, ids)

        # The run-id watch saw another master and rehydrated for it.
        async def watched() -> bool:
            return rt.watch.recoveries > recoveries and \
                await rt.redis.get(rt.keys.rehydrated()) == await redis_run_id(rt.access)

        await eventually(watched, timeout_s=60, what="the watch's rehydration")
        assert await redis_run_id(rt.access) != run_id
        views = await asyncio.gather(*(rt.reservations.get(i) for i in ids))
        assert {v.state for v in views} == {State.COMMITTED}
    finally:
        for w in workers:
            stop_worker(w)
        await rt.close()
        await drop_schema(settings.db_schema)
    logs = "".join((tmp_path / f"w{i}.log").read_text()[-2000:] for i in range(2))
    assert all(w.returncode == 0 for w in workers), logs


async def test_a_master_and_its_replica_losing_their_data(own_cluster, settings, tmp_path):
    """Both nodes of one shard ``SHUTDOWN NOSAVE`` and started again: the slot range comes
    back empty (markers, ready flags, streams). While partners keep trying to book the
    booked slots, nothing is ever granted: the shards on that node refuse holds until the
    run-id watch sees the master's new run id and rehydrates the booked markers from
    Postgres, then the same slots conflict; a free slot is bookable again."""
    from engine.errors import HoldConflict

    cluster = own_cluster()
    settings = settings.replace(redis_url=cluster.seed_url, reclaim_idle_ms=1_000,
                                drain_block_ms=100, partner_max_live_holds=0,
                                redis_watch_interval_ms=100)
    rt = await open_stack(settings)
    worker = start_worker(settings, tmp_path / "w.log")
    try:
        from engine.runtime import RedisWatch

        rt.watch = RedisWatch(rt)
        rt.watch.start()
        ids = await commit_many(rt, 20)
        await wait_for(lambda: _all_committed(rt, ids), 90, "COMMITTED")
        await wait_for(lambda: streams_drained(rt), 60, "streams drained")
        slot = key_slot(rt.keys.events(rt.keys.shard_of("inst")).encode())
        master = cluster.node_of_slot(slot)
        replica = cluster.replica_of(master)
        assert replica is not None
        run_id, recoveries = await redis_run_id(rt.access), rt.watch.recoveries

        granted, conflicts, refused = [], [], []
        stop = asyncio.Event()

        async def keep_booking() -> None:  # p2 wants the booked slots, all along
            i = 0
            while not stop.is_set():
                start = T0 + (i % 20) * 2 * UNIT
                i += 1
                try:
                    got = await rt.reservations.create(
                        partner_id="p2", vendor_id="inst", resource_id=None,
                        start_ms=start, end_ms=start + UNIT, requester_id=f"q{i}")
                    granted.append(got)
                except HoldConflict:
                    conflicts.append(time.monotonic())
                except Exception as exc:  # not ready, cluster down, connection lost
                    refused.append(type(exc).__name__)
                    await asyncio.sleep(0.05)

        booking = [asyncio.create_task(keep_booking()) for _ in range(3)]
        await asyncio.to_thread(cluster.shutdown_nosave, replica)
        await asyncio.to_thread(cluster.shutdown_nosave, master)
        await asyncio.to_thread(cluster.restart, master)
        await asyncio.to_thread(cluster.restart, replica)
        await asyncio.to_thread(cluster.wait_healthy, 120)
        assert cluster.role(master) == "master"  # no failover: it came back empty

        async def rehydrated() -> bool:
            return rt.watch.recoveries > recoveries and \
                await rt.redis.get(rt.keys.rehydrated()) == await redis_run_id(rt.access)

        await eventually(rehydrated, timeout_s=90, what="the watch's rehydration")
        assert await redis_run_id(rt.access) != run_id
        after = time.monotonic()

        async def conflicting_again() -> bool:
            return sum(1 for t in conflicts if t > after) >= 10

        await eventually(conflicting_again, timeout_s=90,
                         what="conflicts on the rehydrated markers")
        stop.set()
        await asyncio.gather(*booking)
        assert granted == [], granted[:3]  # never a second booking of a booked slot
        assert refused, "the data loss was never seen"
        free = T0 + 100 * 2 * UNIT
        fresh = await rt.reservations.create(partner_id="p2", vendor_id="inst",
                                             resource_id=None, start_ms=free,
                                             end_ms=free + UNIT, requester_id="free")
        assert fresh.state == State.AUTHORIZED_BOTH
        async with rt.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM bookings") == 20
    finally:
        stop_worker(worker)
        await rt.close()
        await drop_schema(settings.db_schema)
