"""The commit queue with real worker processes, real Redis and real Postgres: walks to
COMMITTED, a kill -9 mid-batch, a Redis that loses its data, a forced exclusion violation."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from engine.db import migrate
from engine.directory import create_vendor
from engine.errors import HoldConflict, NotReady
from engine.lifecycle import State
from engine.runtime import Runtime
from engine.settings import Settings
from jobs.commit_queue import GROUP, CommitQueue
from jobs.reconcile import reconcile
from tests.conftest import DATABASE_URL
from tests.test_db import drop_schema

T0 = 1_893_456_000_000
UNIT = 15 * 60_000


@pytest.fixture
def worker_settings(settings: Settings) -> Settings:
    return settings.replace(reclaim_idle_ms=1_000, drain_block_ms=100, drain_batch_size=200,
                            partner_max_live_holds=0,
                            reaper_interval_ms=1_000)


async def open_stack(settings: Settings) -> Runtime:
    await asyncio.to_thread(migrate, settings)
    pool = await asyncpg.connect(settings.database_url,
                                 server_settings={"search_path": settings.db_schema})
    try:
        await create_vendor(pool, "inst", confirmation_required=False)
    finally:
        await pool.close()
    rt = await Runtime.open(settings)
    await rt.rehydrate_if_needed()
    return rt


@pytest.fixture
async def stack(worker_settings, redis):
    rt = await open_stack(worker_settings)
    yield rt
    await rt.close()
    await drop_schema(worker_settings.db_schema)


def worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "SLOTGUARD_MAX_DELIVERIES": str(settings.max_deliveries),
        "SLOTGUARD_DRAIN_RETRY_BASE_MS": str(settings.drain_retry_base_ms),
        "SLOTGUARD_DRAIN_RETRY_MAX_MS": str(settings.drain_retry_max_ms),
        "SLOTGUARD_PARTNER_MAX_LIVE_HOLDS": str(settings.partner_max_live_holds),
        "REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url,
        "SLOTGUARD_KEY_PREFIX": settings.key_prefix, "SLOTGUARD_DB_SCHEMA": settings.db_schema,
        "SLOTGUARD_SHARDS": str(settings.shards),
        "SLOTGUARD_RECLAIM_IDLE_MS": str(settings.reclaim_idle_ms),
        "SLOTGUARD_DRAIN_BLOCK_MS": str(settings.drain_block_ms),
        "SLOTGUARD_DRAIN_BATCH_SIZE": str(settings.drain_batch_size),
    })
    return env


def start_worker(settings: Settings, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs"], env=worker_env(settings),
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def commit_many(rt: Runtime, n: int, offset: int = 0) -> list[str]:
    async def one(i: int) -> str:
        start = T0 + (offset + i) * 2 * UNIT
        moved = await rt.reservations.create(partner_id="p1", vendor_id="inst",
                                             resource_id=None, start_ms=start,
                                             end_ms=start + UNIT, requester_id=f"r{i}")
        assert moved.state == State.AUTHORIZED_BOTH
        moved = await rt.reservations.act(moved.reservation_id, "commit", actor="partner")
        assert moved.state == State.COMMIT_IN_PROGRESS
        return moved.reservation_id
    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def states(rt: Runtime, ids: list[str]) -> list[State]:
    return [r.state for r in await asyncio.gather(*(rt.reservations.get(i) for i in ids))]


async def streams_drained(rt: Runtime) -> bool:
    for shard in range(rt.keys.shards):
        stream = rt.keys.events(shard)
        if await rt.redis.xlen(stream):
            return False
        if (await rt.redis.xpending(stream, GROUP))["pending"]:
            return False
    return True


async def assert_record_complete(rt: Runtime, ids: list[str]) -> None:
    """Bookings = committed reservations; one audit and history row per transition."""
    views = await asyncio.gather(*(rt.reservations.get(i) for i in ids))
    assert all(v.state == State.COMMITTED for v in views)
    expected_events = sum(v.version for v in views)
    async with rt.pool.acquire() as conn:
        bookings = await conn.fetch("SELECT reservation_id, id FROM bookings")
        audit = await conn.fetchval("SELECT count(*) FROM audit_log")
        history = await conn.fetchval("SELECT count(*) FROM reservation_history")
        distinct = await conn.fetchval("SELECT count(DISTINCT event_id) FROM audit_log")
    assert sorted(b[0] for b in bookings) == sorted(ids)
    assert {v.reservation_id: v.booking_id for v in views} == {b[0]: b[1] for b in bookings}
    assert audit == history == distinct == expected_events


async def test_reservations_walk_to_committed_with_workers(stack, worker_settings, tmp_path):
    rt = stack
    workers = [start_worker(worker_settings, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        ids = await commit_many(rt, 150)
        await wait_for(lambda: _all_committed(rt, ids), 60, "every reservation COMMITTED")
        await wait_for(lambda: streams_drained(rt), 30, "streams drained")
        await wait_for(lambda: _audit_complete(rt, ids), 30, "audit rows")
        await assert_record_complete(rt, ids)
        # The worker's commits freed the partner's cap slots and count toward reputation.
        assert await rt.limits.live_holds("p1") == 0
        assert await rt.limits.reputation("p1") == {"placed": 150, "committed": 150,
                                                    "ratio": 1.0}
        # Both are up before they are stopped (on a loaded machine one may still be
        # importing when the other has done all the work: a SIGTERM then finds no handler).
        for i in range(2):
            await wait_for(lambda i=i: _started(tmp_path / f"w{i}.log"), 120,
                           f"worker {i} started")
    finally:
        for w in workers:
            stop_worker(w)
    for w in workers:
        assert w.returncode == 0, (tmp_path / "w0.log").read_text()[-3000:]


async def _started(log: Path) -> bool:
    return log.exists() and "Starting worker" in log.read_text(errors="replace")


async def _all_committed(rt, ids) -> bool:
    return all(s == State.COMMITTED for s in await states(rt, ids))


async def _audit_complete(rt, ids) -> bool:
    views = await asyncio.gather(*(rt.reservations.get(i) for i in ids))
    async with rt.pool.acquire() as conn:
        return await conn.fetchval("SELECT count(*) FROM audit_log") == sum(v.version
                                                                            for v in views)


async def test_kill_9_mid_batch_then_a_new_worker_finishes_exactly_once(stack, worker_settings,
                                                                       tmp_path):
    rt = stack
    ids = await commit_many(rt, 1200)  # a backlog: the kill lands while batches are running
    first = start_worker(worker_settings, tmp_path / "first.log")

    async def some_booked():
        async with rt.pool.acquire() as conn:
            return await conn.fetchval("SELECT count(*) FROM bookings")

    try:
        booked_at_kill = await wait_for(some_booked, 60, "the first bookings")
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        stop_worker(first)
    async with rt.pool.acquire() as conn:
        booked_at_kill = await conn.fetchval("SELECT count(*) FROM bookings")
    assert 0 < booked_at_kill < len(ids), "the kill must land in the middle of the drain"
    second = start_worker(worker_settings, tmp_path / "second.log")
    try:
        await wait_for(lambda: _all_committed(rt, ids), 90, "every reservation COMMITTED")
        await wait_for(lambda: streams_drained(rt), 30, "nothing pending after reclaim")
        await wait_for(lambda: _audit_complete(rt, ids), 30, "audit rows")
        await assert_record_complete(rt, ids)
    finally:
        stop_worker(second)


async def test_forced_exclusion_violation_fails_the_reservation(stack, worker_settings):
    rt = stack
    # Postgres knows a booking that Redis does not (drift): insert it behind Redis's back.
    async with rt.pool.acquire() as conn:
        await conn.execute(
            """INSERT INTO bookings (id, reservation_id, resource_key, resource_id, vendor_id,
                   partner_id, requester_id, slot_start, slot_end, block_start, block_end)
               SELECT 'bkg_manual', 'rsv_manual', key, id, vendor_id, 'p0', 'r0',
                      to_timestamp($1 / 1000.0), to_timestamp($2 / 1000.0),
                      to_timestamp($1 / 1000.0), to_timestamp($2 / 1000.0)
               FROM resources WHERE id = 'inst'""", T0, T0 + UNIT)
    queue = CommitQueue(rt.access, rt.keys, rt.pool, rt.reservations, worker_settings, "t")
    await queue.ensure_groups()
    [rid] = await commit_many(rt, 1)
    for _ in range(3):
        for shard in range(rt.keys.shards):
            await queue.drain_shard_once(shard)
    view = await rt.reservations.get(rid)
    assert view.state == State.FAILED_AVAILABILITY_CHANGED
    assert view.history[-1]["metadata"] == {"conflictingBookingId": "bkg_manual"}
    async with rt.pool.acquire() as conn:
        actions = [r[0] for r in await conn.fetch(
            "SELECT action FROM audit_log WHERE reservation_id = $1 ORDER BY id", rid)]
        assert await conn.fetchval("SELECT count(*) FROM bookings WHERE reservation_id = $1",
                                   rid) == 0
    assert actions[-1] == "reservation.failed_availability_changed"
    assert await rt.redis.get(rt.keys.unit("inst", T0 // UNIT)) is None  # units freed


@pytest.fixture
def private_redis(tmp_path):
    """A Redis of this test's own (it will be shut down without saving)."""
    import shutil
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    procs = []

    def start():
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("private redis did not start")

    start()
    yield f"redis://127.0.0.1:{port}/0", start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


