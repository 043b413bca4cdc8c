"""The assignment optimizer (issue 16, pool): ``slotguard optimize --vendor V --date D``.

For each resource group of the vendor it re-plans which member each live pre-commit hold of
the day sits on (times never change), packing holds so fewer free gaps are left, and moves
them with the modify script (lua/modify_reservation.lua: all or nothing, the new units
checked excluding the hold's own, so never a double booking), each move recorded with
reason ``optimizer`` in the history and the audit log. It applies a plan only when the gain
is over ``SLOTGUARD_OPTIMIZER_MIN_GAIN_PERCENT`` (10 %, the seed's rule); a dry run prints
the plan and the gain.

*Fragmentation* of a member over the day is the number of its maximal free runs of units
that do not span the whole day (a member free all day is not fragmented); a group's is the
sum over its members. Committed bookings, commits in progress and holds of other states
are fixed obstacles: only pre-commit holds are moved (the modify script's own rule).

Plan: fixed occupancy first; then the movable holds, longest first, each onto the member
where it adds the least fragmentation (ties: the member it is on, then the group's order).
Apply: moves in passes; a move whose target is still taken by a hold that moves later waits
for the next pass; what cannot move (a cycle, or a hold that changed since the plan) is
reported as skipped, never forced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from engine.errors import EngineError, Outcome
from engine.lifecycle import PRE_COMMIT

PRE_COMMIT_STATES = frozenset(s.value for s in PRE_COMMIT)
from engine.resources import Resource


@dataclass(frozen=True, slots=True)
class Movable:
    reservation_id: str
    resource_id: str
    start_ms: int
    end_ms: int
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Move:
    reservation_id: str
    from_resource: str
    to_resource: str
    start_ms: int
    end_ms: int


@dataclass
class Plan:
    vendor_id: str
    group_id: str
    before: int
    after: int
    moves: list[Move] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # reservation ids moved
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (reservation id, why)
    note: str = ""

    @property
    def gain_percent(self) -> float:
        return 0.0 if self.before == 0 else 100.0 * (self.before - self.after) / self.before


def fragments(row: list[bool]) -> int:
    """Free runs of a member's day that do not span it (``row[i]`` True = occupied)."""
    if not any(row):
        return 0
    runs, free = 0, False
    for taken in row:
        if not taken and not free:
            runs += 1
        free = not taken
    return runs


def day_window(day: date, timezone: str) -> tuple[int, int]:
    zone = ZoneInfo(timezone)
    start = datetime.combine(day, time(0), zone)
    end = datetime.combine(day + timedelta(days=1), time(0), zone)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def plan_group(members: list[Resource], fixed: dict[str, set[int]], movable: list[Movable],
               window: tuple[int, int]) -> tuple[int, int, list[Move]]:
    """(fragmentation before, after, moves) for one group over units ``[window)``."""
    lo, hi = window
    ids = [m.id for m in members]

    def row(units: set[int]) -> list[bool]:
        return [u in units for u in range(lo, hi)]

    now: dict[str, set[int]] = {r: set(fixed.get(r, ())) for r in ids}
    for m in movable:
        now[m.resource_id] |= set(range(m.first, m.last + 1))
    before = sum(fragments(row(now[r])) for r in ids)
    plan: dict[str, set[int]] = {r: set(fixed.get(r, ())) for r in ids}
    moves = []
    for m in sorted(movable, key=lambda m: (-(m.last - m.first), m.first, m.reservation_id)):
        units = set(range(m.first, m.last + 1))
        best = None
        for order, r in enumerate(ids):
            if plan[r] & units:
                continue
            delta = fragments(row(plan[r] | units)) - fragments(row(plan[r]))
            key = (delta, r != m.resource_id, order)
            if best is None or key < best[0]:
                best = (key, r)
        target = best[1] if best is not None else m.resource_id  # its own place is free
        plan[target] |= units
        if target != m.resource_id:
            moves.append(Move(m.reservation_id, m.resource_id, target, m.start_ms, m.end_ms))
    after = sum(fragments(row(plan[r])) for r in ids)
    return before, after, moves


