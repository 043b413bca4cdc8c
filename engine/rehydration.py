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
from engine.keys import KeySpace
from engine.records import bookings_to_rehydrate
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
    return (await access.redis.info("server"))["run_id"]


async def is_rehydrated(access: RedisAccess, keys: KeySpace) -> bool:
    """True when this Redis (by run id) was rehydrated and no shard lost its flag since."""
    recorded = await access.redis.get(keys.rehydrated())
    if recorded != await redis_run_id(access):
        return False
    flags = await access.redis.exists(*(keys.ready(s) for s in range(keys.shards)))
    return flags == keys.shards


async def rehydrate(access: RedisAccess, keys: KeySpace, pool: asyncpg.Pool,
                    catalog: ResourceCatalog, settings: Settings) -> RehydrationReport:
    """Write the booked markers of every booking not yet ended, then open every shard."""
    started = time.monotonic()
    run_id = await redis_run_id(access)
    async with pool.acquire() as conn:
        bookings = await bookings_to_rehydrate(conn, datetime.now(UTC))
    written = overwritten = skipped = 0
    calls = []
    for booking in bookings:
        if booking.resource_id not in catalog:
            skipped += 1
            log.error("booking %s names unknown resource %s", booking.reservation_id,
                      booking.resource_id)
            continue
        unit_ms = catalog.get(booking.resource_id).unit_ms
        block_start = booking.block_start_ms
        block_end = booking.block_end_ms
        first, last = block_start // unit_ms, block_end // unit_ms - 1
        expires_at = block_end + settings.booked_marker_retention_ms
        shard = keys.shard_of(booking.resource_id)
        calls.append(access.call("restore_markers", [keys.unit_root(shard)],
                                 [booking.resource_id, first, last, booking.reservation_id,
                                  expires_at]))
        if len(calls) >= 1000:
            written, overwritten = _add(await asyncio.gather(*calls), written, overwritten)
            calls = []
    if calls:
        written, overwritten = _add(await asyncio.gather(*calls), written, overwritten)
    pipe = access.redis.pipeline(transaction=False)
    for shard in range(keys.shards):
        pipe.set(keys.ready(shard), run_id)
    pipe.set(keys.rehydrated(), run_id)
    await pipe.execute()
    report = RehydrationReport(run_id, len(bookings), written, overwritten, skipped,
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


def _add(replies, written: int, overwritten: int) -> tuple[int, int]:
    for reply in replies:
        if int(reply[0]) == 1:
            written += int(reply[1])
            overwritten += int(reply[2])
    return written, overwritten
