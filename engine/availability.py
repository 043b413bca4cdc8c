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
from bisect import bisect_left, bisect_right
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
    _starts: list = field(default_factory=list, compare=False, repr=False)
    _longest: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", rules_digest(self.schedule, self.blocks))
        blocks = tuple(sorted(self.blocks, key=lambda b: (b.start_ms, b.block_id)))
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "_starts", [b.start_ms for b in blocks])
        object.__setattr__(self, "_longest",
                           max((b.end_ms - b.start_ms for b in blocks), default=0))

    @property
    def minimum_notice_ms(self) -> int:
        return self.schedule.minimum_notice_minutes * MINUTE_MS if self.schedule else 0

    @property
    def horizon_ms(self) -> int | None:
        return self.schedule.horizon_days * DAY_MS if self.schedule else None

    def blocks_for(self, resource_id: str, start_ms: int, end_ms: int) -> list[Block]:
        """Blocks of the resource (or of the whole vendor) overlapping ``[start, end)``
        (a bisection over the starts: a vendor may have thousands)."""
        lo = bisect_left(self._starts, start_ms - self._longest)
        hi = bisect_left(self._starts, end_ms)
        return [b for b in self.blocks[lo:hi] if b.end_ms > start_ms
                and (b.resource_id is None or b.resource_id == resource_id)]


def rules_digest(schedule: Schedule | None, blocks: tuple[Block, ...]) -> str:
    doc = {"schedule": schedule.document() if schedule else None,
           "blocks": [[b.block_id, b.start_ms, b.end_ms, b.status, b.resource_id]
                      for b in blocks]}
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(slots=True)
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

    __slots__ = ("rules", "now", "open", "open_starts", "busy", "tentative", "bb", "ba",
                 "notice_end", "horizon_end", "allow")

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
        self.notice_end = now_ms + rules.minimum_notice_ms
        horizon = rules.horizon_ms
        self.horizon_end = None if horizon is None else now_ms + horizon
        self.allow = bool(s and s.allow_tentative)

    def in_hours(self, start: int, end: int) -> bool:
        if self.open is None:
            return True
        i = bisect_right(self.open_starts, start) - 1
        return i >= 0 and self.open[i][1] >= end

    def check(self, start: int, end: int) -> tuple[list[str], bool]:
        """(refusing reasons in vocabulary order, tentative overlap allowed by the
        schedule). The hot path: no allocation beyond the answer when nothing refuses."""
        reasons: list[str] = []
        now = self.now
        if start < now:
            reasons.append("in_past")
        elif start < self.notice_end:
            reasons.append("minimum_notice")
        if self.horizon_end is not None and end > self.horizon_end:
            reasons.append("beyond_horizon")
        if self.open is not None and not self.in_hours(start, end):
            reasons.append("outside_hours")
        busy = tentative = False
        for lo, hi, _ in self.busy:
            if lo < end and hi > start:
                busy = True
                reasons.append("busy")
                break
        for lo, hi, _ in self.tentative:
            if lo < end and hi > start:
                tentative = True
                if not self.allow:
                    reasons.append("tentative")
                break
        if not busy and (self.bb or self.ba) and self._near(start, end):
            reasons.append("buffer")
        if len(reasons) > 1:
            reasons.sort(key=_ORDER.__getitem__)
        return reasons, tentative and self.allow

    def _near(self, start: int, end: int) -> list[str]:
        lo, hi = start - self.bb, end + self.ba
        near = [b[2] for b in self.busy if b[0] < hi and b[1] > lo]
        if not self.allow:
            near += [b[2] for b in self.tentative if b[0] < hi and b[1] > lo
                     and not (b[0] < end and b[1] > start)]
        return near

    def explain(self, start: int, end: int) -> list[dict[str, Any]]:
        """Every rule applied to one slot, in order, with whether it refused and why."""
        refused = set(self.check(start, end)[0])
        busy = [b[2] for b in self.busy if b[0] < end and b[1] > start]
        tentative = [b[2] for b in self.tentative if b[0] < end and b[1] > start]
        horizon = self.rules.horizon_ms
        details = {
            "in_past": {"now": self.now},
            "minimum_notice": {"minimumNoticeMinutes": self.rules.minimum_notice_ms // MINUTE_MS,
                               "earliestStart": self.notice_end},
            "beyond_horizon": {"horizonDays": None if horizon is None else horizon // DAY_MS,
                               "latestEnd": self.horizon_end},
            "outside_hours": {"hasSchedule": self.open is not None},
            "busy": {"blocks": busy},
            "tentative": {"blocks": tentative, "allowTentative": self.allow},
            "buffer": {"blocks": [] if busy else self._near(start, end),
                       "bufferBeforeMs": self.bb, "bufferAfterMs": self.ba},
        }
        return [{"rule": name, "refused": name in refused, "detail": detail}
                for name, detail in details.items()]


def refusals(rules: Rules, resource_id: str, start_ms: int, end_ms: int,
             now_ms: int) -> list[str]:
    """Why the rules refuse ``[start, end)`` on the resource now ([] = they allow it).
    Placement and the availability answer both ask this one function."""
    return _Window(rules, resource_id, start_ms, end_ms, now_ms).check(start_ms, end_ms)[0]


def explain(rules: Rules, resource_id: str, start_ms: int, end_ms: int,
            now_ms: int) -> list[dict[str, Any]]:
    """Every rule applied to one slot, in order, with whether it refused and why."""
    return _Window(rules, resource_id, start_ms, end_ms, now_ms).explain(start_ms, end_ms)


