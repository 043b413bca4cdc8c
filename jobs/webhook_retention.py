"""Retention of the outbox and the delivery log (issue 14).

``webhook_events`` (the outbox, which the live stream resumes from) and
``webhook_deliveries`` (the delivery log) would otherwise grow forever. The worker's
``webhook_retention`` job (hourly) deletes, in bounded batches of their own transaction:

1. deliveries that are settled -- ``delivered``, ``failed`` (a final 4xx) or ``dead`` --
   and were created more than ``SLOTGUARD_WEBHOOK_RETENTION_DAYS`` (default 30) ago; a
   ``pending`` delivery (still to be sent, or retried by hand) is never deleted;
2. then events emitted before the same cutoff that no delivery refers to any more.

So within the window every event stays (a ``Last-Event-ID`` from the window resumes
exactly), and an event older than the window stays while any of its deliveries is pending;
a resume from a position that was deleted continues with the oldest event kept.
``0`` days keeps everything. Idempotent; several workers may run it at once (the batches
lock their rows with SKIP LOCKED).
"""

from __future__ import annotations

import datetime as dt
import logging

import asyncpg

from engine import clock
from engine.settings import Settings

log = logging.getLogger("slotguard.webhook_retention")

BATCH = 1_000

_DELETE_DELIVERIES = """
DELETE FROM webhook_deliveries WHERE id IN (
    SELECT id FROM webhook_deliveries
    WHERE status <> 'pending' AND created_at < $1
    ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)
"""
_DELETE_EVENTS = """
DELETE FROM webhook_events WHERE position IN (
    SELECT e.position FROM webhook_events e
    WHERE e.emitted_at < $1
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_position = e.position)
    ORDER BY e.emitted_at LIMIT $2 FOR UPDATE SKIP LOCKED)
"""


def cutoff(settings: Settings, now_ms: int | None = None) -> dt.datetime | None:
    """The instant before which settled rows go (None: retention is off)."""
    if settings.webhook_retention_days <= 0:
        return None
    now = clock.now_ms() if now_ms is None else now_ms
    return (dt.datetime.fromtimestamp(now / 1000, dt.timezone.utc)
            - dt.timedelta(days=settings.webhook_retention_days))


async def prune(pool: asyncpg.Pool, settings: Settings, *, now_ms: int | None = None,
                batch: int = BATCH) -> dict[str, int]:
    """Delete what the retention allows, ``batch`` rows per transaction; the counts."""
    before = cutoff(settings, now_ms)
    deleted = {"deliveries": 0, "events": 0}
    if before is None:
        return deleted
    for kind, statement in (("deliveries", _DELETE_DELIVERIES), ("events", _DELETE_EVENTS)):
        while True:
            async with pool.acquire() as conn:
                status = await conn.execute(statement, before, batch)
            n = int(status.split()[-1])
            deleted[kind] += n
            if n < batch:
                break
    if deleted["deliveries"] or deleted["events"]:
        log.info("webhook retention: deleted %s deliveries and %s events before %s",
                 deleted["deliveries"], deleted["events"], before.isoformat())
    return deleted
