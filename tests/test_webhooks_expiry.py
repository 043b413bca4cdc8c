"""Expiry as an event (issue 14): several reapers race over the same overdue reservations;
each reservation's expiry (or vendor timeout) is recorded once and reaches each endpoint
once, with the deadline it expired at."""

from __future__ import annotations

import asyncio

import pytest

from engine.runtime import Runtime
from engine.settings import Settings
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    app,
    client,
    create_body,
    migrated,
    world,
)
from tests.test_webhooks_delivery import register, settled
from tests.timing import eventually, until_server_ms
from tests.webhook_fixtures import Loops, receiver  # noqa: F401  (fixtures)
from engine.times import parse_time


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.replace(partner_rate_burst=2_000, ip_rate_burst=4_000,
                            partner_rate_per_minute=600_000, ip_rate_per_minute=1_200_000,
                            webhook_allow_private=True, webhook_retry_schedule_s="0.2,0.5,1",
                            webhook_timeout_ms=2_000, webhook_poll_ms=50,
                            drain_block_ms=100, hold_ttl_ms=1_500,
                            confirmed_ttl_ms=1_500, authorized_ttl_ms=1_500)


async def test_racing_reapers_emit_one_expired_event_each(app, client, world, receiver,
                                                           migrated, redis):
    ids = {name: await register(client, world, receiver, key, name,
                                ["reservation.expired", "reservation.failed"])
           for key, name in (("p1", "p1"), ("vendor-instant", "vendor"), ("ops", "ops"))}
    created = {}
    for i in range(6):
        for vendor in ("v-instant", "v-confirm"):
            r = await client.post("/v1/reservations", json=create_body(vendor, start=60 * i),
                                  headers=world.auth("p1"))
            assert r.status_code == 201, r.text
            created[r.json()["reservationId"]] = (vendor, parse_time(r.json()["expiresAt"], "expiresAt"))
    await until_server_ms(redis, max(deadline for _, deadline in created.values()) + 1)

    # Four reapers of their own (separate connections), each over every shard, at once.
    runtimes = [await Runtime.open(migrated) for _ in range(4)]
    try:
        moved = await asyncio.gather(*(rt.reservations.reap(shard) for rt in runtimes
                                       for shard in range(migrated.shards)))
    finally:
        for rt in runtimes:
            await rt.close()
    reaped = [m.reservation_id for batch in moved for m in batch]
    assert sorted(reaped) == sorted(created)  # each applied by exactly one reaper

    loops = Loops(app, migrated)
    try:
        p1 = await settled(client, world, "p1", ids["p1"], 12)
        vendor = await settled(client, world, "vendor-instant", ids["vendor"], 6)
        ops = await settled(client, world, "ops", ids["ops"], 12)
    finally:
        await loops.close()
    expected = {rid: ("reservation.expired" if v == "v-instant" else "reservation.failed")
                for rid, (v, _) in created.items()}
    for found in (p1, ops):
        assert sorted((d["reservationId"], d["type"]) for d in found) == sorted(
            expected.items())
    assert {d["reservationId"] for d in vendor} == {
        rid for rid, (v, _) in created.items() if v == "v-instant"}
    for name in ("p1", "ops", "vendor"):
        got = [g.event for g in receiver.of(name)]
        assert len(got) == len({(e["data"]["reservationId"], e["type"]) for e in got})
        for event in got:
            data = event["data"]
            vendor_id, deadline = created[data["reservationId"]]
            assert data["state"] == ("EXPIRED" if vendor_id == "v-instant"
                                     else "FAILED_VENDOR_TIMEOUT")
            assert data["triggeredBy"] == "timeout"
            # expired at (never before) its deadline
            assert parse_time(data["occurredAt"], "occurredAt") >= deadline