async def test_redis_restart_without_data_is_rehydrated_before_new_holds(worker_settings,
                                                                         private_redis):
    url, restart = private_redis
    settings = worker_settings.replace(redis_url=url)
    rt = await open_stack(settings)
    try:
        ids = await commit_many(rt, 5)
        queue = CommitQueue(rt.access, rt.keys, rt.pool, rt.reservations, settings, "t")
        await queue.ensure_groups()
        for _ in range(3):
            for shard in range(rt.keys.shards):
                await queue.drain_shard_once(shard)
        assert await states(rt, ids) == [State.COMMITTED] * 5
        try:
            await rt.redis.shutdown(nosave=True)
        except Exception:
            pass  # the connection drops with the server
        restart()

        # Every marker, reservation and flag is gone: no hold is accepted on any shard.
        with pytest.raises(NotReady):
            await commit_many(rt, 1)
        # Reconciliation sees the drift (bookings without markers) and repairs it.
        report = await reconcile(rt)
        assert report.findings["booked_marker_missing"] == 5
        assert report.fixes["booked_marker_missing"] == 5
        assert (await reconcile(rt)).findings["booked_marker_missing"] == 0
        # The worker's Redis watch rehydrates; then holds are accepted, but not on bookings.
        assert (await rt.rehydrate_if_needed()).bookings == 5
        with pytest.raises(HoldConflict) as caught:
            await commit_many(rt, 1)
        assert caught.value.booked
        await commit_many(rt, 1, offset=100)
    finally:
        await rt.close()
        await drop_schema(settings.db_schema)


