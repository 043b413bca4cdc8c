"""The commit queue: every shard's transition stream, drained into Postgres.

Delivery is at least once and every step is idempotent, so a crash anywhere is harmless:
1. XREADGROUP a batch (or XAUTOCLAIM the batch of a consumer that died);
2. one Postgres transaction writes the bookings (exclusion constraint), the history and
   the audit rows, keyed by event id (:func:`engine.store.commit.apply_batch`);
3. a Lua call per committed reservation sets COMMITTED and turns its units into booked
   markers; a booking the exclusion constraint refused fails its reservation as
   FAILED_AVAILABILITY_CHANGED, once, with no retry loop;
4. XACK and XDEL the batch (one write).
An entry delivered ``max_deliveries`` times without getting through goes to the shard's
dead-letter stream and the manual review queue, and is acknowledged.

The hot Redis traffic bypasses redis-py, as the script calls do (:mod:`engine.resp`): each
shard's reader blocks in XREADGROUP on a raw RESP connection of its own (a blocking read
never shares a connection with anything else), and acknowledgements share one more, so the
drain's replies are parsed by hiredis in C straight into lists. redis-py remains for the
rare paths (reclaim, dead letters, lag) and where no raw connection is possible (unix
sockets).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.access import RedisAccess
from engine.errors import NotFound, TerminalState
from engine.keys import KeySpace
from engine.rehydration import restore_booked_markers
from engine.store.commit import AppliedBatch, apply_batch
from engine.store.queries import bookings_of
from engine.store.events import EventResult, fields_dict
from engine.store.review import (
    record_dead_letter,
    record_manual_review,
    storable,
    storable_text,
)
from engine.reservations import ReservationEngine
from engine.resp import RespError, ScriptConnection
from engine.settings import Settings

log = logging.getLogger("slotguard.commit_queue")
# The record's unchanging fields, in engine.store.events.Info order (lua/lib/load_reservation.lua).
_INFO_FIELDS = ("p", "vd", "rs", "rq", "s", "e", "bs", "be", "c")
GROUP = "slotguard-commit"


@dataclass
class DrainStats:
    entries: int = 0
    booked: int = 0
    committed: int = 0
    availability_changed: int = 0
    dead_lettered: int = 0
    batches: int = 0
    by_result: dict[str, int] = field(default_factory=dict)


class CommitQueue:
    def __init__(self, access: RedisAccess, keys: KeySpace, pool: asyncpg.Pool,
                 reservations: ReservationEngine, settings: Settings, consumer: str,
                 metrics=None, payments=None) -> None:
        self.access = access
        self.redis = access.redis
        self.keys = keys
        self.pool = pool
        self.reservations = reservations
        self.settings = settings
        self.consumer = consumer
        self.metrics = metrics
        # Payments (issue 12): engine.payments.orchestrator.PaymentOrchestrator, or None.
        # A paying reservation's commit captures both payments before its booking is
        # written; a failed capture writes no booking (compensation, FAILED_COMMIT).
        self.payments = payments
        self.stats = DrainStats()
        self.outages = 0  # shard batches waiting out an outage: the reclaimer stands by
        # Raw RESP connections (None where redis-py must serve: unix sockets): one per
        # shard for its blocking reads, one shared by the acknowledgements.
        self._readers: dict[int, ScriptConnection | None] = {}
        self._acks = self._connection("slotguard-drain-ack")
        self._group = GroupCommit(self._apply_alone)

    def _connection(self, name: str) -> ScriptConnection | None:
        wire = ScriptConnection.like(self.redis)
        if wire is not None:
            wire.name = name
        return wire

    def _reader(self, shard: int) -> ScriptConnection | None:
        if shard not in self._readers:
            self._readers[shard] = self._connection(f"slotguard-drain-{shard}")
        return self._readers[shard]

    async def close(self) -> None:
        """Close the raw connections (they reopen on the next call), once the group
        commits under way are through."""
        await self._group.close()
        wires = [w for w in (*self._readers.values(), self._acks) if w is not None]
        await asyncio.gather(*(w.close() for w in wires), return_exceptions=True)

    # ---- setup ------------------------------------------------------------------------
    async def ensure_groups(self) -> None:
        """Create each shard's consumer group from the stream's start (idempotent)."""
        for shard in range(self.keys.shards):
            try:
                await self.redis.xgroup_create(self.keys.events(shard), GROUP, id="0",
                                               mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # ---- reading ----------------------------------------------------------------------
    async def read_new(self, shard: int, block_ms: int | None = None
                       ) -> list[tuple[str, dict | list]]:
        """New entries for this consumer: (entry id, fields), the fields a dict (redis-py)
        or the flat [name, value, ...] list of the raw connection."""
        wire = self._reader(shard)
        if wire is None:
            reply = await self.redis.xreadgroup(
                GROUP, self.consumer, {self.keys.events(shard): ">"},
                count=self.settings.drain_batch_size, block=block_ms)
            return reply[0][1] if reply else []
        command: tuple = ("XREADGROUP", "GROUP", GROUP, self.consumer,
                          "COUNT", self.settings.drain_batch_size)
        if block_ms is not None:
            command += ("BLOCK", block_ms)
        [reply] = await wire.execute([command + ("STREAMS", self.keys.events(shard), ">")])
        if isinstance(reply, Exception):
            raise reply
        return _entries(reply[0][1]) if reply else []

    async def reclaim(self, shard: int) -> list[tuple[str, dict]]:
        """Take over entries another consumer left pending for longer than reclaim_idle_ms."""
        reply = await self.redis.xautoclaim(
            self.keys.events(shard), GROUP, self.consumer,
            min_idle_time=self.settings.reclaim_idle_ms, start_id="0-0",
            count=self.settings.drain_batch_size)
        return [(eid, fields) for eid, fields in reply[1] if fields]

    # ---- processing -------------------------------------------------------------------
    async def drain_shard_once(self, shard: int, block_ms: int | None = None) -> int:
        """Read one batch and deliver it; an outage propagates (the loop retries)."""
        entries = await self.read_new(shard, block_ms)
        await self.process(shard, entries)
        return len(entries)

    async def reclaim_shard_once(self, shard: int) -> int:
        entries = await self.reclaim(shard)
        if entries:
            entries = await self._dead_letter_exhausted(shard, entries)
            await self.process(shard, entries)
        return len(entries)

    async def process(self, shard: int, entries: list[tuple[str, dict | list]], *,
                      isolate_any: bool = False) -> None:
        """Write one batch to Postgres, end the commits in Redis, then acknowledge.

        One bad entry never fails its batch: when the batch fails on content (Postgres
        refuses a value, a constraint other than the booking's), the batch is bisected
        until each entry that fails alone is found; that entry goes to the dead letters with
        its reason and a manual_review case, the rest commits. With ``isolate_any`` any
        error but an outage is taken for content (an error that kept coming back).
        An outage (:func:`is_outage`) propagates: nothing is lost, the caller retries.

        An entry whose reservation's creation entry is not written yet (another consumer
        holds it in a batch of its own) is tried again after a short pause, a few times;
        then it stays pending and the reclaimer delivers it again."""
        for pause in (0.02, 0.1, 0.5, None):
            entries = await self._isolating(shard, entries, isolate_any)
            if not entries or pause is None:
                return
            await asyncio.sleep(pause)

    async def _isolating(self, shard: int, entries: list[tuple[str, dict | list]],
                         isolate_any: bool) -> list[tuple[str, dict | list]]:
        try:
            return await self._process(shard, entries)
        except Exception as exc:
            if is_outage(exc) or not (isolate_any or is_content_error(exc)):
                raise
            if len(entries) > 1:
                log.warning("batch of %s entries on shard %s failed on content, bisecting: %r",
                            len(entries), shard, exc)
                middle = len(entries) // 2
                return (await self._isolating(shard, entries[:middle], isolate_any)
                        + await self._isolating(shard, entries[middle:], isolate_any))
            [(entry_id, fields)] = entries
            await self._dead_letter(shard, entry_id, fields, f"{type(exc).__name__}: {exc}")
            await self._ack(shard, [entry_id])
            return []

    async def _process(self, shard: int, entries: list[tuple[str, dict | list]]
                       ) -> list[tuple[str, dict | list]]:
        """:meth:`process` once; returns the deferred entries (not acknowledged)."""
        if not entries:
            return []
        started = time.perf_counter()
        events = [fields for _, fields in entries]
        verdicts = await self._capture_payments(events) if self.payments is not None else {}
        unpaid = {rid for rid, verdict in verdicts.items() if not verdict.book}
        applied = await self._group.apply(events, unpaid)
        if self.metrics is not None:
            for (from_state, to_state, triggered_by), n in applied.transitions.items():
                for _ in range(n):
                    self.metrics.transition(from_state, to_state, triggered_by)
        by_result = self.stats.by_result
        for result, n in Counter(applied.results).items():
            by_result[result] = by_result.get(result, 0) + n
        follow_ups = []
        rejected = []
        deferred = []
        for position, outcome in sorted(applied.details.items()):
            result = outcome.result
            if result == EventResult.BOOKED:
                self.stats.booked += 1
                follow_ups.append(self._finalize(outcome.reservation_id, outcome.booking_id,
                                                 outcome.event_id,
                                                 paid=outcome.reservation_id in verdicts))
            elif result == EventResult.AVAILABILITY_CHANGED:
                self.stats.availability_changed += 1
                follow_ups.append(self._fail_changed(outcome.reservation_id,
                                                     outcome.conflicting_booking_id,
                                                     paid=outcome.reservation_id in verdicts))
            elif outcome.reservation_id in unpaid and result == EventResult.SUPERSEDED:
                follow_ups.append(self._fail_unpaid(outcome.reservation_id,
                                                    verdicts[outcome.reservation_id]))
            elif result == EventResult.REJECTED:
                entry_id, fields = entries[position]
                rejected.append((entry_id, fields, outcome.reason or "rejected"))
            elif result == EventResult.DEFERRED:
                deferred.append(position)
        if follow_ups:
            await asyncio.gather(*follow_ups)
        for entry_id, fields, reason in rejected:
            await self._dead_letter(shard, entry_id, fields, reason)
        later = set(deferred)
        done = [entry_id for position, (entry_id, _) in enumerate(entries)
                if position not in later]
        if done:
            await self._ack(shard, done)
        self.stats.entries += len(done)
        self.stats.batches += 1
        if self.metrics is not None:
            self.metrics.observe_drain(shard, len(done), time.perf_counter() - started)
        return [entries[position] for position in deferred]

    async def _apply_alone(self, events: list, unpaid: set[str]) -> AppliedBatch:
        """One Postgres transaction for these entries (:func:`apply_batch`)."""
        async with self.pool.acquire() as conn:
            return await apply_batch(conn, events, count_transitions=self.metrics is not None,
                                     lookup=self._live_info,
                                     before_commit=self._markers_before_commit,
                                     unbookable=unpaid)

    async def _live_info(self, reservation_ids: list[str]) -> dict[str, tuple]:
        """The unchanging fields of reservations from their live Redis records (for entries
        whose creation entry another consumer has not committed yet)."""
        pipe = self.redis.pipeline(transaction=False)
        asked = []
        for reservation_id in reservation_ids:
            try:
                pipe.hmget(self.keys.reservation(reservation_id), _INFO_FIELDS)
            except ValueError:
                continue
            asked.append(reservation_id)
        if not asked:
            return {}
        found = {}
        for reservation_id, values in zip(asked, await pipe.execute()):
            if all(values):
                p, vd, rs, rq, *times = values
                found[reservation_id] = (p, vd, rs, rq, *map(int, times))
        return found

    async def _markers_before_commit(self, conn: asyncpg.Connection,
                                     reservation_ids: list[str]) -> None:
        """Inside the booking transaction, before it commits: a booked reservation whose
        Redis record is gone (Redis lost its data, and rehydration ran before this booking
        existed) gets its booked markers now, so no slot of a booking ever reads free.
        Otherwise its units stay pinned until the finalize writes the markers."""
        pipe = self.redis.pipeline(transaction=False)
        for reservation_id in reservation_ids:
            pipe.exists(self.keys.reservation(reservation_id))
        gone = [r for r, found in zip(reservation_ids, await pipe.execute()) if not found]
        if gone:
            bookings = await bookings_of(conn, gone)
            await restore_booked_markers(self.access, self.keys, self.reservations.catalog,
                                         self.settings, bookings)
            log.warning("booked %s reservations whose Redis records are gone: markers "
                        "restored", len(bookings))

    async def _finalize(self, reservation_id: str, booking_id: str | None,
                        commit_event_id: str, paid: bool = False) -> None:
        try:
            await self.reservations.act(reservation_id, "finalize-commit", actor="system",
                                        booking_id=booking_id or "")
            self.stats.committed += 1
            if paid and booking_id:
                await self.payments.annotate_booking(reservation_id, booking_id)
        except TerminalState as exc:
            if exc.details.get("state") != "COMMITTED":
                await self._escalate("commit_after_terminal", reservation_id,
                                     {"bookingId": booking_id, "state": exc.details.get("state")})
        except NotFound:
            # Redis forgot the reservation (data loss) after Postgres booked it: the booking
            # stands (its markers were written before it committed, or by rehydration), so
            # the record says COMMITTED, written straight to Postgres.
            log.warning("booked %s but its Redis record is gone", reservation_id)
            version = int(commit_event_id.rsplit(":", 1)[1]) + 1
            async with self.pool.acquire() as conn:
                await apply_batch(conn, [{
                    "reservationId": reservation_id, "version": str(version),
                    "fromState": "COMMIT_IN_PROGRESS", "toState": "COMMITTED",
                    "triggeredBy": "system", "timestamp": str(int(time.time() * 1000)),
                    "reason": "booked after Redis lost the reservation"}])
            self.stats.committed += 1

    async def _capture_payments(self, events: list) -> dict:
        """Payments (issue 12): the verdict of each paying reservation committed in this
        batch, after its captures (engine/payments/orchestrator.py ``capture_commits``)."""
        commits = []
        for fields in events:
            named = fields if isinstance(fields, dict) else fields_dict(fields)
            if named.get("toState") == "COMMIT_IN_PROGRESS" and named.get("reservationId"):
                commits.append(named["reservationId"])
        if not commits:
            return {}
        # The records' payment flag, in one round trip: a paying reservation with no
        # authorization recorded must fail, never book as a free one.
        pipe = self.redis.pipeline(transaction=False)
        for rid in commits:
            pipe.hget(self.keys.reservation(rid), "pr")
        flags = await pipe.execute()
        paying = {rid for rid, flag in zip(commits, flags) if flag in ("1", b"1")}
        from engine.payments.provider import Retryable

        try:
            return await self.payments.capture_commits(commits, paying)
        except Retryable as exc:
            # Stripe unreachable past the retries while a decision is being carried out
            # (a cancel or refund of compensation): an outage, not the entries' fault. The
            # batch is held and retried (no delivery spent); the recorded decision goes on.
            raise PaymentProviderUnreachable(f"payment provider: {exc.message}") from exc

    async def _fail_unpaid(self, reservation_id: str, verdict) -> None:
        """A paying commit whose payments failed (compensated already): FAILED_COMMIT, or
        FAILED_AVAILABILITY_CHANGED when revalidation found the slot taken."""
        try:
            await self.reservations.act(reservation_id, verdict.action, actor="system",
                                        reason=verdict.reason or "payment failed",
                                        metadata={"compensation": True})
        except (TerminalState, NotFound):
            pass  # ended on an earlier delivery, or forgotten by Redis

    async def _fail_changed(self, reservation_id: str, conflicting: str | None,
                            paid: bool = False) -> None:
        if paid:
            # Captured, then the exclusion constraint refused the booking: refund both.
            await self.payments.refuse_booking(reservation_id)
        try:
            await self.reservations.act(
                reservation_id, "availability-changed", actor="system",
                reason="the slot was booked meanwhile",
                metadata={"conflictingBookingId": conflicting} if conflicting else None)
        except (TerminalState, NotFound):
            pass  # already failed on an earlier delivery, or forgotten by Redis

    async def _escalate(self, kind: str, reservation_id: str | None, details: dict) -> None:
        async with self.pool.acquire() as conn:
            await record_manual_review(conn, kind, reservation_id, None, details)

    async def _dead_letter_exhausted(self, shard: int,
                                     entries: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
        """Entries delivered too often go to the dead letters; the rest are processed."""
        stream = self.keys.events(shard)
        ids = {eid for eid, _ in entries}
        pending = await self.redis.xpending_range(stream, GROUP, min=min(ids), max=max(ids),
                                                  count=len(entries) * 2)
        counts = {p["message_id"]: p["times_delivered"] for p in pending}
        keep = []
        for entry_id, fields in entries:
            if counts.get(entry_id, 0) > self.settings.max_deliveries:
                await self._dead_letter(shard, entry_id, fields,
                                        f"delivered {counts[entry_id]} times", counts[entry_id])
                await self._ack(shard, [entry_id])
            else:
                keep.append((entry_id, fields))
        return keep

    async def _dead_letter(self, shard: int, entry_id: str, fields: dict | list, reason: str,
                           deliveries: int = 1) -> None:
        if isinstance(fields, list):
            fields = fields_dict(fields)
        self.stats.dead_lettered += 1
        await self.redis.xadd(self.keys.dead_letters(shard),
                              {**fields, "deadEntryId": entry_id, "deadReason": reason})
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await record_dead_letter(conn, stream=self.keys.events(shard),
                                         entry_id=entry_id, fields=fields, error=reason,
                                         deliveries=deliveries)
                # A human looks at every dead letter: the entry is a transition that did
                # not reach the record.
                named = storable({k: fields[k] for k in ("reservationId", "resourceId")
                                  if fields.get(k)})
                await record_manual_review(conn, "dead_letter", named.get("reservationId"),
                                           named.get("resourceId"),
                                           {"stream": self.keys.events(shard),
                                            "entryId": entry_id,
                                            "reason": storable_text(reason),
                                            "deliveries": deliveries})
        if self.metrics is not None:
            self.metrics.dead_letter(shard)
        log.error("dead-lettered %s on shard %s: %s", entry_id, shard, reason)

    async def _ack(self, shard: int, entry_ids: list[str]) -> None:
        stream = self.keys.events(shard)
        if self._acks is not None:
            for reply in await self._acks.execute([("XACK", stream, GROUP, *entry_ids),
                                                   ("XDEL", stream, *entry_ids)]):
                if isinstance(reply, Exception):
                    raise reply
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(stream, GROUP, *entry_ids)
        pipe.xdel(stream, *entry_ids)
        await pipe.execute()

    # ---- observation ------------------------------------------------------------------
    async def lag(self, shard: int) -> dict:
        """Length, pending count and oldest pending age (ms) of one shard's stream."""
        stream = self.keys.events(shard)
        length = await self.redis.xlen(stream)
        try:
            summary = await self.redis.xpending(stream, GROUP)
        except ResponseError:
            return {"length": length, "pending": 0, "oldest_pending_age_ms": 0}
        oldest = 0
        if summary["pending"]:
            first_id = summary["min"]
            oldest = max(0, int(time.time() * 1000) - int(first_id.split("-")[0]))
        return {"length": length, "pending": summary["pending"], "oldest_pending_age_ms": oldest}

    # ---- the loop ---------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Drain every shard until ``stop`` is set: one reader per shard, plus a reclaimer."""
        await self.ensure_groups()
        tasks = [asyncio.create_task(self._shard_loop(shard, stop))
                 for shard in range(self.keys.shards)]
        tasks.append(asyncio.create_task(self._reclaim_loop(stop)))
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()

    async def _shard_loop(self, shard: int, stop: asyncio.Event) -> None:
        """Read a batch, deliver it until it is through; never exits on an error.

        A batch read is held in memory until it is delivered: an outage is waited out
        with backoff and the same entries are tried again, so it spends no delivery (a
        re-read would count one); meanwhile their idle time is reset (XCLAIM JUSTID, which
        counts nothing) so no reclaimer takes them over."""
        failures = 0
        while not stop.is_set():
            try:
                entries = await self.read_new(shard, block_ms=self.settings.drain_block_ms)
                failures = 0
            except Exception as exc:
                failures += 1
                if isinstance(exc, RespError) and "NOGROUP" in str(exc):
                    # The stream or group is gone (Redis lost data).
                    await self._quietly(self.ensure_groups())
                log.warning("read of shard %s failed, will retry: %r", shard, exc)
                await self._backoff(failures, stop)
                continue
            await self.deliver(shard, entries, stop)

    async def deliver(self, shard: int, entries: list[tuple[str, dict | list]],
                      stop: asyncio.Event) -> bool:
        """:meth:`process` until it succeeds or ``stop`` is set; True when delivered.

        An outage is retried for as long as it lasts. Any other error that keeps
        recurring (a bug, an unclassified server error) is, after max_deliveries tries,
        taken for the content's fault: the batch is then isolated entry by entry."""
        attempt = unexplained = 0
        waiting_out = False  # counted in self.outages while an outage lasts
        try:
            while True:
                try:
                    await self.process(shard, entries,
                                       isolate_any=unexplained >= self.settings.max_deliveries)
                    return True
                except Exception as exc:
                    attempt += 1
                    outage = is_outage(exc)
                    if outage != waiting_out:
                        self.outages += 1 if outage else -1
                        waiting_out = outage
                    if outage:
                        log.warning("shard %s: Postgres or Redis unreachable (%r), retrying "
                                    "%s entries", shard, exc, len(entries))
                    else:
                        unexplained += 1
                        log.exception("shard %s: batch failed (%s/%s)", shard, unexplained,
                                      self.settings.max_deliveries)
                    if await self._backoff(attempt, stop):
                        return False
                    await self._quietly(self._keep_idle_low(shard, entries))
        finally:
            if waiting_out:
                self.outages -= 1

    async def _backoff(self, attempt: int, stop: asyncio.Event) -> bool:
        """Sleep a capped exponential backoff with full jitter; True when stopped."""
        base, cap = self.settings.drain_retry_base_ms, self.settings.drain_retry_max_ms
        delay = random.uniform(0.5, 1.0) * min(cap, base * 2 ** min(attempt, 20)) / 1000
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
            return True
        except asyncio.TimeoutError:
            return False

    async def _keep_idle_low(self, shard: int, entries: list[tuple[str, dict | list]]) -> None:
        """Claim our own pending entries again with JUSTID: their idle time restarts and
        their delivery count does not move (XCLAIM's JUSTID does not count a delivery)."""
        if entries:
            await self.redis.xclaim(self.keys.events(shard), GROUP, self.consumer, 0,
                                    [entry_id for entry_id, _ in entries], justid=True)

    @staticmethod
    async def _quietly(call) -> None:
        try:
            await call
        except Exception as exc:
            log.debug("ignored while recovering: %r", exc)

    async def _reachable(self) -> bool:
        """Postgres and Redis both answer (a reclaim is a delivery: spend none in vain)."""
        try:
            await self.redis.ping()
            async with self.pool.acquire() as conn:
                await conn.execute("SELECT 1")
            return True
        except Exception:
            return False

    async def _reclaim_loop(self, stop: asyncio.Event) -> None:
        interval = max(self.settings.reclaim_idle_ms / 2000, 0.1)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
                return
            except asyncio.TimeoutError:
                pass
            # XAUTOCLAIM counts a delivery: only while nothing is in an outage here and
            # both servers answer.
            if self.outages or not await self._reachable():
                continue
            for shard in range(self.keys.shards):
                try:
                    while not stop.is_set():
                        entries = await self.reclaim(shard)
                        if not entries:
                            break
                        entries = await self._dead_letter_exhausted(shard, entries)
                        if not await self.deliver(shard, entries, stop):
                            break
                except Exception as exc:
                    log.warning("reclaim of shard %s failed: %r", shard, exc)


