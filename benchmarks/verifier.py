"""The verifier: after every scenario, prove from Redis, Postgres and the client history that
nothing was double booked and every success the clients saw is true of the final state.

Checks (each violation names the ids involved):

- ``overlapping_live_holds``: two live holds or reservations (records in Redis) claim one unit
  of one resource; buffers are part of the units, so this is the buffered interval.
- ``hold_lost_units``: a live hold or reservation does not own a unit it claims.
- ``committed_without_marker``: a COMMITTED reservation whose units are not booked markers.
- ``overlapping_bookings``: two uncancelled rows of a bookings table overlap on a resource
  (run on ``bookings`` and on every baseline table; a table without the exclusion constraint
  is exactly where this can happen).
- ``committed_without_one_booking``: a reservation COMMITTED (in Redis or Postgres) without
  exactly one uncancelled booking row, or whose booking id disagrees with the row.
- history: ``hold_vanished`` (a hold that answered success is gone before its expiry without
  a recorded release), ``released_hold_still_live``, ``reservation_missing`` (a 201 that
  exists nowhere), ``cancelled_not_cancelled``, ``commit_not_finished``,
  ``committed_without_booking``, ``inserted_row_missing``, ``conflict_names_unknown_holder``,
  and ``history_overlap``: two clients were told they held overlapping units at the same
  time (each success's window runs from its answer to the send of its release).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from benchmarks import history as h
from engine.lifecycle import BOOKED_PREFIX
from engine.keys import KeySpace
from engine.lifecycle import TERMINAL

EXPIRY_SLACK_MS = 2_000  # a record this close to its expiry may vanish while we scan
INF = float("inf")


@dataclass(frozen=True)
class Violation:
    kind: str
    ids: tuple[str, ...]
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "ids": list(self.ids), "detail": self.detail}


@dataclass
class RedisState:
    now_ms: int
    holds: dict[str, dict[str, str]] = field(default_factory=dict)
    reservations: dict[str, dict[str, str]] = field(default_factory=dict)
    units: dict[tuple[str, int], str] = field(default_factory=dict)


@dataclass
class PostgresState:
    reservations: dict[str, dict[str, Any]] = field(default_factory=dict)
    bookings_by_reservation: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, set[str]] = field(default_factory=dict)  # table -> ids present


@dataclass
class Report:
    violations: list[Violation]
    checked: dict[str, int]
    seconds: float

    def as_dict(self, limit: int = 50) -> dict[str, Any]:
        return {"violations": len(self.violations),
                "violation_details": [v.as_dict() for v in self.violations[:limit]],
                "checked": self.checked, "seconds": round(self.seconds, 3)}


# ---- Redis ---------------------------------------------------------------------------------
async def scan_redis(client: aioredis.Redis, keys: KeySpace) -> RedisState:
    """Every hold record, reservation record and unit key of the key space."""
    state = RedisState(now_ms=int(time.time() * 1000))
    hold_keys, reservation_keys, unit_keys = [], [], []
    async for key in client.scan_iter(match=keys.pattern(), count=5000):
        key = key.decode() if isinstance(key, bytes) else key
        _, _, rest = key.partition("}:")
        kind, _, name = rest.partition(":")
        if kind == "h":
            hold_keys.append((name, key))
        elif kind == "r":
            reservation_keys.append((name, key))
        elif kind == "u":
            resource, _, index = name.rpartition(":")
            unit_keys.append(((resource, int(index)), key))
    for chunk in _chunks(hold_keys, 2000):
        pipe = client.pipeline(transaction=False)
        for _, key in chunk:
            pipe.hgetall(key)
        for (hold_id, _), fields in zip(chunk, await pipe.execute()):
            if fields:
                state.holds[hold_id] = _text(fields)
    for chunk in _chunks(reservation_keys, 2000):
        pipe = client.pipeline(transaction=False)
        for _, key in chunk:
            pipe.hgetall(key)
        for (rid, _), fields in zip(chunk, await pipe.execute()):
            if fields:
                state.reservations[rid] = _text(fields)
    for chunk in _chunks(unit_keys, 5000):
        names = [key for _, key in chunk]
        # A cluster client reads keys of several slots with one MGET per slot.
        values = await (client.mget_nonatomic(names) if hasattr(client, "mget_nonatomic")
                        else client.mget(names))
        for (unit, _), value in zip(chunk, values):
            if value is not None:
                state.units[unit] = value.decode() if isinstance(value, bytes) else value
    return state


def live_claims(state: RedisState) -> dict[str, tuple[str, int, int, str]]:
    """id -> (resource, first, last, expected unit value) of every live claim in Redis."""
    claims = {}
    for hold_id, rec in state.holds.items():
        if int(rec.get("x") or 0) > state.now_ms + EXPIRY_SLACK_MS:
            claims[hold_id] = (rec["r"], int(rec["f"]), int(rec["l"]), hold_id)
    for rid, rec in state.reservations.items():
        st = rec.get("st")
        # A multi-resource reservation (issue 16) claims every item: rid, rid#1, rid#2, ...
        places = ([(i[0], int(i[3]), int(i[4])) for i in json.loads(rec["it"])]
                  if rec.get("it") else [(rec.get("rs"), int(rec.get("f") or 0),
                                          int(rec.get("l") or -1))])
        for k, (resource, first, last) in enumerate(places):
            claim = rid if k == 0 else f"{rid}#{k}"
            if st == "COMMITTED":
                claims[claim] = (resource, first, last, BOOKED_PREFIX + rid)
            elif st == "COMMIT_IN_PROGRESS" or (
                    st not in TERMINAL
                    and int(rec.get("dl") or 0) > state.now_ms + EXPIRY_SLACK_MS):
                claims[claim] = (resource, first, last, rid)
    return claims


def check_redis(state: RedisState) -> list[Violation]:
    violations = []
    claims = live_claims(state)
    by_unit: dict[tuple[str, int], list[str]] = defaultdict(list)
    for claim_id, (resource, first, last, _) in claims.items():
        for unit in range(first, last + 1):
            by_unit[(resource, unit)].append(claim_id)
    reported: set[tuple[str, ...]] = set()
    for (resource, unit), ids in sorted(by_unit.items()):
        if len(ids) > 1:
            pair = tuple(sorted(ids))
            if pair not in reported:  # one violation per pair, not per shared unit
                reported.add(pair)
                violations.append(Violation(
                    "overlapping_live_holds", pair,
                    f"{len(ids)} live holds claim {resource} unit {unit}"))
    for claim_id, (resource, first, last, expected) in sorted(claims.items()):
        wrong = [u for u in range(first, last + 1) if state.units.get((resource, u)) != expected]
        if wrong:
            kind = ("committed_without_marker" if expected.startswith(BOOKED_PREFIX)
                    else "hold_lost_units")
            holders = sorted({state.units.get((resource, u)) or "<free>" for u in wrong})
            violations.append(Violation(
                kind, (claim_id, *[x for x in holders if x != "<free>"]),
                f"{resource} units {wrong[:5]}{'...' if len(wrong) > 5 else ''} are "
                f"{', '.join(holders)} instead of {expected}"))
    return violations


# ---- Postgres ------------------------------------------------------------------------------
_OVERLAPPING_ROWS = """
SELECT id, resource_id FROM (
    SELECT id, resource_id, block_start,
           max(block_end) OVER (PARTITION BY resource_id ORDER BY block_start, block_end, id
                                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS reach
    FROM {table} WHERE cancelled_at IS NULL
) s WHERE reach > block_start
"""
_OVERLAPPING_WITH = """
SELECT b.id FROM {table} a JOIN {table} b
  ON b.resource_id = a.resource_id AND b.id <> a.id AND b.cancelled_at IS NULL
 AND tstzrange(a.block_start, a.block_end, '[)') && tstzrange(b.block_start, b.block_end, '[)')
WHERE a.id = $1
"""


async def check_tables(conn: asyncpg.Connection, tables: Iterable[str]) -> list[Violation]:
    """No two uncancelled rows of a bookings-shaped table overlap on one resource."""
    violations = []
    for table in tables:
        reported: set[tuple[str, ...]] = set()
        for row in await conn.fetch(_OVERLAPPING_ROWS.format(table=table)):
            for other in await conn.fetch(_OVERLAPPING_WITH.format(table=table), row["id"]):
                pair = tuple(sorted((row["id"], other["id"])))
                if pair not in reported:
                    reported.add(pair)
                    violations.append(Violation(
                        "overlapping_bookings", pair,
                        f"{table}: two bookings overlap on {row['resource_id']}"))
    return violations


async def load_postgres(conn: asyncpg.Connection, tables: Iterable[str],
                        ids_of_interest: Iterable[str]) -> PostgresState:
    state = PostgresState()
    for row in await conn.fetch("SELECT id, state, booking_id FROM reservations"):
        state.reservations[row["id"]] = dict(row)
    for row in await conn.fetch(
            # One row per item of a multi-resource reservation (issue 16): item 0 carries
            # the reservation's booking id; the others are its items.
            "SELECT reservation_id, id FROM bookings WHERE cancelled_at IS NULL AND item = 0"):
        state.bookings_by_reservation.setdefault(row["reservation_id"], []).append(row["id"])
    wanted = sorted(set(ids_of_interest))
    for table in tables:
        rows = await conn.fetch(f"SELECT id FROM {table} WHERE id = ANY($1::text[])", wanted)
        state.rows[table] = {r["id"] for r in rows}
    return state


def check_committed(redis_state: RedisState, pg: PostgresState) -> list[Violation]:
    """Every COMMITTED reservation has exactly one booking row, the one it names."""
    violations = []
    committed = {rid: rec.get("bk") or None for rid, rec in redis_state.reservations.items()
                 if rec.get("st") == "COMMITTED"}
    for rid, row in pg.reservations.items():
        if row["state"] == "COMMITTED":
            committed.setdefault(rid, row["booking_id"])
    for rid, booking_id in sorted(committed.items()):
        rows = pg.bookings_by_reservation.get(rid, [])
        if len(rows) != 1:
            violations.append(Violation("committed_without_one_booking", (rid, *rows),
                                        f"COMMITTED with {len(rows)} booking rows"))
        elif booking_id and rows[0] != booking_id:
            violations.append(Violation("committed_without_one_booking", (rid, rows[0]),
                                        f"names booking {booking_id}, the row is {rows[0]}"))
    return violations


# ---- the client history --------------------------------------------------------------------
def check_history(entries: list[h.Entry], redis_state: RedisState, pg: PostgresState,
                  *, drained: bool) -> tuple[list[Violation], dict[str, int]]:
    violations: list[Violation] = []
    now = redis_state.now_ms
    ended: dict[str, h.Entry] = {}  # id -> its successful release / cancel
    ending_errors: dict[str, h.Entry] = {}
    commits: dict[str, h.Entry] = {}
    known = set(redis_state.holds) | set(redis_state.reservations) | set(pg.reservations)
    for e in entries:
        if e.op in h.ENDING:
            (ended if e.outcome == h.OK else ending_errors)[e.id] = e
        elif e.op == h.COMMIT and e.outcome == h.OK:
            commits[e.id] = e
        if e.outcome == h.OK and e.id:
            known.add(e.id)
    for rows in pg.rows.values():
        known |= rows
    unchecked = 0
    windows: dict[tuple[str, str, int], list[tuple[float, float, str]]] = defaultdict(list)
    for e in entries:
        if e.outcome == h.CONFLICT and e.holder and e.holder not in known:
            violations.append(Violation("conflict_names_unknown_holder", (e.holder,),
                                        f"a conflict on {e.resource} unit {e.unit} named it"))
        if e.outcome != h.OK:
            continue
        if e.op == h.PLACE:
            live = e.id in redis_state.holds
            if e.id in ended and live:
                violations.append(Violation("released_hold_still_live", (e.id,),
                                            "released with success but its record is live"))
            elif e.id not in ended and e.id not in ending_errors and not live \
                    and e.expires_ms > now + EXPIRY_SLACK_MS:
                violations.append(Violation(
                    "hold_vanished", (e.id,),
                    f"placed, never released, gone {e.expires_ms - now} ms before expiry"))
        elif e.op == h.CREATE:
            rec = redis_state.reservations.get(e.id)
            state = rec.get("st") if rec else (pg.reservations.get(e.id) or {}).get("state")
            if state is None:
                violations.append(Violation("reservation_missing", (e.id,),
                                            "created (201) but in neither Redis nor Postgres"))
            elif e.id in ended and state != "CANCELLED":
                violations.append(Violation("cancelled_not_cancelled", (e.id,),
                                            f"cancel answered success, state is {state}"))
            elif e.id in commits and drained and state == "COMMIT_IN_PROGRESS":
                violations.append(Violation("commit_not_finished", (e.id,),
                                            "queue drained, still COMMIT_IN_PROGRESS"))
        elif e.op == h.COMMITTED and len(pg.bookings_by_reservation.get(e.id, [])) != 1:
            violations.append(Violation("committed_without_booking", (e.id,),
                                        "read as COMMITTED without exactly one booking row"))
        elif e.op == h.PG_INSERT and e.id not in pg.rows.get(e.table, set()):
            violations.append(Violation("inserted_row_missing", (e.id,),
                                        f"insert into {e.table} succeeded, row missing"))
        if e.op not in h.ACQUIRING:
            continue
        end = _window_end(e, ended, ending_errors, redis_state, pg)
        if end is None:
            unchecked += 1
            continue
        space = e.table or "redis"
        for unit in range(e.first, e.last + 1):
            windows[(space, e.resource, unit)].append((e.answered, end, e.id))
    reported: set[tuple[str, ...]] = set()
    for (space, resource, unit), spans in windows.items():
        spans.sort()
        reach_end, reach_id = -INF, ""
        for start, end, ident in spans:
            if start < reach_end:
                pair = tuple(sorted((ident, reach_id)))
                if pair not in reported:
                    reported.add(pair)
                    violations.append(Violation(
                        "history_overlap", pair,
                        f"{space}: both told they held {resource} unit {unit} at once"))
            if end > reach_end:
                reach_end, reach_id = end, ident
    return violations, {"history_entries": len(entries), "history_windows_unchecked": unchecked}


def _window_end(e: h.Entry, ended, ending_errors, redis_state: RedisState,
                pg: PostgresState) -> float | None:
    """When the client stopped believing it held the units; None when unknowable."""
    if e.id in ended:
        return ended[e.id].sent
    if e.op == h.PLACE:
        if e.id in redis_state.holds:
            return INF
        if e.id in ending_errors:
            return ending_errors[e.id].sent  # the release landed although its answer was lost
        return None  # expired by its TTL: the window closed at a time Redis chose
    if e.op == h.CREATE:
        rec = redis_state.reservations.get(e.id)
        state = rec.get("st") if rec else (pg.reservations.get(e.id) or {}).get("state")
        if state is None or (state in TERMINAL and state != "COMMITTED"):
            return None  # ended by something other than this client (expiry, failure)
        return INF
    return INF if e.id not in ending_errors else None


# ---- all of it -----------------------------------------------------------------------------
async def verify(client: aioredis.Redis, keys: KeySpace, conn: asyncpg.Connection,
                 entries: list[h.Entry], *, tables: Iterable[str] = (),
                 drained: bool = True) -> Report:
    """Scan Redis and Postgres and hold them and the history against each other."""
    started = time.monotonic()
    tables = list(tables)
    redis_state = await scan_redis(client, keys)
    violations = check_redis(redis_state)
    violations += await check_tables(conn, ["bookings", *tables])
    pg = await load_postgres(conn, tables, (e.id for e in entries if e.op == h.PG_INSERT))
    violations += check_committed(redis_state, pg)
    history_violations, counts = check_history(entries, redis_state, pg, drained=drained)
    violations += history_violations
    checked = {"holds": len(redis_state.holds), "reservations": len(redis_state.reservations),
               "units": len(redis_state.units), "pg_reservations": len(pg.reservations),
               "bookings": sum(len(v) for v in pg.bookings_by_reservation.values()), **counts}
    return Report(violations, checked, time.monotonic() - started)


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _text(fields: dict) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes)
                                                          else v) for k, v in fields.items()}