async def test_reap_batch_answers_the_next_deadline_and_its_limit(app, client, world, migrated,
                                                                  redis):
    """The reaper's call expires what is due and says when to look again: the shard's
    next deadline (so the reaper sleeps until then), and ``more`` when its limit left due
    reservations behind."""
    created = []
    for i in range(3):  # one resource: one shard
        r = await client.post("/v1/reservations", json=create_body("v-instant", start=60 * i),
                              headers=world.auth("p1"))
        assert r.status_code == 201, r.text
        created.append((r.json()["reservationId"], parse_time(r.json()["expiresAt"],
                                                              "expiresAt")))
    runtime = await Runtime.open(migrated)
    try:
        shard = runtime.keys.shard_of_id(created[0][0])
        assert {runtime.keys.shard_of_id(rid) for rid, _ in created} == {shard}
        early = await runtime.reservations.reap_batch(shard, limit=2)
        if early.now_ms < created[0][1]:  # nothing due yet: the next deadline is the first
            assert early.moved == [] and not early.more
            assert early.next_deadline_ms == created[0][1]
        await until_server_ms(redis, max(deadline for _, deadline in created) + 1)
        first = await runtime.reservations.reap_batch(shard, limit=2)
        assert len(first.moved) == 2 and first.more
        second = await runtime.reservations.reap_batch(shard, limit=2)
        assert len(second.moved) == 1 and not second.more
        assert second.next_deadline_ms is None
        assert sorted(m.reservation_id for m in first.moved + second.moved) == sorted(
            rid for rid, _ in created)
        assert {m.state.value for m in first.moved + second.moved} == {"EXPIRED"}
        assert [m.deadline_ms for m in first.moved + second.moved] == [
            deadline for _, deadline in created]
        again = await runtime.reservations.reap_batch(shard, limit=2)
        assert again.moved == [] and not again.more
    finally:
        await runtime.close()


async def test_reaper_tasks_racing_expire_each_reservation_once(app, client, world, migrated,
                                                               redis):
    """Two of the worker's reaper loops (jobs/reaper.py), each with its own connections and
    a small limit, run while holds lapse: every hold is expired by them, by itself (no
    call), and exactly once over both (one EXPIRED history step each)."""
    from jobs.metrics import WorkerMetrics
    from jobs.reaper import Reaper

    created = {}
    for i in range(8):
        r = await client.post("/v1/reservations", json=create_body("v-instant", start=60 * i),
                              headers=world.auth("p1"))
        assert r.status_code == 201, r.text
        created[r.json()["reservationId"]] = parse_time(r.json()["expiresAt"], "expiresAt")
    runtimes = [await Runtime.open(migrated) for _ in range(2)]
    lags_before = expiry_lags()
    reapers = [Reaper(rt.reservations, rt.keys.shards, interval_ms=1_000, limit=3,
                      metrics=WorkerMetrics()) for rt in runtimes]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(reaper.run(stop)) for reaper in reapers]
    try:
        async def all_expired() -> bool:
            states = [(await client.get(f"/v1/reservations/{rid}",
                                        headers=world.auth("p1"))).json()["state"]
                      for rid in created]
            return states == ["EXPIRED"] * len(created)

        await eventually(all_expired, timeout_s=60)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for rt in runtimes:
            await rt.close()
    assert sum(reaper.expired for reaper in reapers) == len(created)
    assert expiry_lags() - lags_before == len(created)  # the lag histogram, once each
    for rid, deadline in created.items():
        body = (await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))).json()
        steps = [h for h in body["stateHistory"] if h["toState"] == "EXPIRED"]
        assert len(steps) == 1 and steps[0]["triggeredBy"] == "timeout"
        assert parse_time(steps[0]["timestamp"], "timestamp") >= deadline


def expiry_lags() -> float:
    """Observations of slotguard_expiry_lag_seconds in this process so far."""
    from engine import metrics

    [family] = metrics.EXPIRY_LAG_SECONDS.collect()
    return next(sample.value for sample in family.samples if sample.name.endswith("_count"))
