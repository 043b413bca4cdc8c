"""Postgres as the record of every item of a multi-resource reservation (issue 16, pool2):
the commit queue writes `reservations.items` (migration 0014) in the snapshot's statement,
and every read from Postgres (GET once the Redis record is gone, the list, replay and
parity, `slotguard replay`) lists every item; rehydration restores every item's markers;
migration 0014 backfills rows written before it. Real Redis, real Postgres, a real drain."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import asyncpg
from yoyo import get_backend, read_migrations

from engine import db, parity
from engine.rehydration import rehydrate
from engine.runtime import Runtime
from jobs.reconcile import reconcile
from tests.conftest import DATABASE_URL, REDIS_URL
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    T0_MS,
    api_settings,
    app,
    at,
    client,
    create_body,
    migrated,
    world,
)
from tests.test_modify import drain
from tests.test_pool_multi import ITEMS, _minutes, _ms, multi_body, setup, units


def _postgres_items(items: list[dict], buffer_after_ms: int = 0) -> list[dict]:
    return [{"resourceId": i["resourceId"], "slotStart": _ms(i["slotStartTime"]),
             "slotEnd": _ms(i["slotEndTime"]), "blockStart": _ms(i["slotStartTime"]),
             "blockEnd": _ms(i["slotEndTime"]) + buffer_after_ms} for i in items]


async def _row_items(svc, rid: str) -> list[dict]:
    async with svc.pool.acquire() as conn:
        return db.json_value(await conn.fetchval(
            "SELECT items FROM reservations WHERE id = $1", rid))


async def test_every_item_is_in_postgres_and_every_read_lists_them_once_redis_forgot(
        app, client, world, redis):
    await setup(app)
    svc = app.state.services
    keys = svc.keyspace
    r = await client.post("/v1/reservations", json=multi_body(ITEMS), headers=world.auth("p1"))
    assert r.status_code == 201, r.text
    rid = r.json()["reservationId"]
    r = await client.post(f"/v1/reservations/{rid}/commit", headers=world.auth("p1"))
    assert r.status_code == 202, r.text
    # A one-resource reservation beside it, moved once: its one item follows the move.
    r = await client.post("/v1/reservations",
                          json=create_body("v-instant", 600, 30, resourceId="table"),
                          headers=world.auth("p1"))
    single = r.json()["reservationId"]
    await drain(svc)
    r = await client.post(f"/v1/reservations/{single}/modify",
                          json={"slotStartTime": at(720), "slotEndTime": at(750)},
                          headers=world.auth("p1"))
    assert r.status_code == 200, r.text
    await drain(svc)

    # Postgres: every item, in order, written with the snapshot.
    assert await _row_items(svc, rid) == _postgres_items(ITEMS)
    assert await _row_items(svc, single) == _postgres_items(
        [{"resourceId": "table", "slotStartTime": at(720), "slotEndTime": at(750)}])
    via_redis = (await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))).json()
    assert via_redis["state"] == "COMMITTED" and via_redis["items"] == ITEMS

    # Redis forgets the record (retention passed): GET answers from Postgres, every item.
    await redis.delete(keys.reservation(rid), keys.history(rid))
    r = await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))
    assert r.status_code == 200, r.text
    stored = r.json()
    assert stored["items"] == ITEMS and stored["resourceId"] == "room"
    assert stored["state"] == "COMMITTED" and stored["bookingId"] == via_redis["bookingId"]

    # The list reads Postgres: the same items; a one-resource reservation shows none.
    r = await client.get("/v1/reservations", headers=world.auth("p1"))
    assert r.status_code == 200, r.text
    listed = {row["reservationId"]: row for row in r.json()["data"]}
    assert listed[rid]["items"] == ITEMS and listed[rid]["resourceId"] == "room"
    assert "items" not in listed[single] and listed[single]["slotStartTime"] == at(720)

    # Replay: every item, every item's booking row, no drift.
    report = await parity.replay(svc.pool, svc.reservations.engine.get, rid)
    assert report["summary"]["drift"] == 0, report
    assert report["summary"]["bookingRows"] == 3
    assert [(i["resourceId"], i["slotStart"], i["slotEnd"])
            for i in report["summary"]["items"]] == [
        (i["resourceId"], _ms(i["slotStartTime"]), _ms(i["slotEndTime"])) for i in ITEMS]
    # `slotguard replay` prints the same, as a process on this schema and prefix.
    env = {**os.environ, "REDIS_URL": REDIS_URL, "DATABASE_URL": DATABASE_URL,
           "SLOTGUARD_KEY_PREFIX": svc.settings.key_prefix,
           "SLOTGUARD_DB_SCHEMA": svc.settings.db_schema,
           "SLOTGUARD_SHARDS": str(svc.settings.shards)}
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "slotguard", "replay", "--reservation-id", rid,
                         "--stdout", "--fail-on-drift"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["items"] == report["summary"]["items"]

    # Rehydration: Redis loses every marker; each item's come back from Postgres.
    held = [k for i in ITEMS for k in units(keys, i["resourceId"], _minutes(i))]
    await redis.delete(*held, keys.rehydrated())
    await rehydrate(svc.access, keys, svc.pool, svc.catalog.catalog, svc.settings)
    assert [await redis.get(k) for k in held] == [f"B|{rid}"] * len(held)

    # Reconciliation: the last item's markers lost while Redis runs on; they come back, and
    # the reservation's booking id is item 0's.
    last_item = units(keys, ITEMS[-1]["resourceId"], _minutes(ITEMS[-1]))
    await redis.delete(*last_item)
    rt = await Runtime.open(svc.settings)
    try:
        report = await reconcile(rt)
    finally:
        await rt.close()
    assert report.findings["booked_marker_missing"] == 1, report.as_dict()
    assert not report.escalated, report.as_dict()
    assert [await redis.get(k) for k in held] == [f"B|{rid}"] * len(held)

    # A forged drift on a later item: its booking row gone is found, per item.
    async with svc.pool.acquire() as conn:
        await conn.execute("DELETE FROM bookings WHERE reservation_id = $1 AND item = 1", rid)
    report = await parity.replay(svc.pool, svc.reservations.engine.get, rid)
    last = report["events"][-1]
    assert last["status"] == "missing" and last["details"]["bookingRows"] == {"item1": "absent"}


async def test_later_entries_keep_every_item_on_the_row(app, client, world, redis):
    """Later entries of a multi-resource reservation (here a cancel, in a batch of its own)
    keep every item on the row: the snapshot update takes `items` from the entry, which
    carries them all, never item 0's alone."""
    await setup(app)
    svc = app.state.services
    r = await client.post("/v1/reservations", json=multi_body(ITEMS), headers=world.auth("p1"))
    rid = r.json()["reservationId"]
    await drain(svc)
    assert await _row_items(svc, rid) == _postgres_items(ITEMS)
    r = await client.post(f"/v1/reservations/{rid}/cancel", headers=world.auth("p1"))
    assert r.status_code == 200, r.text
    await drain(svc)
    async with svc.pool.acquire() as conn:
        state = await conn.fetchval("SELECT state FROM reservations WHERE id = $1", rid)
    assert state == "CANCELLED"
    assert await _row_items(svc, rid) == _postgres_items(ITEMS)


