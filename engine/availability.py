"""The availability computation (issue 13): pure and deterministic, no I/O.

Inputs: a vendor's :class:`Rules` (schedule, busy blocks, revision), the resource, the
occupancy of its units (from Redis, read by the caller), the query range and slot length,
and ``now`` (the injected clock, engine/clock.py). Output: every slot of the grid
``[start, end)`` with ``isAvailable``, ``confidence`` and ``reasons`` from the fixed
vocabulary :data:`REASONS`, and a ``computedVersion`` that is a hash of every input.

One function, :func:`refusals`, decides the rules part of a slot (everything but held and
booked, which the hold script decides atomically); placement (engine/availability_service)
calls the same function, so what the availability answer reports and what a create refuses
cannot disagree.

Confidence (the Bookiji seed's table): 1.0 free in hours with every rule met; 0.8 near a
buffer (free, but a busy block or another hold sits inside the buffers); 0.6 a time rule
not met (minimum notice, horizon); 0.4 outside working hours; 0.2 tentative; 0.0 busy,
held, booked or in the past. A slot's confidence is the lowest its reasons give.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

import orjson

from engine.schedule import DAY_MS, MINUTE_MS, Schedule

REASONS = ("outside_hours", "busy", "tentative", "held", "booked", "minimum_notice",
           "beyond_horizon", "in_past", "buffer")
CONFIDENCE = {"busy": 0.0, "held": 0.0, "booked": 0.0, "in_past": 0.0, "tentative": 0.2,
              "outside_hours": 0.4, "minimum_notice": 0.6, "beyond_horizon": 0.6,
              "buffer": 0.8}
_ORDER = {r: i for i, r in enumerate(REASONS)}
BUSY, TENTATIVE = "busy", "tentative"


@dataclass(frozen=True, slots=True)
class Block:
    """A busy (or tentative) interval of a vendor; ``resource_id`` None: every resource."""

    block_id: str
    start_ms: int
    end_ms: int
    status: str = BUSY
    resource_id: str | None = None
    source: str = "manual"
    calendar_id: str | None = None


@dataclass(frozen=True, slots=True)
class Rules:
    """Everything a vendor configured, at one revision."""

    vendor_id: str
    revision: int = 0
    schedule: Schedule | None = None
    blocks: tuple[Block, ...] = ()  # sorted by start
    digest: str = field(default="")

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", rules_digest(self.schedule, self.blocks))

    @property
    def minimum_notice_ms(self) -> int:
        return self.schedule.minimum_notice_minutes * MINUTE_MS if self.schedule else 0

    @property
    def horizon_ms(self) -> int | None:
        return self.schedule.horizon_days * DAY_MS if self.schedule else None

    def blocks_for(self, resource_id: str, start_ms: int, end_ms: int) -> list[Block]:
        """Blocks of the resource (or of the whole vendor) overlapping ``[start, end)``."""
        return [b for b in self.blocks if b.start_ms < end_ms and b.end_ms > start_ms
                and (b.resource_id is None or b.resource_id == resource_id)]


def rules_digest(schedule: Schedule | None, blocks: tuple[Block, ...]) -> str:
    doc = {"schedule": schedule.document() if schedule else None,
           "blocks": [[b.block_id, b.start_ms, b.end_ms, b.status, b.resource_id]
                      for b in blocks]}
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class Slot:
    start_ms: int
    end_ms: int
    is_available: bool
    confidence: float
    reasons: list[str]
    status: str = "free"  # free | held | booked: the slot's own units
    resource_ids: list[str] | None = None  # union over resources: the ones free


@dataclass(frozen=True, slots=True)
class Computed:
    resource_id: str | None
    start_ms: int
    end_ms: int
    slot_ms: int
    computed_at_ms: int
    computed_version: str
    slots: list[Slot]


class _Window:
    """The rules of one resource over one range, prepared once for many slots."""

    __slots__ = ("rules", "now", "open", "open_starts", "busy", "tentative", "bb", "ba")

    def __init__(self, rules: Rules, resource_id: str, start_ms: int, end_ms: int,
                 now_ms: int) -> None:
        s = rules.schedule
        self.rules, self.now = rules, now_ms
        self.bb = s.buffer_before_minutes * MINUTE_MS if s else 0
        self.ba = s.buffer_after_minutes * MINUTE_MS if s else 0
        self.open = s.open_intervals(start_ms, end_ms) if s else None
        self.open_starts = [lo for lo, _ in self.open] if self.open is not None else []
        blocks = rules.blocks_for(resource_id, start_ms - self.bb, end_ms + self.ba)
        self.busy = [(b.start_ms, b.end_ms, b.block_id) for b in blocks if b.status == BUSY]
        self.tentative = [(b.start_ms, b.end_ms, b.block_id) for b in blocks
                          if b.status == TENTATIVE]

    def in_hours(self, start: int, end: int) -> bool:
        if self.open is None:
            return True
        i = bisect_right(self.open_starts, start) - 1
        return i >= 0 and self.open[i][1] >= end

    def check(self, start: int, end: int, explain: list | None = None) -> tuple[list[str], bool]:
        """(refusing reasons, tentative overlap allowed by the schedule)."""
        reasons: list[str] = []
        rules, now = self.rules, self.now

        def rule(name: str, refused: bool, detail: Any = None) -> None:
            if refused:
                reasons.append(name)
            if explain is not None:
                explain.append({"rule": name, "refused": refused, "detail": detail})

        rule("in_past", start < now, {"now": now})
        notice = rules.minimum_notice_ms
        rule("minimum_notice", now <= start < now + notice,
             {"minimumNoticeMinutes": notice // MINUTE_MS, "earliestStart": now + notice})
        horizon = rules.horizon_ms
        rule("beyond_horizon", horizon is not None and end > now + horizon,
             {"horizonDays": None if horizon is None else horizon // DAY_MS,
              "latestEnd": None if horizon is None else now + horizon})
        rule("outside_hours", not self.in_hours(start, end),
             {"hasSchedule": self.open is not None})
        busy = [b[2] for b in self.busy if b[0] < end and b[1] > start]
        rule("busy", bool(busy), {"blocks": busy})
        tentative = [b[2] for b in self.tentative if b[0] < end and b[1] > start]
        allow = bool(rules.schedule and rules.schedule.allow_tentative)
        rule("tentative", bool(tentative) and not allow,
             {"blocks": tentative, "allowTentative": allow})
        near = []
        if not busy and (self.bb or self.ba):
            lo, hi = start - self.bb, end + self.ba
            near = [b[2] for b in self.busy if b[0] < hi and b[1] > lo]
            if not allow:
                near += [b[2] for b in self.tentative if b[0] < hi and b[1] > lo
                         and not (b[0] < end and b[1] > start)]
        rule("buffer", bool(near), {"blocks": near, "bufferBeforeMs": self.bb,
                                    "bufferAfterMs": self.ba})
        return reasons, bool(tentative) and allow


def refusals(rules: Rules, resource_id: str, start_ms: int, end_ms: int,
             now_ms: int) -> list[str]:
    """Why the rules refuse ``[start, end)`` on the resource now ([] = they allow it).
    Placement and the availability answer both ask this one function."""
    return _sorted(_Window(rules, resource_id, start_ms, end_ms, now_ms).check(start_ms,
                                                                              end_ms)[0])


def explain(rules: Rules, resource_id: str, start_ms: int, end_ms: int,
            now_ms: int) -> list[dict[str, Any]]:
    """Every rule applied to one slot, in order, with whether it refused and why."""
    out: list[dict[str, Any]] = []
    _Window(rules, resource_id, start_ms, end_ms, now_ms).check(start_ms, end_ms, out)
    return out


def _sorted(reasons: list[str]) -> list[str]:
    return sorted(set(reasons), key=_ORDER.__getitem__)


def confidence_of(reasons: list[str], tentative_allowed: bool = False) -> float:
    if reasons:
        return min(CONFIDENCE[r] for r in reasons)
    return CONFIDENCE["tentative"] if tentative_allowed else 1.0


def compute(rules: Rules, resource_id: str, *, unit_ms: int, buffer_before_ms: int,
            buffer_after_ms: int, start_ms: int, end_ms: int, slot_ms: int, now_ms: int,
            occupancy: str, first_unit: int) -> list[Slot]:
    """Every slot of ``slot_ms`` from ``start_ms`` ending by ``end_ms``. ``occupancy`` has
    one character per unit from ``first_unit`` ('.' free, 'h' held, 'b' booked) covering
    the range widened by the resource's buffers."""
    window = _Window(rules, resource_id, start_ms, end_ms, now_ms)
    before, after = buffer_before_ms // unit_ms, buffer_after_ms // unit_ms
    slots = []
    start = start_ms
    while start + slot_ms <= end_ms:
        end = start + slot_ms
        reasons, tentative_allowed = window.check(start, end)
        own_first = start // unit_ms - first_unit
        own_last = end // unit_ms - 1 - first_unit
        own = occupancy[own_first:own_last + 1]
        status = "booked" if "b" in own else "held" if "h" in own else "free"
        if status != "free":
            reasons.append(status)
        elif (before or after) and occupancy[max(0, own_first - before):
                                             own_last + 1 + after].strip("."):
            reasons.append("buffer")  # the hold's buffers would touch another hold
        reasons = _sorted(reasons) if len(reasons) > 1 else reasons
        slots.append(Slot(start, end, not reasons, confidence_of(reasons, tentative_allowed),
                          reasons, status))
        start = end
    return slots


