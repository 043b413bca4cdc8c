"""The scenarios of ``slotguard bench`` and the run that holds them together.

1. ``hot_slot``: many clients fight for a handful of identical (buffered) slots; a winner
   gives its slot back at once. On HoldEngine, end to end through POST /v1/reservations
   (+ cancel), and on the Postgres-only paths under the same contention (the baseline).
2. ``overlap_storm``: random overlapping buffered intervals over R resources, HoldEngine
   against the bare script under the identical sequence of requests.
3. ``lifecycle``: reservations walked to COMMITTED through the API (create,
   vendor-confirmation, commit) with commit-queue workers draining; then a backlog drained by
   fresh workers (bookings and audit rows per second).
4. ``engine_vs_api``: the same conflict-free load on HoldEngine and through HTTP, against
   the bare single-call script and the minimal Starlette endpoint calling it; Redis memory
   and Redis CPU per live hold.
5. ``baselines``: the bare script one call at a time (1 and N processes), the hello route,
   the minimal endpoint, the pg_endpoint (Starlette + one asyncpg INSERT ... ON CONFLICT DO
   NOTHING) and the Postgres-only paths, all in this run.
6. ``redis_cost`` and 7. ``scale``: against a private redis-server (benchmarks/
   private_scenarios.py).

Every scenario ends with the verifier (benchmarks/verifier.py) over Redis, Postgres and the
scenario's client history; its violations are the scenario's ``violations``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from benchmarks import history as h
from benchmarks import private_scenarios, verifier
from benchmarks.cpu import process_cpu_s, redis_server_pid
from benchmarks.env import BASELINE_TABLES, BenchEnv, api_available
from benchmarks.load import (LONG_TTL_MS, T0, LoadSpec, Pattern, ResourceSpec, run_inline,
                             run_phase)
from benchmarks.servers import Managed, start_api, start_baseline_app, start_worker

SCENARIOS = ("hot_slot", "overlap_storm", "lifecycle", "engine_vs_api", "baselines",
             "redis_cost", "scale")
UNIT = 15 * 60_000


@dataclass(frozen=True)
class BenchConfig:
    seconds: float = 8.0  # per load phase
    processes: int = 2  # client processes per phase (the machine's cores, by default)
    concurrency: int = 32  # tasks / connections per client process (2 x 32 = 64)
    http_workers: int = 2  # uvicorn workers of the API and of the baseline app
    queue_workers: int = 2  # commit-queue worker processes
    hot_slots: int = 4
    storm_resources: int = 16
    drain_backlog: int = 20_000
    memory_holds: int = 5_000
    max_ops: int = 2_000_000  # per phase, over all client processes
    start_delay_s: float = 1.0  # load processes fork from a preloaded server: ample
    background_window_s: float = 0.3  # shared Redis's idle CPU, sampled before each phase
    cost_seconds: float = 5.0  # redis_cost load phases
    cost_sequential_ops: int = 400  # redis_cost one-at-a-time phases (slow log at 0 µs)
    scale_sizes: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)  # live reservations
    scale_seconds: float = 5.0  # per scale phase
    scale_bookings: tuple[int, ...] = (10_000, 1_000_000)  # bookings in the table, drains


QUICK = BenchConfig(seconds=0.7, processes=2, concurrency=16, http_workers=1, queue_workers=1,
                    storm_resources=8, drain_backlog=1_000, memory_holds=500, max_ops=100_000,
                    start_delay_s=0.3, background_window_s=0.1, cost_seconds=0.7, cost_sequential_ops=60,
                    scale_sizes=(500, 2_000), scale_seconds=0.7, scale_bookings=(5_000,))
FULL = BenchConfig()


class Run:
    """One ``slotguard bench`` run: its environment, servers, baselines and results."""

    def __init__(self, env: BenchEnv, config: BenchConfig, progress=None) -> None:
        self.env = env
        self.config = config
        self.progress = progress  # progress(label, fraction) or None
        self.baselines: dict[str, dict[str, Any]] = {}
        self.api: tuple[Managed, int] | None = None
        self.baseline_app: tuple[Managed, int] | None = None
        self.workers: list[Managed] = []
        self.redis_pid: int | None = None
        self._vendor_seq = 0
        self.private = None  # benchmarks.private_scenarios.PrivateStack, when started
        self.names: tuple[str, ...] = SCENARIOS

    # ---- servers -------------------------------------------------------------------------
    async def api_port(self) -> int | None:
        if not api_available():
            return None
        if self.api is None:
            self.api = await asyncio.to_thread(start_api, self.env.settings,
                                               self.config.http_workers, self.env.log_dir)
        return self.api[1]

    async def baseline_port(self) -> int:
        if self.baseline_app is None:
            self.baseline_app = await asyncio.to_thread(
                start_baseline_app, self.env.settings, self.config.http_workers,
                self.env.log_dir)
        return self.baseline_app[1]

    def start_workers(self, count: int) -> None:
        for i in range(count):
            self.workers.append(start_worker(self.env.settings, len(self.workers),
                                             self.env.log_dir))

    def stop_workers(self) -> list[int | None]:
        codes = [w.stop() for w in self.workers]
        self.workers = []
        return codes

    def stop_all(self) -> None:
        self.stop_workers()
        for server in (self.api, self.baseline_app):
            if server is not None:
                server[0].stop()
        self.api = self.baseline_app = None

    # ---- phases --------------------------------------------------------------------------
    async def vendor(self, name: str, **kwargs) -> list[ResourceSpec]:
        self._vendor_seq += 1
        resources = await self.env.create_vendor(f"{name}{self._vendor_seq}", **kwargs)
        return resources

    async def phase(self, label: str, workload: str, pattern: Pattern, entries: list,
                    *, release: bool = False, http: dict | None = None, pg_table: str = "",
                    processes: int | None = None, seconds: float | None = None,
                    server: Managed | None = None, settings=None, redis=None,
                    redis_pid: int | None = None, concurrency: int | None = None,
                    max_ops: int | None = None, inline: bool = False) -> dict[str, Any]:
        """One load phase. ``settings``/``redis``/``redis_pid`` point it at another Redis
        (the private one of redis_cost and scale); ``inline`` runs it in this process
        (one load process, no spawn: short sequential phases)."""
        c = self.config
        spec = LoadSpec(workload=workload, pattern=pattern,
                        settings=settings or self.env.settings,
                        processes=1 if inline else (processes or c.processes),
                        concurrency=concurrency or c.concurrency,
                        seconds=seconds or c.seconds, max_ops=max_ops or c.max_ops,
                        # One seed for every phase: both sides of a comparison get the same
                        # sequence of intervals (on resources of their own).
                        release_winners=release, seed=1, http=http or {},
                        pg_table=pg_table, start_delay_s=0.0 if inline else c.start_delay_s)
        phase_started = time.monotonic()
        if pg_table:
            await self.env.register_resources(list(pattern.resources))
        stats_client = redis or self.env.redis
        redis_pid = redis_pid or self.redis_pid
        evalsha0 = await self._evalsha_stats(stats_client)
        # A private Redis moves for this run only: nothing to take off.
        background = (0.0 if redis is not None else await self._redis_background(
            c.background_window_s)) \
            if redis_pid else None
        redis_cpu0 = process_cpu_s(redis_pid) if redis_pid else None
        server_cpu0 = server.cpu_s() if server else None
        tick = (lambda f: self.progress(label, f)) if self.progress else None
        load_started = time.monotonic()
        if inline:
            result = await run_inline(spec)
        else:
            result = await asyncio.to_thread(run_phase, spec, tick)
        load_s = time.monotonic() - load_started
        if self.progress:
            self.progress(label, 1.0)
        if result.errors:
            raise RuntimeError(f"{label}: {'; '.join(result.errors)}")
        summary = dict(result.summary)
        summary["workload"] = workload
        summary["pattern"] = pattern.kind
        summary["client_split"] = {"processes": spec.processes,
                                   "connections_per_process": spec.concurrency}
        ok = summary["outcomes"].get("ok", 0)
        placements = summary["operations"]
        if redis_cpu0 is not None:
            redis_cpu = process_cpu_s(redis_pid) - redis_cpu0
            # The Redis may be shared: take off what it burnt per second while idle for us.
            own = max(0.0, redis_cpu - background * summary["seconds"])
            summary["redis_cpu_s"] = round(redis_cpu, 3)
            summary["redis_background_cpu_per_s"] = round(background, 4)
            summary["redis_cpu_us_per_op_raw"] = round(redis_cpu / placements * 1e6, 2) \
                if placements else None
            summary["redis_cpu_us_per_op"] = round(own / placements * 1e6, 2) \
                if placements else None
        if server is not None:
            summary["server_cpu_s"] = round(server.cpu_s() - server_cpu0, 3)
            summary["server_cpu_per_second"] = round(
                summary["server_cpu_s"] / summary["seconds"], 3) if summary["seconds"] else 0
            # The HTTP server's CPU per request (all its worker processes; requests counted
            # as the phase's timed operations, a hot slot's releases ride along unrated).
            summary["server_cpu_us_per_op"] = round(
                summary["server_cpu_s"] / placements * 1e6, 1) if placements else None
        if result.server_cpu_s is not None:
            summary["postgres_cpu_s"] = round(result.server_cpu_s, 3)
            summary["postgres_cpu_us_per_op"] = round(result.server_cpu_s / placements * 1e6, 1) \
                if placements else None
        evalsha1 = await self._evalsha_stats(stats_client)
        calls = evalsha1[0] - evalsha0[0]
        if calls > 0:
            # Time inside the scripts (Redis's own accounting, whole server: others' EVALSHAs
            # count too); the rest of Redis's CPU per op is reading, parsing and replying.
            summary["redis_evalsha_calls"] = calls
            summary["redis_script_us_per_call"] = round((evalsha1[1] - evalsha0[1]) / calls, 2)
        summary["successes"] = ok
        reasons: dict[str, int] = {}
        for e in result.history:
            if e.outcome == h.ERROR:
                reason = (e.holder or "unknown")[:120]
                reasons[reason] = reasons.get(reason, 0) + 1
        summary["error_reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:5])
        summary["phase_wall_s"] = {"load": round(load_s, 3),
                                   "total": round(time.monotonic() - phase_started, 3)}
        entries.extend(result.history)
        return summary

    async def _evalsha_stats(self, client=None) -> tuple[int, int]:
        """(calls, usec) of EVALSHA and EVAL from INFO commandstats (read-only)."""
        stats = await (client or self.env.redis).info("commandstats")
        calls = usec = 0
        for name in ("cmdstat_evalsha", "cmdstat_eval"):
            if name in stats:
                calls += int(stats[name]["calls"])
                usec += int(stats[name]["usec"])
        return calls, usec

    async def _redis_background(self, window_s: float = 0.3) -> float:
        """Redis CPU seconds per second while this run sends nothing (others' load)."""
        before = process_cpu_s(self.redis_pid)
        await asyncio.sleep(window_s)
        return max(0.0, (process_cpu_s(self.redis_pid) - before) / window_s)

    async def verify(self, entries: list[h.Entry], *, drained: bool = True,
                     redis=None) -> verifier.Report:
        async with self.env.pool.acquire() as conn:
            return await verifier.verify(redis or self.env.redis, self.env.keys, conn, entries,
                                         tables=(*BASELINE_TABLES,
                                                 self.env.pg_endpoint_table),
                                         drained=drained)

    # ---- baselines (measured once per run, reused by every scenario that needs one) --------
    async def baseline(self, name: str) -> dict[str, Any]:
        if name in self.baselines:
            return self.baselines[name]
        entries: list[h.Entry] = []
        c = self.config
        if name in ("bare_single_call", "bare_single_call_1p"):
            resources = tuple(ResourceSpec(f"bare{c.processes if name == 'bare_single_call' else 1}"
                                           f"-{i}") for i in range(64))
            summary = await self.phase(f"baseline {name}", "bare", Pattern("distinct", resources),
                                       entries, processes=None if name == "bare_single_call"
                                       else 1)
        elif name in ("pg_exclusion_hot", "pg_lock_hot"):
            resources = tuple(ResourceSpec(f"{name}-{i}", UNIT, UNIT, UNIT)
                              for i in range(2))
            summary = await self.phase(
                f"baseline {name}", name.removesuffix("_hot"),
                Pattern("hot", resources, hot_slots=c.hot_slots), entries, release=True,
                pg_table="bench_pg_excl" if name == "pg_exclusion_hot" else "bench_pg_lock")
        elif name == "pg_exclusion_distinct":
            resources = tuple(ResourceSpec(f"pgd-{i}") for i in range(64))
            summary = await self.phase(f"baseline {name}", "pg_exclusion",
                                       Pattern("distinct", resources), entries,
                                       pg_table="bench_pg_excl")
        elif name in ("pg_endpoint_hot", "pg_endpoint_distinct"):
            port = await self.baseline_port()
            http = {"port": port, "pg_table": self.env.pg_endpoint_table}
            if name == "pg_endpoint_hot":
                resources = tuple(ResourceSpec(f"{name}-{i}", UNIT, UNIT, UNIT)
                                  for i in range(2))
                pattern = Pattern("hot", resources, hot_slots=c.hot_slots)
            else:
                pattern = Pattern("distinct", tuple(ResourceSpec(f"pgep-{i}")
                                                    for i in range(64)))
            summary = await self.phase(f"baseline {name}", "http_pg_endpoint", pattern,
                                       entries, release=name == "pg_endpoint_hot", http=http,
                                       server=self.baseline_app[0])
        elif name == "http_hello":
            port = await self.baseline_port()
            summary = await self.phase("baseline hello", "http_hello",
                                       Pattern("distinct", (ResourceSpec("hello"),)), entries,
                                       http={"port": port}, server=self.baseline_app[0])
        elif name == "http_bare_hold":
            port = await self.baseline_port()
            resources = tuple(ResourceSpec(f"minimal-{i}") for i in range(64))
            summary = await self.phase("baseline minimal endpoint", "http_bare_hold",
                                       Pattern("distinct", resources), entries,
                                       http={"port": port}, server=self.baseline_app[0])
        else:
            raise ValueError(name)
        summary["history"] = entries  # verified by the scenario that asked for it
        self.baselines[name] = summary
        return summary

    def _take_baseline_history(self, *names: str) -> list[h.Entry]:
        out = []
        for name in names:
            out.extend(self.baselines[name].pop("history", []))
        return out

    # ---- scenarios -----------------------------------------------------------------------
    async def hot_slot(self) -> dict[str, Any]:
        c = self.config
        entries: list[h.Entry] = []
        phases, notes = {}, []
        engine_resources = tuple(ResourceSpec(f"hot-engine-{i}", UNIT, UNIT, UNIT)
                                 for i in range(2))
        phases["engine"] = await self.phase(
            "hot slot: HoldEngine", "hold", Pattern("hot", engine_resources,
                                                    hot_slots=c.hot_slots),
            entries, release=True)
        port = await self.api_port()
        if port is not None:
            resources = await self.vendor("hot", resources=2, buffer_before_minutes=15,
                                          buffer_after_minutes=15)
            phases["api"] = await self.phase(
                "hot slot: POST /v1/reservations", "http_create",
                Pattern("hot", tuple(resources), hot_slots=c.hot_slots), entries, release=True,
                http=self._http(), server=self.api[0])
        else:
            notes.append("the HTTP API (api/) is not in this build: end-to-end phase skipped")
        phases["pg_exclusion"] = await self.baseline("pg_exclusion_hot")
        phases["pg_lock"] = await self.baseline("pg_lock_hot")
        phases["pg_endpoint"] = await self.baseline("pg_endpoint_hot")
        entries += self._take_baseline_history("pg_exclusion_hot", "pg_lock_hot",
                                               "pg_endpoint_hot")
        top = phases.get("api") or phases["engine"]
        pg = phases["pg_exclusion"]
        result = {
            "description": f"{c.processes}x{c.concurrency} clients on {c.hot_slots} identical "
                           "buffered slots; winners release at once",
            "phases": phases,
            "baseline": "pg_exclusion",
            "ratio_to_baseline": _ratio(top, pg),
            "ratios": {"engine_to_pg_exclusion": _ratio(phases["engine"], pg),
                       "api_to_pg_exclusion": _ratio(phases.get("api"), pg),
                       "api_to_pg_lock": _ratio(phases.get("api"), phases["pg_lock"]),
                       "api_to_pg_endpoint": _ratio(phases.get("api"),
                                                    phases["pg_endpoint"])},
            "targets": [_target("POST /v1/reservations >= 1.5x pg_endpoint (hot slot)",
                                _ratio(phases.get("api"), phases["pg_endpoint"]), 1.5),
                        _target("end-to-end >= 1.5x the Postgres path (hot slot)",
                                _ratio(phases.get("api"), pg), 1.5)],
            "notes": notes,
        }
        return await self._finish(result, entries)

    async def overlap_storm(self) -> dict[str, Any]:
        c = self.config
        entries: list[h.Entry] = []

        def storm(tag: str) -> Pattern:
            # Half the resources carry buffers (one unit before, two after).
            return Pattern("storm", tuple(
                ResourceSpec(f"storm-{tag}-{i}", UNIT, UNIT * (i % 2), 2 * UNIT * (i % 2))
                for i in range(c.storm_resources)), span_units=2_000)

        phases = {"engine": await self.phase("overlap storm: HoldEngine", "hold",
                                             storm("engine"), entries),
                  "bare_single_call": await self.phase("overlap storm: bare script", "bare",
                                                       storm("bare"), entries)}
        ratio = _ratio(phases["engine"], phases["bare_single_call"])
        result = {
            "description": f"random 1-4 unit intervals (buffers on half the resources) over "
                           f"{c.storm_resources} resources, identical on both sides",
            "phases": phases, "baseline": "bare_single_call", "ratio_to_baseline": ratio,
            "targets": [_target("HoldEngine >= 1.5x the bare single-call script (storm)",
                                ratio, 1.5)],
            "notes": [],
        }
        return await self._finish(result, entries)

    async def engine_vs_api(self) -> dict[str, Any]:
        c = self.config
        entries: list[h.Entry] = []
        phases, notes = {}, []
        engine_resources = tuple(ResourceSpec(f"eva-engine-{i}") for i in range(64))
        phases["engine"] = await self.phase("engine vs API: HoldEngine", "hold",
                                            Pattern("distinct", engine_resources), entries)
        phases["bare_single_call"] = await self.baseline("bare_single_call")
        port = await self.api_port()
        if port is not None:
            resources = await self.vendor("eva", resources=16)
            phases["api"] = await self.phase(
                "engine vs API: POST /v1/reservations", "http_create",
                Pattern("distinct", tuple(resources)), entries, http=self._http(),
                server=self.api[0])
            phases["minimal_endpoint"] = await self.baseline("http_bare_hold")
        else:
            notes.append("the HTTP API (api/) is not in this build: HTTP phases skipped")
        entries += self._take_baseline_history(*[n for n in ("bare_single_call", "http_bare_hold")
                                                 if n in self.baselines])
        phases["pg_endpoint"] = await self.baseline("pg_endpoint_distinct")
        pg = await self.baseline("pg_exclusion_distinct")
        entries += self._take_baseline_history("pg_exclusion_distinct", "pg_endpoint_distinct")
        memory = await self.memory_per_hold()
        redis_cpu = phases["engine"].get("redis_cpu_us_per_op")
        pg_cpu = pg.get("postgres_cpu_us_per_op")
        cpu_ratio = round(redis_cpu / pg_cpu, 4) if redis_cpu and pg_cpu else None
        if redis_cpu is None:
            notes.append("Redis is not on this machine: its CPU per hold was not measured")
        if pg_cpu is None:
            notes.append("Postgres is not on this machine: its CPU per insert was not measured")
        api = phases.get("api")
        result = {
            "description": "every request its own free slot: placement rate without conflicts",
            "phases": phases, "baseline": "minimal_endpoint" if api else "bare_single_call",
            "ratio_to_baseline": _ratio(api, phases.get("minimal_endpoint")) if api
            else _ratio(phases["engine"], phases["bare_single_call"]),
            "ratios": {"engine_to_bare_single_call": _ratio(phases["engine"],
                                                            phases["bare_single_call"]),
                       "api_to_minimal_endpoint": _ratio(api, phases.get("minimal_endpoint")),
                       "api_to_pg_endpoint": _ratio(api, phases["pg_endpoint"])},
            "redis_memory": memory,
            "cpu": {"redis_cpu_us_per_hold": redis_cpu, "postgres_cpu_us_per_insert": pg_cpu,
                    "redis_to_postgres": cpu_ratio,
                    "postgres_phase": {k: pg.get(k) for k in ("throughput_per_s", "operations",
                                                              "postgres_cpu_s")}},
            "targets": [
                _target("HoldEngine >= 1.5x the bare single-call script",
                        _ratio(phases["engine"], phases["bare_single_call"]), 1.5),
                _target("POST /v1/reservations >= 1.0x the minimal endpoint",
                        _ratio(api, phases.get("minimal_endpoint")), 1.0),
                _target("POST /v1/reservations >= 1.0x pg_endpoint (distinct slots)",
                        _ratio(api, phases["pg_endpoint"]), 1.0),
                _target(f"POST /v1/reservations p99 <= 25 ms at "
                        f"{c.processes * c.concurrency} connections",
                        api["latency_ms"]["p99"] if api else None, 25.0, higher=False),
                _target("Redis CPU per hold <= 1/10 Postgres CPU per insert", cpu_ratio, 0.1,
                        higher=False),
                _target("<= 1 KiB Redis memory per live hold", memory["bytes_per_hold"], 1024,
                        higher=False),
            ],
            "notes": notes,
        }
        return await self._finish(result, entries)

    async def _commit_latency(self, ids: list[str], timeout_s: float = 30) -> dict[str, Any]:
        """Request → COMMITTED, by the server clock: the COMMITTED transition's time minus
        the COMMIT_IN_PROGRESS transition's (both stamped by Redis TIME in the scripts and
        recorded in reservation_history once drained)."""
        query = """
            SELECT c.at - p.at AS took FROM reservation_history p
            JOIN reservation_history c ON c.reservation_id = p.reservation_id
                                      AND c.to_state = 'COMMITTED'
            WHERE p.to_state = 'COMMIT_IN_PROGRESS' AND p.reservation_id = ANY($1::text[])"""
        deadline = time.monotonic() + timeout_s
        while True:
            async with self.env.pool.acquire() as conn:
                rows = await conn.fetch(query, ids)
            if len(rows) >= len(ids) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        took = sorted(r["took"].total_seconds() * 1000 for r in rows)
        if not took:
            return {"count": 0}

        def pct(q: float) -> float:
            return round(took[min(len(took) - 1, int(q * len(took)))], 2)

        return {"count": len(took), "p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99),
                "max": round(took[-1], 2)}

    async def lifecycle(self) -> dict[str, Any]:
        c = self.config
        entries: list[h.Entry] = []
        phases, notes = {}, []
        port = await self.api_port()
        lag_samples: list[dict] = []
        if port is not None:
            resources = await self.vendor("life", resources=16, confirmation_required=True)
            self.start_workers(c.queue_workers)
            # Earlier scenarios left their transition events in the streams: drain those
            # first, so the lag measured during the walk is the walk's own.
            phases["earlier_events"] = await self._drain_streams(timeout_s=180)
            sampler = asyncio.create_task(self._sample_lag(lag_samples))
            try:
                phases["walk"] = await self.phase(
                    "lifecycle: create, confirm, commit (API)", "http_walk",
                    Pattern("distinct", tuple(resources)), entries, http=self._http(),
                    server=self.api[0])
                committed = [e.id for e in entries if e.op == h.COMMIT and e.outcome == h.OK]
                t0 = time.monotonic()
                done = await self._wait_committed(committed, timeout_s=60)
                phases["walk"]["walks_committed"] = done
                phases["walk"]["walks_per_s"] = round(done / phases["walk"]["seconds"], 1) \
                    if phases["walk"]["seconds"] else 0
                phases["walk"]["drain_after_load_s"] = round(time.monotonic() - t0, 3)
                latency = phases["walk"]["commit_latency_ms"] = \
                    await self._commit_latency(committed)
                if latency["count"]:
                    notes.append(f"commit latency (request to COMMITTED, server clock) over "
                                 f"{latency['count']} walks: p50 {latency['p50']} ms, "
                                 f"p99 {latency['p99']} ms")
            finally:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
                codes = self.stop_workers()
            entries += await self._committed_reads(committed)
            if any(code not in (0, None) for code in codes):
                notes.append(f"worker exit codes {codes}")
        else:
            notes.append("the HTTP API (api/) is not in this build: the API walk was skipped")
        phases["drain"] = await self.drain_backlog(entries)
        result = {
            "description": "reservations walked to COMMITTED through the API with workers "
                           "draining; then a backlog drained by fresh workers",
            "phases": phases,
            "commit_queue_lag": _lag_summary(lag_samples),
            "targets": [_target("commit-queue drain >= 5,000 bookings/s with audit rows",
                                phases["drain"]["bookings_with_audit_per_s"]
                                if phases["drain"]["audit_rows_complete"] else 0, 5_000)],
            "notes": notes,
        }
        return await self._finish(result, entries)

    async def baselines_scenario(self) -> dict[str, Any]:
        names = ["bare_single_call_1p", "bare_single_call", "pg_exclusion_hot", "pg_lock_hot",
                 "pg_exclusion_distinct", "pg_endpoint_hot", "pg_endpoint_distinct"]
        if api_available():
            names += ["http_hello", "http_bare_hold"]
        phases = {name: await self.baseline(name) for name in names}
        entries = self._take_baseline_history(*names)
        result = {"description": "the ceilings the scenarios are held against, this run",
                  "phases": phases, "notes": [] if api_available() else
                  ["HTTP baselines need the API's uvicorn setup; skipped"]}
        return await self._finish(result, entries)

    # ---- pieces ----------------------------------------------------------------------------
    def _http(self) -> dict[str, Any]:
        return {"port": self.api[1], "partner_key": self.env.partner_key,
                "vendor_keys": self.env.vendor_keys, "idempotency": True}

    async def _finish(self, result: dict[str, Any], entries: list[h.Entry]) -> dict[str, Any]:
        for phase in result["phases"].values():
            phase.pop("history", None)
        report = await self.verify(entries)
        result["violations"] = len(report.violations)
        result["verifier"] = report.as_dict()
        return result

    async def memory_per_hold(self) -> dict[str, Any]:
        """MEMORY USAGE of the keys live holds add (record, units; the fence counter per
        resource is shared), over holds of two units placed through HoldEngine."""
        import redis.asyncio as aioredis

        from engine.access import RedisAccess
        from benchmarks.holds import HoldEngine
        from engine.keys import KeySpace
        from engine.resources import Resource, ResourceCatalog

        s = self.env.settings.replace(key_prefix=self.env.settings.key_prefix + "mem:")
        from engine.connection import open_redis

        client = open_redis(s, health_check_interval=0)
        try:
            keys = KeySpace(s.key_prefix, s.shards)
            catalog = ResourceCatalog([Resource(f"mem-{i}") for i in range(16)])
            access = RedisAccess(client)
            engine = HoldEngine(access, keys, catalog, s)
            n = self.config.memory_holds
            for start in range(0, n, 1000):
                await asyncio.gather(*(
                    engine.place(f"mem-{i % 16}", T0 + (i // 16) * 2 * UNIT,
                                 T0 + (i // 16) * 2 * UNIT + 2 * UNIT, ttl_ms=LONG_TTL_MS)
                    for i in range(start, min(n, start + 1000))))
            total = count = 0
            async for key in client.scan_iter(match=f"{s.key_prefix}*", count=5000):
                total += await client.memory_usage(key, samples=0) or 0
                count += 1
            await _close_access(access)
        finally:
            await client.aclose()
        return {"holds": n, "units_per_hold": 2, "keys": count,
                "bytes_per_hold": round(total / n) if n else 0,
                "method": "sum of MEMORY USAGE over the holds' keys / holds"}

    async def drain_backlog(self, entries: list[h.Entry]) -> dict[str, Any]:
        """N reservations committed with no worker running, then fresh workers drain them."""
        from engine.access import RedisAccess
        from engine.directory import load_catalog
        from engine.rehydration import ensure_rehydrated
        from engine.reservations import ReservationEngine

        c = self.config
        resources = await self.vendor("drain", resources=16)
        vendor_id = resources[0].vendor_id
        async with self.env.pool.acquire() as conn:
            catalog = await load_catalog(conn)
        access = RedisAccess(self.env.redis)
        await access.load_scripts()
        await ensure_rehydrated(access, self.env.keys, self.env.pool, catalog,
                                self.env.settings)
        engine = ReservationEngine(access, self.env.keys, catalog, self.env.settings)

        async def one(i: int) -> str:
            r = resources[i % len(resources)]
            start = T0 + (i // len(resources)) * 2 * UNIT
            first, last = r.units(start, start + UNIT)
            sent = time.monotonic()
            moved = await engine.create(partner_id="bench-partner", vendor_id=vendor_id,
                                        resource_id=r.id, start_ms=start, end_ms=start + UNIT,
                                        requester_id="bench")
            rid = moved.reservation_id
            entries.append(h.Entry(h.CREATE, h.OK, rid, r.id, first, last, sent,
                                   time.monotonic()))
            sent = time.monotonic()
            await engine.act(rid, "commit", actor="partner")
            entries.append(h.Entry(h.COMMIT, h.OK, rid, r.id, 0, -1, sent, time.monotonic()))
            return rid

        label = "lifecycle: building the drain backlog"
        if self.progress:
            self.progress(label, 0.0)
        ids: list[str] = []
        built = 0
        step = max(1, c.drain_backlog // 100)

        async def counted(i: int) -> str:
            nonlocal built
            rid = await one(i)
            built += 1
            if self.progress and built % step == 0:  # the bar moves while it builds
                self.progress(label, built / c.drain_backlog)
            return rid

        for start in range(0, c.drain_backlog, 1000):
            ids += await asyncio.gather(*(counted(i) for i in range(
                start, min(c.drain_backlog, start + 1000))))
        if self.progress:
            self.progress(label, 1.0)
        # The backlog's bookings are the only ones of their vendor from T0 on: counted
        # through the live-end index (never a scan of a table that may hold 10^6 rows).
        since = datetime.fromtimestamp(T0 / 1000, UTC)
        count_sql = ("SELECT count(*) FROM bookings WHERE block_end >= $2 AND "
                     "cancelled_at IS NULL AND vendor_id = $1")
        started = time.monotonic()
        redis_cpu0 = process_cpu_s(self.redis_pid) if self.redis_pid else None
        self.start_workers(c.queue_workers)
        first_seen = None
        booked = 0
        try:
            deadline = started + max(60.0, c.drain_backlog / 500)
            while time.monotonic() < deadline:
                async with self.env.pool.acquire() as conn:
                    if first_seen is None:  # 20 ms resolution for the start, cheaply
                        booked = 1 if await conn.fetchval(
                            "SELECT EXISTS (SELECT 1 FROM bookings WHERE block_end >= $2 AND "
                            "cancelled_at IS NULL AND vendor_id = $1)", vendor_id, since) \
                            else 0
                    else:
                        booked = await conn.fetchval(count_sql, vendor_id, since)
                if booked and first_seen is None:
                    first_seen = time.monotonic()
                    continue
                if self.progress:
                    self.progress("lifecycle: draining the backlog", booked / len(ids))
                if booked >= len(ids):
                    break
                await asyncio.sleep(0.02 if first_seen is None else 0.05)
            all_booked = time.monotonic()
            committed = await self._wait_committed(ids, timeout_s=60)
            finalized = time.monotonic()
            # Every transition (the final COMMITTED one too) reaches the audit log through
            # the stream: the backlog is done when its audit rows are all there.
            versions = await self._versions(ids)
            audit = 0
            audit_deadline = time.monotonic() + 60
            while time.monotonic() < audit_deadline:
                async with self.env.pool.acquire() as conn:
                    audit = await conn.fetchval(
                        "SELECT count(*) FROM audit_log WHERE reservation_id = ANY($1::text[])",
                        ids)
                if audit >= versions:
                    break
                await asyncio.sleep(0.05)
            audited = time.monotonic()
            worker_cpu = sum(w.cpu_s() for w in self.workers)
            redis_cpu = process_cpu_s(self.redis_pid) - redis_cpu0 \
                if redis_cpu0 is not None else None
        finally:
            codes = self.stop_workers()
            await _close_access(access)
        entries += await self._committed_reads(ids)
        steady = all_booked - (first_seen or started)
        return {
            "backlog": len(ids), "booked": booked, "committed": committed,
            "workers": c.queue_workers, "worker_exit_codes": codes,
            "seconds_from_worker_start": round(all_booked - started, 3),
            "seconds_first_to_last_booking": round(steady, 3),
            "bookings_per_s": round(booked / steady, 1) if steady > 0 else None,
            "bookings_per_s_including_start": round(booked / (all_booked - started), 1),
            "seconds_to_all_committed": round(finalized - started, 3),
            "seconds_to_all_audited": round(audited - started, 3),
            "bookings_with_audit_per_s": round(booked / (audited - (first_seen or started)), 1),
            "events_per_s": round(versions / (audited - (first_seen or started)), 1),
            "audit_rows": audit, "audit_rows_expected": versions,
            "audit_rows_complete": audit == versions and booked == len(ids),
            # CPU from worker start to the last audit row (start-up included), per booking.
            "worker_cpu_us_per_booking": round(worker_cpu / booked * 1e6, 1) if booked else None,
            "redis_cpu_us_per_booking_raw": round(redis_cpu / booked * 1e6, 1)
            if booked and redis_cpu is not None else None,
            "note": "first booking polled every 20 ms, then the count every 50 ms (through "
                    "the live-end index); *_including_start counts from worker start "
                    "(process start-up included)",
        }

    async def _versions(self, ids: list[str]) -> int:
        """Sum of the reservations' versions: one transition event (audit row) each."""
        versions = 0
        for chunk in range(0, len(ids), 1000):
            pipe = self.env.redis.pipeline(transaction=False)
            for rid in ids[chunk:chunk + 1000]:
                pipe.hget(self.env.keys.reservation(rid), "v")
            versions += sum(int(v or 0) for v in await pipe.execute())
        return versions

    async def _drain_streams(self, timeout_s: float) -> dict[str, Any]:
        """Wait until every shard's stream is empty and nothing is pending."""
        started = time.monotonic()
        first = None
        while time.monotonic() - started < timeout_s:
            length = sum([await self.env.redis.xlen(self.env.keys.events(s))
                          for s in range(self.env.keys.shards)])
            if first is None:
                first = length
            if self.progress:
                self.progress("lifecycle: draining earlier events",
                              1.0 - length / first if first else 1.0)
            if length == 0:
                break
            await asyncio.sleep(0.05)
        return {"events_at_start": first, "events_left": length,
                "seconds": round(time.monotonic() - started, 3),
                "note": "create/cancel events of the earlier scenarios, drained by the "
                        "workers before the walk (worker start-up included)"}

    async def _wait_committed(self, ids: list[str], timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            still = []
            for chunk in range(0, len(pending), 1000):
                part = pending[chunk:chunk + 1000]
                pipe = self.env.redis.pipeline(transaction=False)
                for rid in part:
                    pipe.hget(self.env.keys.reservation(rid), "st")
                still += [rid for rid, st in zip(part, await pipe.execute())
                          if st == "COMMIT_IN_PROGRESS"]
            pending = still
            if pending:
                await asyncio.sleep(0.05)
        return len(ids) - len(pending)

    async def _committed_reads(self, ids: list[str]) -> list[h.Entry]:
        """Read every committed reservation back; COMMITTED answers enter the history."""
        out = []
        for chunk in range(0, len(ids), 1000):
            part = ids[chunk:chunk + 1000]
            pipe = self.env.redis.pipeline(transaction=False)
            for rid in part:
                pipe.hget(self.env.keys.reservation(rid), "st")
            now = time.monotonic()
            for rid, st in zip(part, await pipe.execute()):
                if st == "COMMITTED":
                    out.append(h.Entry(h.COMMITTED, h.OK, rid, sent=now, answered=now))
        return out

    async def _sample_lag(self, samples: list[dict]) -> None:
        from jobs.commit_queue import GROUP

        keys, client = self.env.keys, self.env.redis
        while True:
            length = pending = 0
            oldest = 0
            now_ms = int(time.time() * 1000)
            for shard in range(keys.shards):
                stream = keys.events(shard)
                length += await client.xlen(stream)
                try:
                    summary = await client.xpending(stream, GROUP)
                except Exception:
                    continue
                pending += summary["pending"]
                if summary["pending"]:
                    oldest = max(oldest, now_ms - int(summary["min"].split("-")[0]))
            samples.append({"t": time.monotonic(), "stream_length": length,
                            "pending": pending, "oldest_pending_age_ms": oldest})
            await asyncio.sleep(0.25)


async def run_scenarios(run: Run, names: list[str]) -> dict[str, Any]:
    run.redis_pid = await redis_server_pid(run.env.redis)
    run.names = tuple(names)
    results: dict[str, Any] = {}
    handlers = {"hot_slot": run.hot_slot, "overlap_storm": run.overlap_storm,
                "lifecycle": run.lifecycle, "engine_vs_api": run.engine_vs_api,
                "baselines": run.baselines_scenario,
                "redis_cost": lambda: private_scenarios.redis_cost(run),
                "scale": lambda: private_scenarios.scale(run)}
    for name in names:
        started = time.monotonic()
        try:
            results[name] = await handlers[name]()
        except Exception as exc:  # a broken scenario is reported, not hidden
            import traceback

            results[name] = {"error": repr(exc), "violations": 0, "phases": {},
                             "traceback": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.monotonic() - started, 2)
    await private_scenarios.close_private_stack(run)
    return results


async def _close_access(access) -> None:
    if hasattr(access, "close"):  # the raw RESP connection of engine/access.py
        await access.close()


def config_dict(config: BenchConfig) -> dict[str, Any]:
    return asdict(config)


def _ratio(top: dict | None, base: dict | None) -> float | None:
    if not top or not base or not base.get("throughput_per_s"):
        return None
    return round(top["throughput_per_s"] / base["throughput_per_s"], 3)


def _target(name: str, value, bound: float, *, higher: bool = True) -> dict[str, Any]:
    met = None if value is None else (value >= bound if higher else value <= bound)
    return {"target": name, "value": value, "bound": bound,
            "direction": ">=" if higher else "<=", "met": met}


def _lag_summary(samples: list[dict]) -> dict[str, Any]:
    if not samples:
        return {"samples": 0}
    return {"samples": len(samples),
            "max_stream_length": max(s["stream_length"] for s in samples),
            "max_pending": max(s["pending"] for s in samples),
            "max_oldest_pending_age_ms": max(s["oldest_pending_age_ms"] for s in samples),
            "mean_stream_length": round(sum(s["stream_length"] for s in samples)
                                        / len(samples), 1)}