async def gather_group(rt, members: list[Resource], vendor_id: str, window_ms: tuple[int, int]
                       ) -> tuple[dict[str, set[int]], list[Movable], tuple[int, int]]:
    """Occupancy of the members around the day from Redis: fixed units and movable holds."""
    keys, redis = rt.keys, rt.redis
    unit = members[0].unit_ms
    lo, hi = window_ms[0] // unit, window_ms[1] // unit  # units [lo, hi)
    shard = keys.shard_of(members[0].shard_name)
    by_id = {m.id: m for m in members}
    movable = []
    ids = await redis.zrange(keys.deadlines(shard), 0, -1)
    pipe = redis.pipeline(transaction=False)
    for rid in ids:
        pipe.hgetall(keys.reservation(rid))
    for rid, rec in zip(ids, await pipe.execute()):
        if (rec.get("vd") != vendor_id or rec.get("rs") not in by_id or "it" in rec
                or rec.get("st") not in PRE_COMMIT_STATES):
            continue
        first, last = int(rec["f"]), int(rec["l"])
        if last < lo or first >= hi:
            continue
        movable.append(Movable(rid, rec["rs"], int(rec["s"]), int(rec["e"]), first, last))
    span_lo = min([lo] + [m.first for m in movable])
    span_hi = max([hi - 1] + [m.last for m in movable])
    fixed: dict[str, set[int]] = {}
    for member in members:
        reply = await rt.access.call("read_units", [keys.unit_root(shard)],
                                     [member.id, span_lo, span_hi, span_hi - span_lo + 1])
        if int(reply[0]) != Outcome.OK:
            raise EngineError(str(reply[1]))
        occupancy = reply[1]
        taken = {span_lo + i for i, c in enumerate(occupancy) if c != "."}
        # Units of holds that move are not fixed (read them back from their records).
        for m in movable:
            if m.resource_id == member.id:
                taken -= set(range(m.first, m.last + 1))
        fixed[member.id] = taken
    return fixed, movable, (lo, hi)


async def optimize(rt, groups, vendor_id: str, day: date, *, apply: bool,
                   min_gain_percent: float) -> list[Plan]:
    """Plan (and with ``apply``, carry out) every group of the vendor for ``day``."""
    from engine.directory import get_vendor

    async with rt.pool.acquire() as conn:
        vendor = await get_vendor(conn, vendor_id)
        group_ids = [r["group_id"] for r in await conn.fetch(
            "SELECT group_id FROM resource_groups WHERE vendor_id = $1 ORDER BY group_id",
            vendor_id)]
    await rt.refresh_catalog()
    window_ms = day_window(day, vendor.timezone)
    plans = []
    for group_id in group_ids:
        group, members = await groups.resolve(vendor.to_engine(), group_id)
        if len({(m.unit_ms, m.buffer_before_ms, m.buffer_after_ms) for m in members}) > 1:
            plans.append(Plan(vendor_id, group_id, 0, 0,
                              note="members differ in unit or buffers: not re-planned"))
            continue
        fixed, movable, window = await gather_group(rt, members, vendor_id, window_ms)
        before, after, moves = plan_group(members, fixed, movable, window)
        plan = Plan(vendor_id, group_id, before, after, moves)
        if apply and moves and plan.gain_percent > min_gain_percent:
            await apply_moves(rt, plan, {m.id: m for m in members})
        elif apply and moves:
            plan.note = f"gain {plan.gain_percent:.1f} % is not over {min_gain_percent:g} %"
        plans.append(plan)
    return plans


async def apply_moves(rt, plan: Plan, members: dict[str, Resource]) -> None:
    from engine.errors import HoldConflict

    pending = list(plan.moves)
    while pending:
        waiting = []
        for move in pending:
            try:
                await rt.reservations.modify(
                    move.reservation_id, actor="system", resource=members[move.to_resource],
                    start_ms=move.start_ms, end_ms=move.end_ms, reason="optimizer",
                    metadata={"optimizer": {"from": move.from_resource,
                                            "to": move.to_resource}})
                plan.applied.append(move.reservation_id)
            except HoldConflict:
                waiting.append(move)  # its target may be freed by a later move
            except EngineError as exc:  # it ended or changed since the plan
                plan.skipped.append((move.reservation_id, exc.code))
        if len(waiting) == len(pending):
            plan.skipped += [(m.reservation_id, "SLOT_UNAVAILABLE") for m in waiting]
            return
        pending = waiting
