"""Load generators: several processes, many tasks each, bounded in count and time.

A phase is described by a :class:`LoadSpec` (plain data, pickled to ``spawn``-ed processes).
Every process waits for a common start, runs ``concurrency`` tasks until its deadline or its
share of ``max_ops``, and sends back its :class:`benchmarks.stats.Recorder` and its history.
The same :class:`Pattern` drives every workload, so "the same load" on the engine, the bare
script, HTTP or Postgres is the same sequence of intervals.

Workloads: ``hold`` (HoldEngine.place, coalesced), ``bare`` (the place_hold script, one
EVALSHA at a time: the naive client path), ``pg_exclusion`` (insert into a table with the
exclusion constraint), ``pg_lock`` (``SELECT ... FOR UPDATE`` on the resource row, overlap
check, insert into a table without the constraint), and ``http_*`` (benchmarks/http_client.py).
With ``release_winners`` a winner gives its slot back at once (hold, release), so a hot
slot stays contested for the whole phase.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue as queue_module
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from benchmarks import history as h
from benchmarks.stats import Recorder, merge
from engine.settings import Settings

T0 = 1_893_456_000_000  # 2030-01-01T00:00:00Z: far from any real booking
LONG_TTL_MS = 1_800_000  # holds outlive the run, so the verifier sees every one of them


@dataclass(frozen=True)
class ResourceSpec:
    id: str
    unit_ms: int = 15 * 60_000
    buffer_before_ms: int = 0
    buffer_after_ms: int = 0
    vendor_id: str = ""

    def units(self, start_ms: int, end_ms: int) -> tuple[int, int]:
        return ((start_ms - self.buffer_before_ms) // self.unit_ms,
                (end_ms + self.buffer_after_ms) // self.unit_ms - 1)


@dataclass(frozen=True)
class Pattern:
    """Which intervals a phase asks for.

    ``hot``: every request is one of ``hot_slots`` identical slots (two units each);
    ``storm``: random intervals of 1..4 units over ``span_units`` of every resource;
    ``distinct``: every request its own free slot (placement rate without conflicts).
    """

    kind: str
    resources: tuple[ResourceSpec, ...]
    hot_slots: int = 4
    span_units: int = 2_000
    t0: int = T0  # where the intervals start (bench --target picks a day of its own)

    def picker(self, rng: random.Random, task_index: int, task_count: int):
        if self.kind == "hot":
            slots = [(self.resources[k % len(self.resources)],
                      self.t0 + (k // len(self.resources)) * 8 * self.resources[0].unit_ms)
                     for k in range(self.hot_slots)]

            def hot():
                resource, start = rng.choice(slots)
                return resource, start, start + 2 * resource.unit_ms
            return hot
        if self.kind == "storm":
            def storm():
                resource = rng.choice(self.resources)
                start = self.t0 + rng.randrange(self.span_units) * resource.unit_ms
                return resource, start, start + rng.randrange(1, 5) * resource.unit_ms
            return storm
        counter = iter(range(task_index, 1 << 62, task_count))

        def distinct():
            n = next(counter)
            resource = self.resources[n % len(self.resources)]
            gap = 2 + (resource.buffer_before_ms + resource.buffer_after_ms) // resource.unit_ms
            start = self.t0 + (n // len(self.resources)) * gap * resource.unit_ms
            return resource, start, start + resource.unit_ms
        return distinct


@dataclass(frozen=True)
class LoadSpec:
    workload: str
    pattern: Pattern
    settings: Settings
    processes: int = 1
    concurrency: int = 32  # tasks (or connections) per process
    seconds: float = 5.0
    max_ops: int = 1_000_000  # over all processes
    release_winners: bool = False
    seed: int = 1
    http: dict[str, Any] = field(default_factory=dict)  # host, port, key, vendor per resource
    pg_table: str = ""
    start_delay_s: float = 1.5


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# ---- workloads (built inside the load process) --------------------------------------------
class Workload:
    async def open(self, spec: LoadSpec) -> None: ...

    async def attempt(self, resource: ResourceSpec, start: int, end: int,
                      rec: Recorder, out: list) -> None: ...

    async def close(self) -> None: ...

    def server_cpu_s(self) -> float | None:
        return None


class RedisHolds(Workload):
    """``hold``: HoldEngine.place; ``bare``: the same script by one EVALSHA per call."""

    def __init__(self, bare: bool) -> None:
        self.bare = bare

    async def open(self, spec: LoadSpec) -> None:
        import redis.asyncio as aioredis

        from engine.access import RedisAccess
        from benchmarks.holds import HoldEngine
        from engine.keys import KeySpace
        from engine.resources import Resource, ResourceCatalog

        s = spec.settings
        self.settings = s
        self.release = spec.release_winners
        from engine.connection import open_redis

        # A cluster client when SLOTGUARD_REDIS_CLUSTER is set (issue 15).
        self.client = open_redis(s, max_connections=spec.concurrency + 8,
                                 health_check_interval=0)
        self.access = RedisAccess(self.client, batch_max=s.redis_batch_max,
                                  max_inflight=s.redis_max_inflight_batches)
        await self.access.load_scripts()
        self.keys = KeySpace(s.key_prefix, s.shards)
        catalog = ResourceCatalog([Resource(r.id, r.unit_ms, r.buffer_before_ms,
                                            r.buffer_after_ms, r.vendor_id)
                                   for r in spec.pattern.resources])
        self.engine = HoldEngine(self.access, self.keys, catalog, s)
        # Open every connection the tasks will use before the clock starts.
        await asyncio.gather(*(self.client.ping() for _ in range(spec.concurrency)))

    async def attempt(self, resource, start, end, rec, out) -> None:
        from engine.errors import HoldConflict

        first, last = resource.units(start, end)
        hold_id = self.keys.new_hold_id(resource.id)
        sent = time.monotonic()
        try:
            if self.bare:
                token, expires = await self._bare_place(hold_id, resource.id, first, last)
            else:
                hold = await self.engine.place(resource.id, start, end, ttl_ms=LONG_TTL_MS,
                                               hold_id=hold_id, owner="bench")
                token, expires = hold.fence_token, hold.expires_at_ms
        except HoldConflict as exc:
            answered = time.monotonic()
            rec.record(h.CONFLICT, sent, answered)
            out.append(h.Entry(h.PLACE, h.CONFLICT, hold_id, resource.id, first, last, sent,
                               answered, holder=exc.holder, unit=exc.unit))
            return
        except Exception as exc:
            answered = time.monotonic()
            rec.record(h.ERROR, sent, answered)
            out.append(h.Entry(h.PLACE, h.ERROR, hold_id, resource.id, first, last, sent,
                               answered, holder=type(exc).__name__))
            return
        answered = time.monotonic()
        rec.record(h.OK, sent, answered)
        out.append(h.Entry(h.PLACE, h.OK, hold_id, resource.id, first, last, sent, answered,
                           expires_ms=expires))
        if self.release:
            sent = time.monotonic()
            try:
                if self.bare:
                    await self._bare_release(hold_id, token)
                else:
                    await self.engine.release(hold_id, token)
                outcome = h.OK
            except Exception:
                outcome = h.ERROR
            out.append(h.Entry(h.RELEASE, outcome, hold_id, resource.id, first, last, sent,
                               time.monotonic()))

    async def _bare_place(self, hold_id, resource_id, first, last):
        from engine.errors import Outcome
        from engine.holds import conflict_from_reply

        shard = self.keys.shard_of(resource_id)
        reply = await self.access.call_once(
            "place_hold",
            [self.keys.unit_root(shard), self.keys.hold(hold_id), self.keys.fence(resource_id)],
            [hold_id, resource_id, first, last, LONG_TTL_MS, self.settings.max_hold_units,
             "bench"])
        if int(reply[0]) == Outcome.CONFLICT:
            raise conflict_from_reply(reply, resource_id)
        if int(reply[0]) != Outcome.OK:
            raise RuntimeError(f"place_hold answered {reply!r}")
        return int(reply[2]), int(reply[1])

    async def _bare_release(self, hold_id, token):
        reply = await self.access.call_once(
            "release_hold",
            [self.keys.unit_root(self.keys.shard_of_id(hold_id)), self.keys.hold(hold_id)],
            [hold_id, token])
        if int(reply[0]) != 1:
            raise RuntimeError(f"release_hold answered {reply!r}")

    async def close(self) -> None:
        if hasattr(self.access, "close"):
            await self.access.close()
        await self.client.aclose()


class PostgresBookings(Workload):
    """The Postgres-only path: ``pg_exclusion`` lets the exclusion constraint decide;
    ``pg_lock`` locks the resource row, looks for an overlap, and inserts."""

    def __init__(self, lock: bool) -> None:
        self.lock = lock

    async def open(self, spec: LoadSpec) -> None:
        from engine.db import create_pool

        self.table = spec.pg_table
        self.release = spec.release_winners
        # At most 16 connections per load process (tasks queue for one): the Postgres is
        # often shared, and 64 backends on two cores serve no faster than 32.
        size = min(spec.concurrency, 16)
        self.pool = await create_pool(spec.settings, min_size=size, max_size=size)
        conns = [await self.pool.acquire() for _ in range(size)]
        self.backend_pids = [await c.fetchval("SELECT pg_backend_pid()") for c in conns]
        for c in conns:
            await self.pool.release(c)
        from benchmarks.cpu import process_cpu_s

        self._cpu = process_cpu_s
        self.cpu_at_open = sum(process_cpu_s(p) or 0.0 for p in self.backend_pids)
        self.local = all(process_cpu_s(p) is not None for p in self.backend_pids)

    def server_cpu_s(self) -> float | None:
        if not self.local:
            return None
        return sum(self._cpu(p) or 0.0 for p in self.backend_pids) - self.cpu_at_open

    async def attempt(self, resource, start, end, rec, out) -> None:
        import asyncpg

        first, last = resource.units(start, end)
        block_start = datetime.fromtimestamp(first * resource.unit_ms / 1000, UTC)
        block_end = datetime.fromtimestamp((last + 1) * resource.unit_ms / 1000, UTC)
        row_id = f"pg_{uuid.uuid4().hex}"
        sent = time.monotonic()
        try:
            async with self.pool.acquire() as conn:
                if self.lock:
                    async with conn.transaction():
                        await conn.execute("SELECT 1 FROM bench_resources WHERE id = $1 "
                                           "FOR UPDATE", resource.id)
                        holder = await conn.fetchval(
                            f"SELECT id FROM {self.table} WHERE resource_id = $1 "
                            "AND cancelled_at IS NULL AND block_start < $3 AND block_end > $2 "
                            "LIMIT 1", resource.id, block_start, block_end)
                        if holder is None:
                            await self._insert(conn, row_id, resource.id, block_start,
                                               block_end)
                else:
                    # ON CONFLICT DO NOTHING checks the exclusion constraint by speculative
                    # insertion: a loser backs out instead of deadlocking with the winner
                    # (a plain INSERT deadlocks under hot contention, deadlock_timeout each).
                    inserted = await self._insert(conn, row_id, resource.id, block_start,
                                                  block_end, on_conflict=True)
                    holder = None if inserted else "?"
        except asyncpg.ExclusionViolationError:
            holder = "?"
        except Exception as exc:
            answered = time.monotonic()
            rec.record(h.ERROR, sent, answered)
            out.append(h.Entry(h.PG_INSERT, h.ERROR, row_id, resource.id, first, last, sent,
                               answered, holder=type(exc).__name__, table=self.table))
            return
        answered = time.monotonic()
        if holder is not None:
            rec.record(h.CONFLICT, sent, answered)
            out.append(h.Entry(h.PG_INSERT, h.CONFLICT, row_id, resource.id, first, last, sent,
                               answered, table=self.table,
                               holder="" if holder == "?" else holder))
            return
        rec.record(h.OK, sent, answered)
        out.append(h.Entry(h.PG_INSERT, h.OK, row_id, resource.id, first, last, sent, answered,
                           table=self.table))
        if self.release:
            sent = time.monotonic()
            try:
                async with self.pool.acquire() as conn:
                    await conn.execute(f"UPDATE {self.table} SET cancelled_at = now() "
                                       "WHERE id = $1", row_id)
                outcome = h.OK
            except Exception:
                outcome = h.ERROR
            out.append(h.Entry(h.RELEASE, outcome, row_id, resource.id, first, last, sent,
                               time.monotonic(), table=self.table))

    async def _insert(self, conn, row_id, resource_id, block_start, block_end, *,
                      on_conflict: bool = False) -> bool:
        """True when the row went in (False: ON CONFLICT DO NOTHING skipped it)."""
        inserted = await conn.fetchval(
            f"INSERT INTO {self.table} (id, resource_id, resource_key, block_start, block_end)"
            " VALUES ($1, $2, hashtextextended($2, 0), $3, $4)"
            + (" ON CONFLICT DO NOTHING" if on_conflict else "") + " RETURNING true",
            row_id, resource_id, block_start, block_end)
        return bool(inserted)

    async def close(self) -> None:
        await self.pool.close()


def build_workload(name: str) -> Workload:
    if name in ("hold", "bare"):
        return RedisHolds(bare=name == "bare")
    if name in ("pg_exclusion", "pg_lock"):
        return PostgresBookings(lock=name == "pg_lock")
    if name.startswith("http_"):
        from benchmarks.http_client import HttpWorkload

        return HttpWorkload(name.removeprefix("http_"))
    raise ValueError(f"unknown workload {name!r}")


# ---- one load process ----------------------------------------------------------------------
async def _run_process(spec: LoadSpec, index: int, start_at: float) -> dict[str, Any]:
    workload = build_workload(spec.workload)
    await workload.open(spec)
    rec = Recorder()
    out: list[h.Entry] = []
    share = spec.max_ops // spec.processes + (1 if index < spec.max_ops % spec.processes else 0)
    budget = [share]
    task_count = spec.processes * spec.concurrency
    while time.time() < start_at:
        await asyncio.sleep(min(0.01, max(0.0, start_at - time.time())))
    rec.started = time.monotonic()
    deadline = rec.started + spec.seconds
    cpu0 = time.process_time()

    async def task(t: int) -> None:
        rng = random.Random(spec.seed * 1_000_003 + index * 1009 + t)
        pick = spec.pattern.picker(rng, index * spec.concurrency + t, task_count)
        while budget[0] > 0 and time.monotonic() < deadline:
            budget[0] -= 1
            resource, start, end = pick()
            await workload.attempt(resource, start, end, rec, out)

    try:
        await asyncio.gather(*(task(t) for t in range(spec.concurrency)))
        rec.wall_s = time.monotonic() - rec.started
        rec.cpu_s = time.process_time() - cpu0
        server_cpu = workload.server_cpu_s()
    finally:
        await workload.close()
    return {"recorder": rec.to_wire(), "history": out, "server_cpu_s": server_cpu,
            "pid": os.getpid()}


def _process_main(spec: LoadSpec, index: int, start_at: float, results) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        results.put((index, asyncio.run(_run_process(spec, index, start_at))))
    except BaseException as exc:  # report, never hang the parent
        results.put((index, {"error": repr(exc)}))
        raise


_CTX = None


def _context():
    """Load processes fork from a server that imported the workloads once (a phase starts
    in milliseconds, not the second a fresh interpreter takes); spawn where there is no
    forkserver. Neither inherits this process's event loop or connections."""
    global _CTX
    if _CTX is None:
        try:
            _CTX = multiprocessing.get_context("forkserver")
            _CTX.set_forkserver_preload(["benchmarks.load", "benchmarks.http_client",
                                         "engine.holds", "engine.access", "engine.db",
                                         "redis.asyncio", "asyncpg", "uvloop"])
        except ValueError:
            _CTX = multiprocessing.get_context("spawn")
    return _CTX