async def test_malformed_and_poison_entries_are_dead_lettered_alone(stack, worker_settings):
    """Read over the raw connection: a malformed entry is dead-lettered at once; one that
    Postgres refuses (jsonb has no \\u0000) is found by bisecting its batch and
    dead-lettered alone, at its first delivery; each gets a manual_review case."""
    from tests.test_db_events import event

    rt = stack
    settings = worker_settings.replace(max_deliveries=2, reclaim_idle_ms=100)
    queue = CommitQueue(rt.access, rt.keys, rt.pool, rt.reservations, settings, "t")
    await queue.ensure_groups()
    stream, dead = rt.keys.events(0), rt.keys.dead_letters(0)
    try:
        await rt.redis.xadd(stream, {**event("rsv_0_bad", 1, "INTENT_CREATED"),
                                     "toState": "TELEPORTED"})
        assert await queue.drain_shard_once(0) == 1
        [(_, fields)] = await rt.redis.xrange(dead)
        assert fields["toState"] == "TELEPORTED" and "unknown state" in fields["deadReason"]
        assert await streams_drained(rt)

        # Valid to Python, refused by Postgres: the batch is bisected, the rest commits.
        good = event("rsv_0_good", 1, "INTENT_CREATED", resource="inst")
        poison = event("rsv_0_poison", 1, "INTENT_CREATED", metadata='{"x": "\\u0000"}')
        for fields in (good, poison, event("rsv_0_good", 2, "HELD", resource="inst",
                                           from_state="INTENT_CREATED")):
            await rt.redis.xadd(stream, fields)
        assert await queue.drain_shard_once(0) == 3
        assert await streams_drained(rt)
        assert [f["eventId"] for _, f in await rt.redis.xrange(dead)] == [
            "rsv_0_bad:1", "rsv_0_poison:1"]
        async with rt.pool.acquire() as conn:
            rows = await conn.fetch("SELECT fields, deliveries, error FROM dead_letters "
                                    "ORDER BY id")
            audited = [r[0] for r in await conn.fetch(
                "SELECT event_id FROM audit_log ORDER BY event_id")]
            cases = await conn.fetch("SELECT kind, reservation_id, details FROM manual_review "
                                     "ORDER BY id")
        assert [(r["fields"]["eventId"], r["deliveries"]) for r in rows] == [
            ("rsv_0_bad:1", 1), ("rsv_0_poison:1", 1)]
        assert "UntranslatableCharacter" in rows[1]["error"]
        assert audited == ["rsv_0_good:1", "rsv_0_good:2"]
        assert [(c["kind"], c["reservation_id"]) for c in cases] == [
            ("dead_letter", "rsv_0_bad"), ("dead_letter", "rsv_0_poison")]
        assert cases[1]["details"]["reason"] == rows[1]["error"]
        assert queue.stats.dead_lettered == 2
    finally:
        await queue.close()