async def test_migration_0014_backfills_one_item_per_reservation_and_every_booked_item(
        api_settings):
    """Rows written before 0014: a one-resource reservation gets its one item; a committed
    multi-resource one gets every item back from its booking rows."""
    settings = api_settings
    conn = await asyncpg.connect(DATABASE_URL)
    await conn.execute(f'CREATE SCHEMA "{settings.db_schema}"')
    backend = get_backend(db.yoyo_url(settings), migration_table=db.MIGRATION_TABLE)
    try:
        migrations = read_migrations(db.MIGRATIONS)
        with backend.lock():
            backend.apply_migrations(backend.to_apply(
                migrations.filter(lambda m: m.id < "0014")))
        await conn.execute(f'SET search_path TO "{settings.db_schema}"')
        t = [datetime.fromtimestamp((T0_MS + m * 60_000) / 1000, UTC) for m in range(0, 300)]
        await conn.execute("""
            INSERT INTO partners (id, name) VALUES ('p1', 'P1');
            INSERT INTO vendors (id) VALUES ('v');
            INSERT INTO resources (id, vendor_id, unit_minutes, buffer_before_minutes,
                                   buffer_after_minutes, shard_key)
            VALUES ('room', 'v', 15, 0, 15, 'v'), ('table', 'v', 15, 0, 0, 'v')""")
        for rid, (start, end, block_end) in {"rsv_one": (0, 30, 45),
                                             "rsv_multi": (60, 120, 135)}.items():
            await conn.execute(
                """INSERT INTO reservations (id, partner_id, vendor_id, resource_id,
                       requester_id, slot_start, slot_end, block_start, block_end, state,
                       version, created_at, updated_at, booking_id)
                   VALUES ($1, 'p1', 'v', 'room', 'r', $2, $3, $2, $4, 'COMMITTED', 5, $2,
                           $2, 'bkg_' || substr($1, 5))""",
                rid, t[start], t[end], t[block_end])
        for item, (resource, start, end, block_end) in enumerate(
                [("room", 60, 120, 135), ("table", 150, 180, 180)]):
            await conn.execute(
                """INSERT INTO bookings (id, reservation_id, resource_key, resource_id,
                       vendor_id, partner_id, requester_id, slot_start, slot_end,
                       block_start, block_end, item)
                   SELECT $1, 'rsv_multi', key, id, 'v', 'p1', 'r', $3, $4, $3, $5, $6
                   FROM resources WHERE id = $2""",
                "bkg_multi" + (f".{item}" if item else ""), resource, t[start], t[end],
                t[block_end], item)
        # 0014 first (later migrations, if any, follow it)
        assert (await asyncio.to_thread(db.migrate, settings))[:1] == ["0014_reservation_items"]
        rows = {r["id"]: db.json_value(r["items"]) for r in await conn.fetch(
            "SELECT id, items FROM reservations")}
        ms = [T0_MS + m * 60_000 for m in range(0, 300)]
        assert rows == {
            "rsv_one": [{"resourceId": "room", "slotStart": ms[0], "slotEnd": ms[30],
                         "blockStart": ms[0], "blockEnd": ms[45]}],
            "rsv_multi": [{"resourceId": "room", "slotStart": ms[60], "slotEnd": ms[120],
                           "blockStart": ms[60], "blockEnd": ms[135]},
                          {"resourceId": "table", "slotStart": ms[150], "slotEnd": ms[180],
                           "blockStart": ms[150], "blockEnd": ms[180]}]}
        # NOT NULL from now on: a row without items is refused.
        try:
            await conn.execute("UPDATE reservations SET items = NULL WHERE id = 'rsv_one'")
            raise AssertionError("a reservation row without items was accepted")
        except asyncpg.NotNullViolationError:
            pass
    finally:
        backend.connection.close()
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
        await conn.close()