class PaymentProviderUnreachable(ConnectionError):
    """Payments (issue 12): the provider failed past its retries mid-decision (an outage)."""


class GroupCommit:
    """Group commit: the batches the shard readers bring while a transaction is under way
    are written together in the next one (at most ``MAX_GROUPS`` transactions at once).

    Every batch writes its outbox rows under one per-schema advisory lock held until its
    commit (engine/webhook_events.py: SSE positions become visible in order), so one
    transaction per shard batch queued up behind that lock, each paying its own WAL flush
    while holding it: with 16 shards, 6-7 backends waited on the lock at any moment of the
    expiry benchmark and an expiry reached the outbox seconds after its transition (issue
    14, benchmarks/RESULTS.md). Together they pay one flush and one wait. Entries of one
    reservation are all on one shard, so a shard's batch keeps its order; results are
    handed back per batch. If a group fails, each of its batches is written alone, so a
    batch's own fault (content) stays its own (the caller isolates it as before)."""

    MAX_GROUPS = 2

    def __init__(self, apply_alone) -> None:
        self._apply_alone = apply_alone
        self._waiting: list[tuple[list, set[str], asyncio.Future]] = []
        self._running = 0  # writers under way (counted in step with _waiting)
        self._tasks: set[asyncio.Task] = set()
        self.groups = 0  # transactions written (for tests and benchmarks)

    async def apply(self, events: list, unpaid: set[str]) -> AppliedBatch:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((events, unpaid, future))
        if self._running < self.MAX_GROUPS:
            self._running += 1
            task = asyncio.ensure_future(self._run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _run(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                await self._write(group)
        finally:
            self._running -= 1  # no await since the last look at _waiting

    async def close(self) -> None:
        """Wait for the transactions under way (their callers may be gone: a cancelled
        shard reader's entries are written and delivered again later, idempotently)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _write(self, group: list[tuple[list, set[str], asyncio.Future]]) -> None:
        self.groups += 1
        if len(group) == 1:
            events, unpaid, future = group[0]
            try:
                _settle(future, result=await self._apply_alone(events, unpaid))
            except BaseException as exc:  # noqa: BLE001 (handed to the caller)
                _settle(future, error=exc)
            return
        merged = [entry for events, _, _ in group for entry in events]
        unpaid_all = set().union(*(unpaid for _, unpaid, _ in group))
        try:
            applied = await self._apply_alone(merged, unpaid_all)
        except BaseException as exc:  # noqa: BLE001
            if is_outage(exc) or isinstance(exc, asyncio.CancelledError):
                for _, _, future in group:
                    _settle(future, error=exc)
                return
            for events, unpaid, future in group:  # each alone: a fault stays its own
                try:
                    _settle(future, result=await self._apply_alone(events, unpaid))
                except BaseException as alone:  # noqa: BLE001
                    _settle(future, error=alone)
            return
        offset = 0
        for n, (events, _, future) in enumerate(group):
            end = offset + len(events)
            _settle(future, result=AppliedBatch(
                applied.results[offset:end], applied.already_applied[offset:end],
                {p - offset: d for p, d in applied.details.items() if offset <= p < end},
                applied.transitions if n == 0 else Counter()))
            offset = end


def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():  # its caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def is_outage(exc: BaseException) -> bool:
    """Postgres or Redis unreachable (refused, reset, shutting down, out of connections):
    not the entries' fault, so it spends no delivery."""
    if is_content_error(exc):  # asyncpg's client-side DataError is an InterfaceError too
        return False
    return isinstance(exc, _OUTAGES)


def is_content_error(exc: BaseException) -> bool:
    """An error a batch's own content causes: Postgres refuses a value (a NUL byte,
    malformed text, out of range), a constraint other than the booking's exclusion
    constraint (handled per booking), or a value Python cannot encode."""
    return isinstance(exc, (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError,
                            ValueError, TypeError, OverflowError, UnicodeError))


_OUTAGES = (
    OSError,  # refused, reset, unreachable (ConnectionError is one)
    asyncio.TimeoutError,
    RedisConnectionError,  # LOADING (BusyLoadingError) too
    RedisTimeoutError,
    asyncpg.PostgresConnectionError,  # ConnectionDoesNotExistError, ConnectionFailureError
    asyncpg.OperatorInterventionError,  # CannotConnectNowError, AdminShutdownError
    asyncpg.InsufficientResourcesError,  # TooManyConnectionsError
    asyncpg.InterfaceError,  # "connection is closed", pool closing
)


def _entries(raw: list) -> list[tuple[str, list[str]]]:
    """XREADGROUP's entries ([id, [field, value, ...]]) as (id, fields), the fields left
    as the flat list :func:`engine.store.commit.apply_batch` parses by position; a deleted entry
    (no fields) is left out."""
    return [(entry_id, flat) for entry_id, flat in raw if flat]