async def test_a_nul_byte_does_not_strand_another_partners_commit(stack, worker_settings):
    """Issue 11, case 1: entries carrying a NUL byte (escaped in metadata, raw in a reason)
    written straight into the stream next to another partner's commit: that commit reaches
    COMMITTED with exactly one booking; only the poisoned entries are dead-lettered."""
    rt = stack
    other = await rt.reservations.create(partner_id="p2", vendor_id="inst", resource_id=None,
                                         start_ms=T0, end_ms=T0 + UNIT, requester_id="r2")
    rid = other.reservation_id
    shard = rt.keys.shard_of_id(rid)
    stream = rt.keys.events(shard)
    fake = rt.keys.new_reservation_id("inst")
    base = {"reservationId": fake, "version": "2", "fromState": "INTENT_CREATED",
            "toState": "AWAITING_VENDOR_CONFIRMATION", "path": "HELD,AWAITING_VENDOR_CONFIRMATION",
            "triggeredBy": "partner", "timestamp": str(T0), "partnerId": "p1",
            "vendorId": "inst", "resourceId": "inst", "requesterId": "r1",
            "slotStart": str(T0 + 4 * UNIT), "slotEnd": str(T0 + 5 * UNIT),
            "blockStart": str(T0 + 4 * UNIT), "blockEnd": str(T0 + 5 * UNIT),
            "createdAt": str(T0)}
    await rt.redis.xadd(stream, {**base, "metadata": '{"n": "a\\u0000b"}'})
    await rt.reservations.act(rid, "commit", actor="partner")
    fake2 = rt.keys.new_reservation_id("inst")
    await rt.redis.xadd(stream, {**base, "reservationId": fake2, "reason": "a\x00b"})
    queue = CommitQueue(rt.access, rt.keys, rt.pool, rt.reservations, worker_settings, "t")
    await queue.ensure_groups()
    try:
        assert await queue.drain_shard_once(shard) == 4
        assert (await rt.reservations.get(rid)).state == State.COMMITTED
        await queue.drain_shard_once(shard)  # the COMMITTED entry
        assert await streams_drained(rt)
        async with rt.pool.acquire() as conn:
            assert await conn.fetchval(
                "SELECT count(*) FROM bookings WHERE reservation_id = $1", rid) == 1
            dead = await conn.fetch("SELECT fields->>'reservationId' FROM dead_letters")
            assert sorted(r[0] for r in dead) == sorted([fake, fake2])
            assert await conn.fetchval("SELECT count(*) FROM manual_review "
                                       "WHERE kind = 'dead_letter'") == 2
            assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE reservation_id "
                                       "= ANY($1::text[])", [fake, fake2]) == 0
        await assert_record_complete(rt, [rid])
        assert len(await rt.redis.xrange(rt.keys.dead_letters(shard))) == 2
    finally:
        await queue.close()