@dataclass
class PhaseResult:
    summary: dict[str, Any]
    history: list[h.Entry]
    server_cpu_s: float | None
    errors: list[str]


def run_phase(spec: LoadSpec, on_tick=None) -> PhaseResult:
    """Run one phase in ``spec.processes`` processes; bounded by its deadline."""
    ctx = _context()
    results = ctx.Queue()
    start_at = time.time() + spec.start_delay_s
    procs = [ctx.Process(target=_process_main, args=(spec, i, start_at, results), daemon=True)
             for i in range(spec.processes)]
    for proc in procs:
        proc.start()
    hard_deadline = start_at + spec.seconds + 60  # start-up, drain and pickling included
    collected: dict[int, dict] = {}
    try:
        while len(collected) < len(procs):
            if on_tick is not None:
                on_tick(max(0.0, min(1.0, (time.time() - start_at) / spec.seconds)))
            try:
                index, result = results.get(timeout=0.25)
                collected[index] = result
            except queue_module.Empty:
                if time.time() > hard_deadline:
                    raise TimeoutError(f"load processes of {spec.workload} did not finish")
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    errors = [r["error"] for r in collected.values() if "error" in r]
    errors += [f"load process {i} exited without a result" for i in range(len(procs))
               if i not in collected]
    good = [r for r in collected.values() if "error" not in r]
    entries = [e for r in good for e in r["history"]]
    cpu = [r["server_cpu_s"] for r in good]
    summary = merge([r["recorder"] for r in good]) if good else {}
    return PhaseResult(summary, entries, sum(cpu) if cpu and None not in cpu else None, errors)


async def run_inline(spec: LoadSpec) -> PhaseResult:
    """One phase in this process and event loop (no spawn): for short sequential phases
    (``concurrency`` 1) where start-up would cost more than the phase."""
    try:
        result = await _run_process(spec, 0, time.time())
    except Exception as exc:
        return PhaseResult({}, [], None, [repr(exc)])
    summary = merge([result["recorder"]])
    return PhaseResult(summary, result["history"], result["server_cpu_s"], [])
