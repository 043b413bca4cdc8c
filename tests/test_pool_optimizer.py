"""The assignment optimizer (issue 16, pool) against real Redis and Postgres: a fragmented
day is packed, a dry run (the CLI) changes nothing, an applied plan moves holds with the
modify script (reason `optimizer` in the stream and the audit log), the bench verifier finds
nothing wrong afterwards, and a gain not over the threshold moves nothing."""

from __future__ import annotations

import asyncio
from datetime import date

import asyncpg

from benchmarks.verifier import verify
from engine import directory
from engine.optimizer import fragments, optimize
from slotguard.cli import main
from tests.conftest import DATABASE_URL
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    api_settings,
    app,
    at,
    client,
    create_body,
    migrated,
    world,
)
from tests.test_modify import drain, state_of

ROOMS = ["room-1", "room-2", "room-3"]
DAY = date(2030, 1, 1)  # T0 is 2030-01-01T09:00Z; v-instant's zone is UTC


async def fragmented_day(app, client, world) -> list[str]:
    """One one-hour hold on each room at 10:00, 12:00 and 14:00: six fragments."""
    async with app.state.services.pool.acquire() as conn:
        for name in ROOMS:
            await directory.create_resource(conn, name, "v-instant")
    r = await client.post("/v1/vendors/v-instant/resource-groups",
                          json={"groupId": "g", "resourceIds": ROOMS, "strategy": "first_fit"},
                          headers=world.auth("admin"))
    assert r.status_code == 201
    ids = []
    for room, start in zip(ROOMS, (60, 180, 300)):
        r = await client.post("/v1/reservations",
                              json=create_body("v-instant", start, 60, resourceId=room),
                              headers=world.auth("p1"))
        assert r.status_code == 201, r.text
        ids.append(r.json()["reservationId"])
    return ids


class Rt:
    """The parts of a Runtime the optimizer uses, from the running app."""

    def __init__(self, app) -> None:
        svc = app.state.services
        self.keys, self.redis, self.access, self.pool = (svc.keyspace, svc.redis, svc.access,
                                                         svc.pool)
        self.reservations = svc.reservations.engine
        self.groups = svc.extra["groups"]

    async def refresh_catalog(self) -> None:
        pass


def test_fragments_counts_free_runs_that_do_not_span_the_day():
    assert fragments([False] * 8) == 0
    assert fragments([True] * 8) == 0
    assert fragments([False, True, False, False, True, True, False, False]) == 3
    assert fragments([True, False, True]) == 1


async def test_dry_run_prints_the_plan_and_changes_nothing(app, client, world, redis,
                                                          monkeypatch, capsys):
    svc = app.state.services
    ids = await fragmented_day(app, client, world)
    before = await state_of(redis, svc.settings.key_prefix)
    s = svc.settings
    for name, value in (("REDIS_URL", s.redis_url), ("DATABASE_URL", s.database_url),
                        ("SLOTGUARD_KEY_PREFIX", s.key_prefix),
                        ("SLOTGUARD_DB_SCHEMA", s.db_schema),
                        ("SLOTGUARD_SHARDS", str(s.shards))):
        monkeypatch.setenv(name, value)
    code = await asyncio.to_thread(main, ["optimize", "--vendor", "v-instant",
                                          "--date", "2030-01-01"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "group g: fragmentation 6 -> 4 (gain 33.3 %), 2 move(s)" in out
    assert f"{ids[1]}: room-2 -> room-1" in out and f"{ids[2]}: room-3 -> room-1" in out
    assert await state_of(redis, svc.settings.key_prefix) == before


async def test_apply_packs_the_day_through_the_modify_script(app, client, world, redis):
    svc = app.state.services
    ids = await fragmented_day(app, client, world)
    rt = Rt(app)
    plans = await optimize(rt, rt.groups, "v-instant", DAY, apply=True, min_gain_percent=10)
    (plan,) = plans
    assert (plan.before, plan.after) == (6, 4)
    assert sorted(plan.applied) == sorted(ids[1:]) and plan.skipped == []
    keys = svc.keyspace
    for rid in ids:
        assert await redis.hget(keys.reservation(rid), "rs") == "room-1"
    entries = await redis.xrange(keys.events(keys.shard_of("v-instant")))
    moves = [f for _, f in entries if f.get("reason") == "optimizer"]
    assert sorted(f["reservationId"] for f in moves) == sorted(ids[1:])
    assert all(f["movedToResourceId"] == "room-1" for f in moves)
    await drain(svc)
    async with svc.pool.acquire() as conn:
        audited = await conn.fetch(
            "SELECT reservation_id, metadata FROM audit_log WHERE metadata->>'reason' = "
            "'optimizer'")
    assert sorted(r["reservation_id"] for r in audited) == sorted(ids[1:])
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'SET search_path TO "{svc.settings.db_schema}"')
        report = await verify(redis, keys, conn, [])
    finally:
        await conn.close()
    assert report.violations == [] and report.checked["reservations"] == 3
    # Packed now: planning again finds nothing to gain.
    (again,) = await optimize(rt, rt.groups, "v-instant", DAY, apply=True,
                              min_gain_percent=10)
    assert again.moves == [] and again.before == again.after == 4


async def test_a_gain_not_over_the_threshold_moves_nothing(app, client, world, redis):
    svc = app.state.services
    await fragmented_day(app, client, world)
    before = await state_of(redis, svc.settings.key_prefix)
    rt = Rt(app)
    (plan,) = await optimize(rt, rt.groups, "v-instant", DAY, apply=True,
                             min_gain_percent=40)
    assert len(plan.moves) == 2 and plan.applied == [] and "not over 40" in plan.note
    assert await state_of(redis, svc.settings.key_prefix) == before