async def test_a_booking_landing_after_a_rehydration_keeps_its_markers(worker_settings,
                                                                      private_redis):
    """Issue 11, case 5: the booking insert is held back (a lock on the table) while Redis
    loses its data and is rehydrated; once it lands, its slot never reads free, the
    reservation ends COMMITTED in Postgres, and another partner cannot hold the slot."""
    url, restart = private_redis
    settings = worker_settings.replace(redis_url=url)
    rt = await open_stack(settings)
    queue = CommitQueue(rt.access, rt.keys, rt.pool, rt.reservations, settings, "t")
    blocker = await asyncpg.connect(settings.database_url,
                                    server_settings={"search_path": settings.db_schema})
    watcher = await asyncpg.connect(settings.database_url)
    try:
        await queue.ensure_groups()
        [rid] = await commit_many(rt, 1)
        shard = rt.keys.shard_of_id(rid)
        units = [rt.keys.unit("inst", T0 // UNIT)]
        entries = await queue.read_new(shard)
        assert len(entries) == 2
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("LOCK TABLE bookings IN EXCLUSIVE MODE")
        delivery = asyncio.create_task(queue.process(shard, entries))

        async def insert_waits() -> bool:
            return await watcher.fetchval(
                """SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                   WHERE c.oid = to_regclass(quote_ident($1) || '.bookings')
                     AND NOT l.granted""", settings.db_schema) > 0

        await wait_for(insert_waits, 30, "the booking insert to wait on the lock")
        try:
            await rt.redis.shutdown(nosave=True)
        except Exception:
            pass  # the connection drops with the server
        restart()  # every record, unit and flag is gone
        rehydration = asyncio.create_task(rt.rehydrate_if_needed())

        async def rehydration_settled() -> bool:
            if rehydration.done():
                return True
            return await watcher.fetchval(  # waiting for the booking writer to finish
                """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                     AND classid::bigint = (hashtext($1)::bigint & 4294967295)
                     AND objid = 1 AND objsubid = 2""", settings.db_schema) > 0

        await wait_for(rehydration_settled, 30, "rehydration to run or wait")
        # Whenever the booking row is visible, its unit must read booked: watched from
        # the moment the insert may proceed until everything has settled.
        violations = []

        async def watch() -> None:
            while True:
                booked = await watcher.fetchval(
                    f'SELECT count(*) FROM "{settings.db_schema}".bookings '
                    "WHERE reservation_id = $1", rid)
                values = [await rt.redis.get(u) for u in units]
                if booked and values != [f"B|{rid}"]:
                    violations.append(values)
                await asyncio.sleep(0.005)

        watching = asyncio.create_task(watch())
        await lock.rollback()
        await asyncio.wait_for(delivery, 60)
        await asyncio.wait_for(rehydration, 60)
        await asyncio.sleep(0.2)
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        assert violations == []
        assert [await rt.redis.get(u) for u in units] == [f"B|{rid}"]
        async with rt.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM bookings WHERE reservation_id "
                                       "= $1", rid) == 1
            row = await conn.fetchrow("SELECT state, version FROM reservations WHERE id = $1",
                                      rid)
            actions = [r[0] for r in await conn.fetch(
                "SELECT action FROM audit_log WHERE reservation_id = $1 ORDER BY id", rid)]
        assert (row["state"], row["version"]) == ("COMMITTED", 9)
        assert actions[-2:] == ["reservation.commit_in_progress", "reservation.committed"]
        assert len(actions) == len(set(actions)) == 9
        with pytest.raises(HoldConflict) as caught:
            await rt.reservations.create(partner_id="p2", vendor_id="inst", resource_id=None,
                                         start_ms=T0, end_ms=T0 + UNIT, requester_id="r2")
        assert caught.value.booked
    finally:
        await blocker.close()
        await watcher.close()
        await queue.close()
        await rt.close()
        await drop_schema(settings.db_schema)


class PrivatePostgres:
    """A Postgres of this test's own (slotguard/embedded.py), stopped and started again on
    the same port; the shared one is never touched."""

    def __init__(self, data_dir: Path) -> None:
        from slotguard import embedded

        self.embedded = embedded
        self.servers = embedded.EmbeddedServers(data_dir)
        self.servers.data_dir.mkdir(parents=True, exist_ok=True)
        self.url = self.servers._start_postgres()
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        self.args = list(self.servers._postgres.args)

    def stop(self) -> None:
        self.embedded._terminate(self.servers._postgres, signal.SIGINT)  # fast shutdown

    def start(self) -> None:
        e = self.embedded
        proc = e._spawn(self.args, self.servers.postgres_log, cwd=self.servers.postgres_dir,
                        user=self.servers._postgres_user(), death_signal=signal.SIGINT)
        self.servers._postgres = proc
        assert e._wait_until(lambda: e._postgres_answers(self.port), proc, 120)

    def close(self) -> None:
        if self.servers._postgres is not None:
            self.embedded._terminate(self.servers._postgres, signal.SIGINT)


@pytest.fixture
def private_postgres():
    # Not under pytest's basetemp: concurrent pytest sessions reset its root to 0700, and
    # the postgres system user must reach the data dir.
    import shutil
    import tempfile

    data_dir = Path(tempfile.mkdtemp(prefix="slotguard-pg-"))
    pg = PrivatePostgres(data_dir)
    yield pg
    pg.close()
    shutil.rmtree(data_dir, ignore_errors=True)


async def test_a_postgres_outage_spends_no_delivery(worker_settings, private_postgres,
                                                    tmp_path):
    """Issue 11, case 2: Postgres stopped while a worker drains, for many times
    max_deliveries x the reclaim interval, then started again: every accepted commit ends
    COMMITTED with one booking, every transition is audited once, nothing is dead-lettered
    and the worker never exits."""
    pg = private_postgres
    settings = worker_settings.replace(database_url=pg.url, max_deliveries=2,
                                       reclaim_idle_ms=300, drain_retry_max_ms=400)
    rt = await open_stack(settings)
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        before = await commit_many(rt, 20)
        await wait_for(lambda: _all_committed(rt, before), 60, "the first commits")
        pg.stop()
        during = await commit_many(rt, 20, offset=100)  # Redis accepts; Postgres is down
        # Far longer than max_deliveries x the reclaim interval (2 x 0.3 s): every entry
        # would have been dead-lettered had each retry counted as a delivery.
        await asyncio.sleep(6)
        assert worker.poll() is None, "the worker exited during the outage"
        assert await states(rt, during) == [State.COMMIT_IN_PROGRESS] * 20
        pg.start()
        ids = before + during
        await wait_for(lambda: _all_committed(rt, ids), 90, "every commit COMMITTED")
        await wait_for(lambda: streams_drained(rt), 30, "streams drained")
        await wait_for(lambda: _audit_complete(rt, ids), 30, "audit rows")
        await assert_record_complete(rt, ids)
        for shard in range(rt.keys.shards):
            assert await rt.redis.xlen(rt.keys.dead_letters(shard)) == 0
        async with rt.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
        assert worker.poll() is None, "the worker exited"
        assert "unreachable" in (tmp_path / "worker.log").read_text()
    finally:
        stop_worker(worker)
        await rt.close()


def test_the_worker_process_runs_on_uvloop():
    probe = ("import asyncio\nfrom jobs.worker import use_uvloop\nassert use_uvloop()\n"
             "print(type(asyncio.get_event_loop()).__module__)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().startswith("uvloop")


async def test_one_entry_per_call_and_a_commit_drained_before_its_creation(stack,
                                                                          worker_settings):
    """An instant vendor's creation is ONE entry (its path), the commit another; the commit
    entry carries no unchanging field. Drained in the wrong order (as two consumers may),
    the commit finds them in the live Redis record; every transition is written once."""
    rt = stack
    moved = await rt.reservations.create(partner_id="p1", vendor_id="inst", resource_id=None,
                                         start_ms=T0, end_ms=T0 + UNIT, requester_id="r1",
                                         metadata={"note": "n"})
    rid = moved.reservation_id
    await rt.reservations.act(rid, "commit", actor="partner")
    shard = rt.keys.shard_of_id(rid)
    queue = CommitQueue(rt.access, rt.keys, rt.pool, rt.reservations, worker_settings, "t")
    await queue.ensure_groups()
    try:
        entries = await queue.read_new(shard)
        assert len(entries) == 2
        fields = [dict(zip(f[0::2], f[1::2])) if isinstance(f, list) else f
                  for _, f in entries]
        assert fields[0]["path"].split(",")[-1] == "AUTHORIZED_BOTH"
        assert "partnerId" in fields[0] and "partnerId" not in fields[1]
        await queue.process(shard, [entries[1]])  # the commit first
        await queue.process(shard, [entries[0]])
        await queue.process(shard, entries)  # and everything redelivered
        assert await queue.drain_shard_once(shard) == 1  # the worker's own COMMITTED entry
        view = await rt.reservations.get(rid)
        assert view.state == State.COMMITTED
        assert [h["version"] for h in view.history] == list(range(1, 10))
        await assert_record_complete(rt, [rid])
        async with rt.pool.acquire() as conn:
            # The snapshot keeps the creation's metadata although it was written last.
            assert await conn.fetchval("SELECT metadata FROM reservations WHERE id = $1",
                                       rid) == {"note": "n"}
            versions = [r[0] for r in await conn.fetch(
                "SELECT version FROM reservation_history ORDER BY version")]
        assert versions == list(range(1, 10))
    finally:
        await queue.close()


async def test_shard_batches_are_written_together_and_a_poisoned_one_stays_alone(
        stack, worker_settings):
    """Group commit (issue 14): batches of three shards that reach the queue at once are
    written in one transaction; when one of them carries an entry Postgres refuses, the
    group is written batch by batch, the other two commit, and the poisoned batch is
    bisected alone (its good entry commits, the bad one is dead-lettered)."""
    from tests.test_db_events import event

    rt = stack
    queue = CommitQueue(rt.access, rt.keys, rt.pool, rt.reservations, worker_settings, "t")
    await queue.ensure_groups()
    try:
        for shard in (0, 1, 2):
            await rt.redis.xadd(rt.keys.events(shard),
                                event(f"rsv_{shard}_ok", 1, "INTENT_CREATED", resource="inst"))
        async def at_once(shards) -> list[int]:
            # read first; then the three batches reach the writer in one turn of the loop
            read = {s: await queue.read_new(s) for s in shards}
            await asyncio.gather(*(queue.process(s, read[s]) for s in shards))
            return [len(read[s]) for s in shards]

        assert await at_once((0, 1, 2)) == [1] * 3
        assert queue._group.groups == 1
        await rt.redis.xadd(rt.keys.events(1),
                            event("rsv_1_fine", 1, "INTENT_CREATED", resource="inst"))
        await rt.redis.xadd(rt.keys.events(2),
                            event("rsv_2_fine", 1, "INTENT_CREATED", resource="inst"))
        await rt.redis.xadd(rt.keys.events(2), event("rsv_2_poison", 1, "INTENT_CREATED",
                                                     metadata='{"x": "\\u0000"}'))
        await rt.redis.xadd(rt.keys.events(3),
                            event("rsv_3_fine", 1, "INTENT_CREATED", resource="inst"))
        assert await at_once((1, 2, 3)) == [1, 2, 1]
        # tried together first (2), then the poisoned batch's two halves alone (3, 4)
        assert queue._group.groups == 4
        assert await streams_drained(rt)
        async with rt.pool.acquire() as conn:
            audited = sorted(r[0] for r in await conn.fetch("SELECT event_id FROM audit_log"))
            dead = [r[0] for r in await conn.fetch(
                "SELECT fields->>'eventId' FROM dead_letters")]
        assert audited == sorted(f"rsv_{s}:1" for s in (
            "0_ok", "1_ok", "2_ok", "1_fine", "2_fine", "3_fine"))
        assert dead == ["rsv_2_poison:1"]
    finally:
        await queue.close()
