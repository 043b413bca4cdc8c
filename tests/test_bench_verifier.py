"""The bench verifier catches planted double bookings and names the ids (real Redis and
Postgres; the faults are written behind the engine's back)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from benchmarks import history as h
from benchmarks.env import BASELINE_DDL
from benchmarks.verifier import check_history, PostgresState, RedisState, verify
from engine.db import migrate
from benchmarks.holds import HoldEngine
from tests.conftest import DATABASE_URL
from tests.test_db import drop_schema

T0_UNIT = 2_103_840  # 2030-01-01 in 15-minute units


@pytest.fixture
async def schema_conn(settings):
    await asyncio.to_thread(migrate, settings)
    conn = await asyncpg.connect(DATABASE_URL,
                                 server_settings={"search_path": settings.db_schema})
    await conn.execute(BASELINE_DDL)
    yield conn
    await conn.close()
    await drop_schema(settings.db_schema)


def kinds(report) -> dict[str, set[tuple[str, ...]]]:
    found: dict[str, set[tuple[str, ...]]] = {}
    for v in report.violations:
        found.setdefault(v.kind, set()).add(v.ids)
    return found


async def plant_hold(redis, keys, hold_id: str, resource: str, first: int, last: int,
                     *, own_units: range) -> None:
    expires = int(time.time() * 1000) + 600_000
    await redis.hset(keys.hold(hold_id), mapping={"r": resource, "f": first, "l": last,
                                                  "x": expires, "c": expires - 600_000,
                                                  "n": 0, "t": 1, "o": "planted"})
    for unit in own_units:
        await redis.set(keys.unit(resource, unit), hold_id, px=600_000)


async def test_clean_engine_state_passes(redis, keys, holds: HoldEngine, schema_conn):
    placed = await holds.place("room-b", 1_893_456_000_000, 1_893_456_000_000 + 3_600_000)
    entry = h.Entry(h.PLACE, h.OK, placed.hold_id, "room-b", placed.first_unit,
                    placed.last_unit, 1.0, 1.1, expires_ms=placed.expires_at_ms)
    report = await verify(redis, keys, schema_conn, [entry],
                          tables=["bench_pg_excl", "bench_pg_lock"])
    assert report.violations == []
    assert report.checked["holds"] == 1


async def test_two_overlapping_live_holds_in_redis_are_named(redis, keys, schema_conn):
    a = keys.new_hold_id("room-a")
    b = keys.new_hold_id("room-a")
    # A owns 10..13; B claims 12..15 but could only write 14..15 (or overwrote nothing).
    await plant_hold(redis, keys, a, "room-a", T0_UNIT + 10, T0_UNIT + 13,
                     own_units=range(T0_UNIT + 10, T0_UNIT + 14))
    await plant_hold(redis, keys, b, "room-a", T0_UNIT + 12, T0_UNIT + 15,
                     own_units=range(T0_UNIT + 14, T0_UNIT + 16))
    report = await verify(redis, keys, schema_conn, [])
    found = kinds(report)
    assert tuple(sorted((a, b))) in found["overlapping_live_holds"]
    assert any(b in ids and a in ids for ids in found["hold_lost_units"])


async def test_overlapping_bookings_in_a_table_without_the_constraint(redis, keys,
                                                                      schema_conn):
    rows = [("pg_one", "r1", "2030-01-01 10:00+00", "2030-01-01 11:00+00"),
            ("pg_two", "r1", "2030-01-01 10:45+00", "2030-01-01 12:00+00"),
            ("pg_touch", "r1", "2030-01-01 12:00+00", "2030-01-01 13:00+00"),  # touches two
            ("pg_other", "r2", "2030-01-01 10:00+00", "2030-01-01 11:00+00")]
    await schema_conn.executemany(
        "INSERT INTO bench_pg_lock (id, resource_id, resource_key, block_start, block_end) "
        "VALUES ($1, $2, 0, $3::text::timestamptz, $4::text::timestamptz)", rows)
    report = await verify(redis, keys, schema_conn, [], tables=["bench_pg_lock"])
    assert kinds(report) == {"overlapping_bookings": {("pg_one", "pg_two")}}
    # A cancelled row frees its interval.
    await schema_conn.execute("UPDATE bench_pg_lock SET cancelled_at = now() WHERE id = 'pg_two'")
    assert (await verify(redis, keys, schema_conn, [], tables=["bench_pg_lock"])).violations == []


async def test_committed_reservation_without_a_booking_is_named(redis, keys, schema_conn):
    rid = keys.new_reservation_id("room-a")
    await redis.hset(keys.reservation(rid), mapping={
        "st": "COMMITTED", "v": 3, "rs": "room-a", "f": T0_UNIT, "l": T0_UNIT + 1,
        "bk": "bkg_x"})
    for unit in (T0_UNIT, T0_UNIT + 1):
        await redis.set(keys.unit("room-a", unit), "B|" + rid)
    report = await verify(redis, keys, schema_conn, [
        h.Entry(h.COMMITTED, h.OK, rid, sent=1.0, answered=1.0)])
    found = kinds(report)
    assert (rid,) in found["committed_without_one_booking"]
    assert (rid,) in found["committed_without_booking"]


def test_history_overlap_and_missing_reservation_are_named():
    state = RedisState(now_ms=int(time.time() * 1000))
    state.reservations = {"rsv_a": {"st": "HELD", "rs": "r", "f": "1", "l": "2"},
                          "rsv_b": {"st": "HELD", "rs": "r", "f": "2", "l": "3"}}
    entries = [
        h.Entry(h.CREATE, h.OK, "rsv_a", "r", 1, 2, 1.0, 1.1),
        h.Entry(h.CREATE, h.OK, "rsv_b", "r", 2, 3, 1.0, 1.2),  # both told they hold unit 2
        h.Entry(h.CREATE, h.OK, "rsv_ghost", "r", 9, 9, 1.0, 1.3),  # a 201 that exists nowhere
        h.Entry(h.CREATE, h.CONFLICT, "", "r", 1, 1, 1.0, 1.4, holder="rsv_unknown", unit=1),
    ]
    violations, _ = check_history(entries, state, PostgresState(), drained=True)
    found = {(v.kind, v.ids) for v in violations}
    assert ("history_overlap", ("rsv_a", "rsv_b")) in found
    assert ("reservation_missing", ("rsv_ghost",)) in found
    assert ("conflict_names_unknown_holder", ("rsv_unknown",)) in found


def test_released_windows_do_not_overlap():
    state = RedisState(now_ms=int(time.time() * 1000))
    entries = [
        h.Entry(h.PLACE, h.OK, "hld_a", "r", 1, 2, 1.0, 1.1, expires_ms=state.now_ms + 60_000),
        h.Entry(h.RELEASE, h.OK, "hld_a", "r", 1, 2, 1.2, 1.3),
        h.Entry(h.PLACE, h.OK, "hld_b", "r", 1, 2, 1.15, 1.35, expires_ms=state.now_ms + 60_000),
        h.Entry(h.RELEASE, h.OK, "hld_b", "r", 1, 2, 1.4, 1.5),
    ]
    violations, _ = check_history(entries, state, PostgresState(), drained=True)
    assert violations == []
    # B answered before A's release left: two clients held unit 1 at once.
    entries[2] = entries[2]._replace(answered=1.19)
    violations, _ = check_history(entries, state, PostgresState(), drained=True)
    assert [(v.kind, v.ids) for v in violations] == [("history_overlap", ("hld_a", "hld_b"))]
