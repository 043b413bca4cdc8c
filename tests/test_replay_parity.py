"""Replay and parity (issue 17) against real stores: reservations made through a live API,
drained by a real worker into Postgres; drift forged by editing a Postgres row (or the
Redis record) in the test; ``slotguard replay`` / ``slotguard parity`` as processes."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from engine import db, metrics, parity
from engine.access import RedisAccess
from engine.keys import KeySpace
from engine.reservations import ReservationEngine
from engine.resources import ResourceCatalog
from slotguard.client import Client
from tests import live_server
from tests.conftest import REDIS_URL
from tests.test_api_fixtures import at
from tests.timing import eventually

CLI = [sys.executable, "-m", "slotguard"]
_next = iter(range(10, 10_000, 4))


@pytest.fixture
def live():
    api = live_server.start(workers=1, SLOTGUARD_PARITY_INTERVAL_S="0")
    yield api
    live_server.stop(api)


@pytest.fixture
async def stores(live):
    """(pool, Redis reader, raw Redis) on the live stack's schema and prefix."""
    pool = await db.create_pool(live.settings, min_size=1, max_size=4)
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    access = RedisAccess(client)
    await access.load_scripts()
    engine = ReservationEngine(access, KeySpace(live.settings.key_prefix,
                                                live.settings.shards),
                               ResourceCatalog([]), live.settings)
    yield pool, engine.get, client
    await access.close()
    await client.aclose()
    await pool.close()


def slot() -> tuple[str, str]:
    start = next(_next) * 60
    return at(start), at(start + 30)


def committed(live) -> str:
    """A reservation walked to COMMIT_IN_PROGRESS (v-instant: instant, free)."""
    with Client(live.url, live.key("p1")) as sg:
        start, end = slot()
        made = sg.create_reservation(vendor_id="v-instant", slot_start_time=start,
                                     slot_end_time=end, requester_id="r")
        sg.commit(made.reservation_id)
        return made.reservation_id


def cancelled(live) -> str:
    with Client(live.url, live.key("p1")) as sg:
        start, end = slot()
        made = sg.create_reservation(vendor_id="v-confirm", slot_start_time=start,
                                     slot_end_time=end, requester_id="r")
        sg.with_key(live.key("vendor")).vendor_confirmation(made.reservation_id)
        sg.cancel(made.reservation_id, reason="changed my mind")
        return made.reservation_id


async def settled(stores, rid: str, state: str) -> dict:
    """The replay once the worker drained every event (the audit's newest is ``state``)."""
    pool, read, _ = stores
    found = {}

    async def done() -> bool:
        found["report"] = await parity.replay(pool, read, rid)
        return found["report"] is not None and \
            found["report"]["summary"]["rebuiltState"] == state and \
            found["report"]["summary"]["drift"] == 0

    await eventually(done, timeout_s=90, what=f"{rid} drained and matching")
    return found["report"]


def replay_cli(live, rid: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "replay", "--reservation-id", rid, *extra], env=live.env,
                          capture_output=True, text=True, timeout=120)


async def test_clean_reservations_match_on_every_event(live, stores):
    rid, other = committed(live), cancelled(live)
    report = await settled(stores, rid, "COMMITTED")
    assert report["summary"]["bookingRow"] and report["summary"]["reservationRow"]
    assert report["summary"]["auditRows"] == report["summary"]["historyRows"] >= 3
    assert {e["status"] for e in report["events"]} == {"match"}
    assert [e["eventId"] for e in report["events"]] == \
        [f"{rid}:{v}" for v in range(1, len(report["events"]) + 1)]
    await settled(stores, other, "CANCELLED")
    # The command prints the same report, as the issue states it.
    proc = replay_cli(live, rid, "--stdout", "--fail-on-drift")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert set(printed) == {"reservationId", "events", "summary"}
    assert printed["reservationId"] == rid and printed["summary"]["drift"] == 0
    assert all(set(e) == {"eventId", "status", "details"} for e in printed["events"])
    out = Path(tempfile.mkdtemp(prefix="slotguard-replay-")) / "r.json"
    proc = replay_cli(live, other, "--output", str(out))
    assert proc.returncode == 0 and str(out) in proc.stdout
    assert json.loads(out.read_text())["summary"]["rebuiltState"] == "CANCELLED"


