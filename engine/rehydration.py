"""Rehydration: booked markers come back from Postgres before any hold is accepted.

Redis decides who holds what; Postgres knows what was booked. A Redis that lost its data
(a restart without persistence, a failover to an empty replica) also lost the booked
markers, and would happily hold a booked slot. Each shard's ``ready`` flag lives beside its
markers and is lost with them; ``create_reservation`` refuses to hold on a shard without it.
Rehydration writes every marker of every booking that has not ended, then sets the flags
and records the Redis run id it rehydrated.

Every API and worker process calls :func:`ensure_rehydrated` on start and whenever the Redis
run id changes; it is idempotent and safe to run from several processes at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from engine.access import RedisAccess
from engine.connection import is_cluster, per_node
from engine.keys import KeySpace
from engine.store.commit import BOOKING_LOCK, BOOKING_UNLOCK
from engine.store.queries import Booking, bookings_to_rehydrate
from engine.resources import ResourceCatalog
from engine.settings import Settings

log = logging.getLogger("slotguard.rehydration")


@dataclass(frozen=True, slots=True)
class RehydrationReport:
    run_id: str
    bookings: int
    markers_written: int
    holds_overwritten: int
    skipped_unknown_resource: int
    seconds: float


async def redis_run_id(access: RedisAccess) -> str:
    """The Redis's run id; for a cluster, every master's (``node=run id`` sorted, joined),
    so a restart or a failover of any master changes it (and triggers rehydration)."""
    if not is_cluster(access.redis):
        return (await access.redis.info("server"))["run_id"]
    infos = await per_node(access.redis, lambda nodes: access.redis.execute_command(
        "INFO", "server", target_nodes=nodes), primaries=True)
    return ",".join(f"{name}={info['run_id']}" for name, info in sorted(infos.items()))


async def is_rehydrated(access: RedisAccess, keys: KeySpace) -> bool:
    """True when this Redis (by run id) was rehydrated and no shard lost its flag since."""
    recorded = await access.redis.get(keys.rehydrated())
    if recorded != await redis_run_id(access):
        return False
    flags = await access.redis.exists(*(keys.ready(s) for s in range(keys.shards)))
    return flags == keys.shards


@dataclass(frozen=True, slots=True)
class Restored:
    """What restoring the booked markers of a list of bookings did."""

    written: dict[str, int]  # reservation id -> markers written now (missing before)
    overwritten: dict[str, int]  # reservation id -> live holds a marker replaced
    unknown_resource: list[Booking]  # bookings on a resource the catalog does not know

    @property
    def markers_written(self) -> int:
        return sum(self.written.values())

    @property
    def holds_overwritten(self) -> int:
        return sum(self.overwritten.values())


async def restore_booked_markers(access: RedisAccess, keys: KeySpace, catalog: ResourceCatalog,
                                 settings: Settings, bookings: list[Booking]) -> Restored:
    """Write the booked markers of every booking (``restore_markers``, idempotent), in
    pipelined rounds of 1,000 calls. The one place that turns a booking into its markers:
    rehydration and reconciliation both call it."""
    written: dict[str, int] = {}
    overwritten: dict[str, int] = {}
    unknown: list[Booking] = []
    calls, owners = [], []

    async def flush() -> None:
        for reservation_id, reply in zip(owners, await asyncio.gather(*calls)):
            if int(reply[0]) == 1:
                if int(reply[1]):
                    written[reservation_id] = int(reply[1])
                if int(reply[2]):
                    overwritten[reservation_id] = int(reply[2])
        calls.clear()
        owners.clear()

    for booking in bookings:
        if booking.resource_id not in catalog:
            unknown.append(booking)
            continue
        resource = catalog.get(booking.resource_id)
        unit_ms = resource.unit_ms
        first, last = booking.block_start_ms // unit_ms, booking.block_end_ms // unit_ms - 1
        expires_at = booking.block_end_ms + settings.booked_marker_retention_ms
        calls.append(access.call("restore_markers",
                                 [keys.unit_root(keys.shard_of(resource.shard_name))],
                                 [booking.resource_id, first, last, booking.reservation_id,
                                  expires_at]))
        owners.append(booking.reservation_id)
        if len(calls) >= 1000:
            await flush()
    if calls:
        await flush()
    return Restored(written, overwritten, unknown)


# The newest fencing token committed per resource (issue 15; the partial index on
# (resource_key, fence_token) of 0010_fencing serves it).
_NEWEST_FENCES = """
SELECT r.id, m.token
FROM (SELECT resource_key, max(fence_token) AS token FROM bookings
      WHERE fence_token IS NOT NULL GROUP BY resource_key) m
JOIN resources r ON r.key = m.resource_key"""


async def raise_fences(access: RedisAccess, keys: KeySpace, conn: asyncpg.Connection) -> int:
    """Raise every resource's fencing counter to its newest committed token (a Redis that
    lost its data would otherwise issue tokens older than bookings already in Postgres, and
    the fence in Postgres would refuse the new commits). Before the shards open; answers
    how many counters were raised."""
    rows = await conn.fetch(_NEWEST_FENCES)
    replies = await asyncio.gather(*(
        access.call("raise_fence", [keys.fence(resource_id)], [token])
        for resource_id, token in rows))
    return sum(1 for (_, token), reply in zip(rows, replies) if int(reply[1]) == token)


async def rehydrate(access: RedisAccess, keys: KeySpace, pool: asyncpg.Pool,
                    catalog: ResourceCatalog, settings: Settings) -> RehydrationReport:
    """Write the booked markers of every booking not yet ended, then open every shard."""
    started = time.monotonic()
    run_id = await redis_run_id(access)
    async with pool.acquire() as conn:
        # No booking commits while the markers are read and written (commit-queue batches
        # take this lock shared): one committed after this read waits until the shards
        # are open, then writes its own markers before it commits (engine/store/commit.py).
        await conn.execute(BOOKING_LOCK)
        try:
            bookings = await bookings_to_rehydrate(conn, datetime.now(UTC))
            restored = await restore_booked_markers(access, keys, catalog, settings, bookings)
            await raise_fences(access, keys, conn)
            pipe = access.redis.pipeline(transaction=False)
            for shard in range(keys.shards):
                pipe.set(keys.ready(shard), run_id)
            pipe.set(keys.rehydrated(), run_id)
            await pipe.execute()
        finally:
            await conn.execute(BOOKING_UNLOCK)
    for booking in restored.unknown_resource:
        log.error("booking %s names unknown resource %s", booking.reservation_id,
                  booking.resource_id)
    report = RehydrationReport(run_id, len(bookings), restored.markers_written,
                               restored.holds_overwritten, len(restored.unknown_resource),
                               round(time.monotonic() - started, 3))
    log.info("rehydrated booked markers: %s", report)
    return report


async def ensure_rehydrated(access: RedisAccess, keys: KeySpace, pool: asyncpg.Pool,
                            catalog: ResourceCatalog,
                            settings: Settings) -> RehydrationReport | None:
    """Rehydrate unless this Redis already was; None when nothing had to be done."""
    if await is_rehydrated(access, keys):
        return None
    return await rehydrate(access, keys, pool, catalog, settings)
