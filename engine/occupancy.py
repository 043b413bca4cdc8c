"""Slot availability from the occupancy of units in Redis (read-only, one script call).

This is the snapshot the partner contract calls availability: which slots of a range are
free, held or booked right now. It is computed, never a guarantee: a free slot may be held
a moment later. Working hours, calendars and notice rules belong to the full availability
engine (a later issue); this module answers from the unit keys alone.

A slot is available when every unit of its *buffered* interval is free, since that is what
a hold of the slot would need. Its status describes the slot's own units (booked wins over
held wins over free), so a free slot next to a booking reads ``free`` but not available,
with the reason ``buffer_conflict``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from engine import clock
from engine.access import RedisAccess
from engine.errors import Outcome, ValidationError
from engine.keys import KeySpace
from engine.resources import MINUTE_MS, Resource

CONFIDENCE_THRESHOLD = 0.5
MAX_SLOTS = 5_000
_RANK = {".": 0, "h": 1, "b": 2}
_STATUS = {".": "free", "h": "held", "b": "booked"}


@dataclass(frozen=True, slots=True)
class SlotView:
    start_ms: int
    end_ms: int
    status: str  # free | held | booked
    is_available: bool
    confidence: float
    reasons: list[str]


@dataclass(frozen=True, slots=True)
class Availability:
    resource_id: str
    start_ms: int
    end_ms: int
    computed_at_ms: int
    computed_version: str
    computation_ms: float
    slots: list[SlotView]


def check_query(resource: Resource, start_ms: int, end_ms: int, slot_minutes: int,
                max_range_ms: int) -> int:
    """Validate a range query before any I/O; returns the slot length in ms."""
    if end_ms <= start_ms:
        raise ValidationError("endTime must be after startTime", code="INVALID_TIME_RANGE",
                              details={"field": "endTime"})
    if end_ms - start_ms > max_range_ms:
        raise ValidationError("the range is too long", code="RANGE_TOO_LARGE",
                              details={"field": "endTime", "maxRangeMs": max_range_ms})
    slot_ms = slot_minutes * MINUTE_MS
    if slot_ms <= 0 or slot_ms % resource.unit_ms:
        raise ValidationError("slotDuration must be a positive multiple of the vendor's unit",
                              code="SLOT_DURATION_NOT_ALIGNED",
                              details={"field": "slotDuration",
                                       "unitMinutes": resource.unit_ms // MINUTE_MS})
    if start_ms % resource.unit_ms or end_ms % resource.unit_ms:
        raise ValidationError("startTime and endTime must sit on the vendor's unit grid",
                              code="SLOT_NOT_ALIGNED",
                              details={"field": "startTime",
                                       "unitMinutes": resource.unit_ms // MINUTE_MS})
    if (end_ms - start_ms) // slot_ms > MAX_SLOTS:
        raise ValidationError("the range holds too many slots", code="RANGE_TOO_LARGE",
                              details={"field": "slotDuration", "maxSlots": MAX_SLOTS})
    return slot_ms


async def held_by(access: RedisAccess, keys: KeySpace, resource: Resource, start_ms: int,
                  end_ms: int) -> list[str]:
    """Distinct holders (reservation or hold ids) of live holds touching ``[start, end)``."""
    first, last = start_ms // resource.unit_ms, -(-end_ms // resource.unit_ms) - 1
    reply = await access.call("read_units", [keys.unit_root(keys.shard_of(resource.shard_name))],
                              [resource.id, first, last, last - first + 1])
    if int(reply[0]) != Outcome.OK:
        raise ValidationError(str(reply[1]))
    return list(reply[2])


async def availability(access: RedisAccess, keys: KeySpace, resource: Resource,
                       start_ms: int, end_ms: int, slot_ms: int) -> Availability:
    """Slots of ``slot_ms`` from ``start_ms`` that end by ``end_ms`` (check_query first)."""
    started = time.perf_counter()
    unit = resource.unit_ms
    first = (start_ms - resource.buffer_before_ms) // unit
    last = (end_ms + resource.buffer_after_ms) // unit - 1
    shard = keys.shard_of(resource.shard_name)
    reply = await access.call("read_units", [keys.unit_root(shard)],
                              [resource.id, first, last, last - first + 1])
    if int(reply[0]) != Outcome.OK:
        raise ValidationError(str(reply[1]))
    occupancy: str = reply[1]
    computed_at = clock.now_ms()
    slots = []
    before, after = resource.buffer_before_ms // unit, resource.buffer_after_ms // unit
    start = start_ms
    while start + slot_ms <= end_ms:
        own_first = (start // unit) - first
        own_last = ((start + slot_ms) // unit) - 1 - first
        own = occupancy[own_first:own_last + 1]
        block = occupancy[own_first - before:own_last + 1 + after]
        worst = max(own, key=_RANK.__getitem__)
        available = all(c == "." for c in block)
        if worst != ".":
            reasons = [f"slot_{_STATUS[worst]}"]
        elif not available:
            reasons = ["buffer_conflict"]
        else:
            reasons = ["units_free"]
        slots.append(SlotView(start, start + slot_ms, _STATUS[worst], available,
                              1.0 if available else 0.0, reasons))
        start += slot_ms
    version = hashlib.sha256(
        f"{resource.id}|{unit}|{first}|{occupancy}".encode()).hexdigest()[:16]
    return Availability(resource.id, start_ms, end_ms, computed_at, version,
                        (time.perf_counter() - started) * 1000, slots)