async def test_forged_postgres_drift_is_found_per_event(live, stores):
    pool, read, redis = stores
    rid = committed(live)
    report = await settled(stores, rid, "COMMITTED")
    last = len(report["events"])
    conn = await asyncpg.connect(live.settings.database_url,
                                 server_settings={"search_path": live.settings.db_schema})
    try:
        # The reservation row says CANCELLED although the audit says COMMITTED.
        await conn.execute("UPDATE reservations SET state = 'CANCELLED' WHERE id = $1", rid)
        forged = await parity.replay(pool, read, rid)
        newest = forged["events"][-1]
        assert newest["status"] == "diff"
        assert newest["details"]["reservationRow"]["state"] == {"audit": "COMMITTED",
                                                                "found": "CANCELLED"}
        assert [e["status"] for e in forged["events"][:-1]] == ["match"] * (last - 1)
        proc = replay_cli(live, rid, "--stdout", "--fail-on-drift")
        assert proc.returncode == 3 and json.loads(proc.stdout)["summary"]["diff"] == 1
        # A history row edited, one deleted, one invented.
        await conn.execute("UPDATE reservation_history SET triggered_by = 'ops' "
                           "WHERE event_id = $1", f"{rid}:1")
        await conn.execute("DELETE FROM reservation_history WHERE event_id = $1", f"{rid}:2")
        await conn.execute(
            "INSERT INTO reservation_history (event_id, reservation_id, from_state, to_state, "
            "triggered_by, version, at) VALUES ($1, $2, 'COMMITTED', 'CANCELLED', 'ops', $3, "
            "now())", f"{rid}:{last + 1}", rid, last + 1)
        # The booking row cancelled behind the audit's back.
        await conn.execute("UPDATE bookings SET cancelled_at = now() WHERE reservation_id = $1",
                           rid)
    finally:
        await conn.close()
    forged = await parity.replay(pool, read, rid)
    by_id = {e["eventId"]: e for e in forged["events"]}
    assert by_id[f"{rid}:1"]["status"] == "diff"
    assert by_id[f"{rid}:1"]["details"]["historyRow"]["triggeredBy"]["found"] == "ops"
    assert by_id[f"{rid}:2"]["status"] == "missing"
    assert by_id[f"{rid}:{last}"]["status"] == "missing"
    assert by_id[f"{rid}:{last}"]["details"]["bookingRow"] == "cancelled"
    assert by_id[f"{rid}:{last + 1}"]["status"] == "extra"
    assert by_id[f"{rid}:{last + 1}"]["details"]["historyRow"] is True
    assert forged["summary"]["extra"] == 1 and forged["summary"]["drift"] >= 4


async def test_forged_redis_record_is_found(live, stores):
    pool, read, redis = stores
    rid = cancelled(live)
    await settled(stores, rid, "CANCELLED")
    key = KeySpace(live.settings.key_prefix, live.settings.shards).reservation(rid)
    assert await redis.hget(key, "st") == "CANCELLED"
    await redis.hset(key, "rs", "v-confirm-room2")
    forged = await parity.replay(pool, read, rid)
    moved = forged["events"][-1]["details"]["redisRecord"]["resourceId"]
    assert moved["found"] == "v-confirm-room2" and moved["audit"] != "v-confirm-room2"
    assert forged["events"][-1]["status"] == "diff"


async def test_parity_counts_drift_exports_it_and_refuses_bad_input(live, stores):
    pool, read, _ = stores
    clean, drifting = committed(live), cancelled(live)
    await settled(stores, clean, "COMMITTED")
    await settled(stores, drifting, "CANCELLED")
    textfile = Path(tempfile.mkdtemp(prefix="slotguard-parity-")) / "parity.prom"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, "parity", *args], env=live.env, capture_output=True,
                              text=True, timeout=180)

    proc = run("--settle-s", "0", "--fail-on-drift", "--textfile", str(textfile))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["reservations"] == 2 and summary["drift"] == 0
    assert 'slotguard_parity_drift_events{status="diff"} 0' in textfile.read_text()
    conn = await asyncpg.connect(live.settings.database_url,
                                 server_settings={"search_path": live.settings.db_schema})
    try:
        await conn.execute("UPDATE reservations SET failure_reason = 'forged' WHERE id = $1",
                           drifting)
    finally:
        await conn.close()
    proc = run("--settle-s", "0", "--fail-on-drift", "--textfile", str(textfile),
               "--since", "7d")
    assert proc.returncode == 3, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["drifted"] == 1 and summary["events"]["diff"] == 1
    assert [d["reservationId"] for d in summary["driftedReservations"]] == [drifting]
    assert 'slotguard_parity_drift_events{status="diff"} 1' in textfile.read_text()
    # Recently changed reservations are skipped while they settle.
    assert json.loads(run("--settle-s", "86400").stdout)["reservations"] == 0
    # The worker's cron job publishes the same counts on the worker's registry.
    from engine.runtime import Runtime
    from jobs.parity import parity_job

    rt = await Runtime.open(live.settings.replace(parity_window_s=86_400, parity_settle_s=0))
    try:
        result = await parity_job({"rt": rt})
    finally:
        await rt.close()
    assert result["events"]["diff"] == 1
    assert metrics.PARITY_DRIFT_EVENTS.labels(status="diff")._value.get() == 1
    # Bad input: one line, a non-zero exit, nothing written.
    for bad in (["--since", "yesterday-ish"], ["--settle-s", "-1"]):
        proc = run(*bad)
        assert proc.returncode == 2 and proc.stdout == "", proc
    unknown = replay_cli(live, "rsv_0_doesnotexist", "--stdout")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert "rsv_0_doesnotexist is unknown" in unknown.stderr
    missing = subprocess.run([*CLI, "replay"], env=live.env, capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2
