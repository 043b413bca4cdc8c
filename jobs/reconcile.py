"""Reconciliation: Redis and Postgres compared in both directions.

Safe cases are fixed on the spot; the rest go to the manual review queue. Runs as an arq
cron job (every 5 minutes by default) and is safe to run from several workers at once:
every fix is a compare-and-set.

Findings (kinds):
- booked_marker_missing: a booking that has not ended lacks its markers in Redis (fixed:
  markers restored; a live hold on a booked unit loses it, ``hold_on_booked_unit``).
- marker_without_booking: a booked marker whose booking Postgres does not know (escalated:
  Postgres is the record, but deleting a marker could open a double booking).
- unit_of_missing_reservation / unit_of_missing_hold: a unit held by nobody (fixed: freed).
- terminal_reservation_holds_unit: a cancelled/expired/failed reservation still owns a
  unit (fixed: freed).
- committed_without_marker: a COMMITTED reservation whose unit is not a marker (fixed).
- stuck_commit: COMMIT_IN_PROGRESS past its deadline. If Postgres has the booking the commit
  is finished (fixed: COMMITTED); otherwise it is escalated.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from redis.exceptions import ResponseError

from engine import clock
from engine.errors import EngineError
from engine.lifecycle import BOOKED_PREFIX
from engine.rehydration import restore_booked_markers
from engine.runtime import Runtime
from engine.store.events import booking_id_for
from engine.store.queries import bookings_to_rehydrate
from engine.store.review import record_manual_review

log = logging.getLogger("slotguard.reconcile")
TERMINAL_NOT_BOOKED = {"CANCELLED", "EXPIRED", "FAILED_VENDOR_TIMEOUT", "FAILED_VENDOR_AUTH",
                       "FAILED_REQUESTER_AUTH", "FAILED_AVAILABILITY_CHANGED", "FAILED_COMMIT"}


@dataclass
class ReconciliationReport:
    findings: Counter = field(default_factory=Counter)
    fixes: Counter = field(default_factory=Counter)
    escalated: Counter = field(default_factory=Counter)
    units_scanned: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"findings": dict(self.findings), "fixes": dict(self.fixes),
                "escalated": dict(self.escalated), "unitsScanned": self.units_scanned,
                "seconds": self.seconds}


async def reconcile(rt: Runtime, metrics=None) -> ReconciliationReport:
    started = time.monotonic()
    report = ReconciliationReport()
    await rt.refresh_catalog()
    booked = await _restore_booked_markers(rt, report)
    await _scan_units(rt, report, booked)
    await _stuck_commits(rt, report, booked)
    report.seconds = round(time.monotonic() - started, 3)
    if metrics is not None:
        metrics.reconciliation(report)
    if report.findings:
        log.warning("reconciliation: %s", report.as_dict())
    return report


async def _restore_booked_markers(rt: Runtime, report: ReconciliationReport) -> dict[str, str]:
    """Postgres → Redis. Returns reservation id → booking id of every booking not ended."""
    async with rt.pool.acquire() as conn:
        bookings = await bookings_to_rehydrate(conn, datetime.now(UTC))
    # The reservation's booking id (item 0's: a multi-resource reservation has a booking row
    # per item, issue 16, and any of them may be the one not ended yet).
    booked = {booking.reservation_id: booking_id_for(booking.reservation_id)
              for booking in bookings}
    restored = await restore_booked_markers(rt.access, rt.keys, rt.catalog, rt.settings,
                                            bookings)
    for booking in restored.unknown_resource:
        report.findings["booking_of_unknown_resource"] += 1
        await _escalate(rt, report, "booking_of_unknown_resource", booking.reservation_id,
                        booking.resource_id, {"bookingId": booking.id})
    for _ in restored.written:
        report.findings["booked_marker_missing"] += 1
        report.fixes["booked_marker_missing"] += 1
    for overwritten in restored.overwritten.values():
        report.findings["hold_on_booked_unit"] += overwritten
        report.fixes["hold_on_booked_unit"] += overwritten
    return booked


async def _scan_units(rt: Runtime, report: ReconciliationReport, booked: dict[str, str]) -> None:
    """Redis → Postgres and Redis → Redis: who owns each unit, and should they?"""
    redis = rt.redis
    states: dict[str, str | None] = {}
    async for key in _unit_keys(rt):
        report.units_scanned += 1
        try:
            owner = await redis.get(key)
        except ResponseError as exc:  # not a unit key after all: report, never stop
            report.findings["unexpected_key"] += 1
            log.warning("reconciliation skipped %r: %s", key, exc)
            continue
        if owner is None:
            continue
        if owner.startswith(BOOKED_PREFIX):
            reservation_id = owner[len(BOOKED_PREFIX):]
            if reservation_id not in booked:
                report.findings["marker_without_booking"] += 1
                await _escalate(rt, report, "marker_without_booking", reservation_id, None,
                                {"unitKey": key})
            continue
        if owner.startswith("hld_"):
            try:
                hold_key = rt.keys.hold(owner)
            except ValueError:
                hold_key = None
            if hold_key is None or not await redis.exists(hold_key):
                report.findings["unit_of_missing_hold"] += 1
                await _free(rt, report, key, owner, "unit_of_missing_hold")
            continue
        if owner not in states:
            try:
                record = rt.keys.reservation(owner)
            except ValueError:  # not one of our ids: nobody to own the unit
                states[owner] = None
            else:
                states[owner] = await redis.hget(record, "st")
        state = states[owner]
        if state is None:
            report.findings["unit_of_missing_reservation"] += 1
            await _free(rt, report, key, owner, "unit_of_missing_reservation")
        elif state in TERMINAL_NOT_BOOKED:
            report.findings["terminal_reservation_holds_unit"] += 1
            await _free(rt, report, key, owner, "terminal_reservation_holds_unit")
        elif state == "COMMITTED":
            report.findings["committed_without_marker"] += 1
            if owner in booked:
                await redis.set(key, BOOKED_PREFIX + owner, keepttl=True)
                report.fixes["committed_without_marker"] += 1
            else:
                await _escalate(rt, report, "committed_without_booking", owner, None,
                                {"unitKey": key})


async def _unit_keys(rt: Runtime):
    """Every unit key, shard by shard, from the patterns of engine/keys.py."""
    for shard in range(rt.keys.shards):
        async for key in rt.redis.scan_iter(match=rt.keys.unit_pattern(shard), count=2000):
            yield key


async def _stuck_commits(rt: Runtime, report: ReconciliationReport,
                         booked: dict[str, str]) -> None:
    now = clock.now_ms()
    for shard in range(rt.keys.shards):
        for reservation_id in await rt.redis.zrangebyscore(rt.keys.deadlines(shard), "-inf",
                                                           now):
            if await rt.redis.hget(rt.keys.reservation(reservation_id), "st") != \
                    "COMMIT_IN_PROGRESS":
                continue
            report.findings["stuck_commit"] += 1
            if reservation_id in booked:
                try:
                    await rt.reservations.act(reservation_id, "finalize-commit",
                                              actor="system", booking_id=booked[reservation_id],
                                              reason="reconciliation")
                    report.fixes["stuck_commit"] += 1
                except EngineError as exc:
                    log.warning("could not finalize %s: %r", reservation_id, exc)
            else:
                await _escalate(rt, report, "stuck_commit", reservation_id, None, {})


async def _free(rt: Runtime, report: ReconciliationReport, key: str, owner: str,
                kind: str) -> None:
    reply = await rt.access.call("release_unit", [key], [owner])
    if int(reply[1]):
        report.fixes[kind] += 1


async def _escalate(rt: Runtime, report: ReconciliationReport, kind: str,
                    reservation_id: str | None, resource_id: str | None, details: dict) -> None:
    report.escalated[kind] += 1
    async with rt.pool.acquire() as conn:
        await record_manual_review(conn, kind, reservation_id, resource_id, details)