def union(per_resource: dict[str, list[Slot]]) -> list[Slot]:
    """"Any resource free": a slot is available when one resource has it available; its
    confidence is the best any resource gives; an unavailable slot lists every reason any
    resource has; ``resource_ids`` names the resources on which it is available."""
    lists = list(per_resource.items())
    out = []
    for i, first in enumerate(lists[0][1]):
        free = [rid for rid, slots in lists if slots[i].is_available]
        candidates = [slots[i] for _, slots in lists]
        best = max(candidates, key=lambda s: s.confidence)
        if free:
            reasons: list[str] = []
        else:
            reasons = _sorted([r for s in candidates for r in s.reasons])
        statuses = {s.status for s in candidates}
        status = "free" if "free" in statuses else "held" if "held" in statuses else "booked"
        out.append(Slot(first.start_ms, first.end_ms, bool(free),
                        max(s.confidence for s in candidates if s.is_available) if free
                        else best.confidence, reasons, status, free))
    return out


def version(rules: Rules, resource_ids: list[str], start_ms: int, end_ms: int, slot_ms: int,
            occupancies: list[str], slots: list[Slot]) -> str:
    """A hash of every input: the rules (schedule and blocks), the live holds and bookings
    of the range (occupancy), the query, and the clock's effect on it (which slots the
    time rules refuse), so the same inputs give the same version and the same bytes."""
    h = hashlib.sha256()
    h.update(rules.digest.encode())
    h.update(orjson.dumps([resource_ids, start_ms, end_ms, slot_ms, occupancies]))
    h.update(orjson.dumps([[s.is_available, s.confidence, s.reasons, s.resource_ids]
                           for s in slots]))
    return h.hexdigest()[:32]
