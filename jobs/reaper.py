"""The expiry reaper (issue 14): expires overdue reservations as their deadlines pass.

One asyncio task per worker process, beside the commit-queue drain (not an arq cron job: a
cron tick came only each whole second, plus arq's poll, and waited its turn in arq's job
queue). It sleeps until the next deadline of any shard and wakes then; each wake sends one
script call (lua/reap.lua) per shard that has something due, which expires every due
reservation of that shard at once and answers the shard's next deadline. So a deadline is
looked at within :data:`BATCH_MS` of passing, whatever the load of the drain or the
webhook dispatcher, as far as the process gets the CPU.

A deadline set after the reaper last looked at a shard can be earlier than the one it is
sleeping towards (a new hold with a shorter lifetime); every shard is therefore looked at
again at least every ``SLOTGUARD_REAPER_INTERVAL_MS`` (default 1000 ms), which bounds how
late such a hold's expiry can be recorded. The units themselves free at the deadline
exactly (Redis TTL); the reaper records the EXPIRED transition, its commit-queue entry
and so its ``reservation.expired`` event.

Several workers may reap at once: a script call is atomic, so each reservation is expired
by exactly one of them (tests/test_webhooks_expiry.py races four).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from engine.reservations import ReservationEngine

log = logging.getLogger("slotguard.reaper")

# Deadlines due within this many ms of each other are expired by one wake.
BATCH_MS = 10
# The most reservations one script call expires (the next call follows at once).
LIMIT = 500
BACKOFF_MAX_MS = 1_000


def _local_ms() -> float:
    return time.time() * 1000


class Reaper:
    def __init__(self, reservations: ReservationEngine, shards: int, interval_ms: int,
                 limit: int = LIMIT, metrics=None) -> None:
        self.reservations = reservations
        self.metrics = metrics  # jobs.metrics.WorkerMetrics: the expiry lag histogram
        self.shards = shards
        self.interval_ms = max(BATCH_MS, interval_ms)
        self.limit = limit
        self.expired = 0  # reservations expired by this reaper
        self.calls = 0  # script calls sent
        self._offset_ms = 0.0  # Redis TIME minus the local clock, from the last reply
        self._failures = 0

    def _redis_now(self) -> float:
        return _local_ms() + self._offset_ms

    async def run(self, stop: asyncio.Event) -> None:
        """Reap until ``stop`` is set."""
        # Redis ms at which each shard is due a look; 0: look now.
        due_at = {shard: 0.0 for shard in range(self.shards)}
        full_at = 0.0  # when every shard is looked at again (the interval)
        while not stop.is_set():
            now = self._redis_now()
            if now >= full_at:
                shards = list(due_at)
                full_at = now + self.interval_ms
            else:
                shards = [shard for shard, at in due_at.items() if at <= now]
            if shards:
                await self._reap(shards, due_at)
            wake = min(full_at, min(due_at.values()))
            wait_ms = wake - self._redis_now()
            if wait_ms <= 0:
                await asyncio.sleep(0)  # due already: let the other tasks run first
                continue
            wait_ms = min(self.interval_ms, max(BATCH_MS, wait_ms + 1))
            try:
                await asyncio.wait_for(stop.wait(), wait_ms / 1000)
            except asyncio.TimeoutError:
                pass

    async def _reap(self, shards: list[int], due_at: dict[int, float]) -> None:
        results = await asyncio.gather(
            *(self.reservations.reap_batch(shard, self.limit) for shard in shards),
            return_exceptions=True)
        self.calls += len(shards)
        failed = False
        for shard, result in zip(shards, results):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                failed = True
                backoff = min(BACKOFF_MAX_MS, 50 * 2 ** min(self._failures, 5))
                due_at[shard] = self._redis_now() + backoff
                if self._failures == 0:
                    log.warning("reaper: shard %s: %r (retrying)", shard, result)
                continue
            self._offset_ms = result.now_ms - _local_ms()
            self.expired += len(result.moved)
            if self.metrics is not None:
                for moved in result.moved:
                    self.metrics.expiry_lag(max(0, result.now_ms - moved.deadline_ms) / 1000)
            if result.more:
                due_at[shard] = result.now_ms
            elif result.next_deadline_ms is None:
                due_at[shard] = math.inf
            else:
                due_at[shard] = float(result.next_deadline_ms)
        self._failures = self._failures + 1 if failed else 0