def _sorted(reasons: list[str]) -> list[str]:
    return sorted(set(reasons), key=_ORDER.__getitem__)


def confidence_of(reasons: list[str], tentative_allowed: bool = False) -> float:
    if reasons:
        return min(CONFIDENCE[r] for r in reasons)
    return CONFIDENCE["tentative"] if tentative_allowed else 1.0


# Bits of a slot's grid sweep (compute): one per rule that can refuse it.
_PAST, _NOTICE, _HORIZON, _OUTSIDE, _BUSY, _TENTATIVE, _NEAR, _HELD, _BOOKED, _UNIT_BUFFER, \
    _TENTATIVE_OK = (1 << i for i in range(11))
_BIT_REASONS = ((_OUTSIDE, "outside_hours"), (_BUSY, "busy"), (_TENTATIVE, "tentative"),
                (_HELD, "held"), (_BOOKED, "booked"), (_NOTICE, "minimum_notice"),
                (_HORIZON, "beyond_horizon"), (_PAST, "in_past"))
_VERDICTS: dict[int, tuple[list[str], float]] = {}


def _verdict(bits: int) -> tuple[list[str], float]:
    """(reasons, confidence) of a slot's bits, computed once per combination. The lists are
    shared between slots: nothing mutates them."""
    found = _VERDICTS.get(bits)
    if found is None:
        reasons = [name for bit, name in _BIT_REASONS if bits & bit]
        if (bits & _NEAR and not bits & _BUSY) or (bits & _UNIT_BUFFER and not bits & (
                _HELD | _BOOKED)):
            reasons.append("buffer")
        found = _VERDICTS[bits] = (reasons, confidence_of(reasons, bool(bits & _TENTATIVE_OK)))
    return found


def compute(rules: Rules, resource_id: str, *, unit_ms: int, buffer_before_ms: int,
            buffer_after_ms: int, start_ms: int, end_ms: int, slot_ms: int, now_ms: int,
            occupancy: str, first_unit: int) -> list[Slot]:
    """Every slot of ``slot_ms`` from ``start_ms`` ending by ``end_ms``. ``occupancy`` has
    one character per unit from ``first_unit`` ('.' free, 'h' held, 'b' booked) covering
    the range widened by the resource's buffers.

    A sweep over the grid: each rule marks the slots it refuses by index arithmetic
    (O(slots + blocks)); the same rules as :func:`refusals` asks slot by slot, which the
    property tests hold it to."""
    n = max(0, (end_ms - start_ms) // slot_ms)
    bits = [0] * n
    window = _Window(rules, resource_id, start_ms, start_ms + n * slot_ms, now_ms)

    def first_starting_at_or_after(t: int) -> int:  # index of the first slot start >= t
        return min(n, max(0, -(-(t - start_ms) // slot_ms)))

    def overlapping(lo: int, hi: int) -> range:  # slots overlapping [lo, hi)
        return range(max(0, (lo - start_ms) // slot_ms),
                     min(n, max(0, -(-(hi - start_ms) // slot_ms))))

    def mark(indices, bit: int) -> None:
        for i in indices:
            bits[i] |= bit

    past_end = first_starting_at_or_after(now_ms)
    mark(range(past_end), _PAST)
    mark(range(past_end, first_starting_at_or_after(window.notice_end)), _NOTICE)
    if window.horizon_end is not None:
        # end > horizon_end  <=>  i + 1 > (horizon_end - start) / slot
        mark(range(min(n, max(0, (window.horizon_end - start_ms) // slot_ms)), n), _HORIZON)
    if window.open is not None:
        inside = [False] * n
        for lo, hi in window.open:  # slots with lo <= start and end <= hi
            for i in range(first_starting_at_or_after(lo),
                           min(n, max(0, (hi - start_ms) // slot_ms))):
                inside[i] = True
        for i in range(n):
            if not inside[i]:
                bits[i] |= _OUTSIDE
    bb, ba = window.bb, window.ba
    for lo, hi, _ in window.busy:
        mark(overlapping(lo, hi), _BUSY)
        if bb or ba:  # the slot's [start - bb, end + ba) meets the block
            mark(overlapping(lo - ba, hi + bb), _NEAR)
    for lo, hi, _ in window.tentative:
        own = overlapping(lo, hi)
        mark(own, _TENTATIVE_OK if window.allow else _TENTATIVE)
        if (bb or ba) and not window.allow:
            mark((i for i in overlapping(lo - ba, hi + bb) if i not in own), _NEAR)
    before, after = buffer_before_ms // unit_ms, buffer_after_ms // unit_ms
    per_slot = slot_ms // unit_ms
    busy_units = occupancy.strip(".") != ""
    slots = []
    for i in range(n):
        start = start_ms + i * slot_ms
        b = bits[i]
        if busy_units:
            own_first = start // unit_ms - first_unit
            own = occupancy[own_first:own_first + per_slot]
            if "b" in own:
                b |= _BOOKED
            elif "h" in own:
                b |= _HELD
            elif (before or after) and occupancy[max(0, own_first - before):
                                                 own_first + per_slot + after].strip("."):
                b |= _UNIT_BUFFER  # the hold's buffers would touch another hold
        reasons, confidence = _verdict(b)
        slots.append(Slot(start, start + slot_ms, not reasons, confidence, reasons,
                          "booked" if b & _BOOKED else "held" if b & _HELD else "free"))
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
