"""The scenarios that run against a PRIVATE redis-server (benchmarks/private_redis.py).

6. ``redis_cost``: what one request costs Redis, by script. Against a private Redis and an
   API instance of its own (same uvicorn setup as every HTTP phase), three load phases
   measure Redis process CPU (/proc), ``INFO commandstats`` and ``total_reads_processed``
   deltas and the API workers' CPU per request: successful creates (distinct slots),
   conflicting creates (every request on a slot already held) and HoldEngine placements
   (the engine's cost per placed hold, the yardstick of the issue). Then the same three,
   one request at a time, with the slow log at 0 µs: every command lands there with its
   own execution time, and an ``EVALSHA``'s SHA names its script, so the time splits by
   script; the read events Redis processed per request are the request's round trips.
7. ``scale``: engine and API throughput and Redis bytes per live reservation at growing
   live sets (``scale_sizes``: 10^3 ... 10^6), built fast with concurrent creates through
   ``Runtime.reservations`` (coalesced into pipelined script batches); then the drain rate
   with ``scale_bookings`` (10^4, 10^6) past bookings already in the ``bookings`` table
   (filled by COPY).
"""

from __future__ import annotations

import asyncio
import datetime
import time
from pathlib import Path
from typing import Any

from benchmarks import history as h
from benchmarks.cpu import process_cpu_s
from benchmarks.env import PARTNER
from benchmarks.load import T0, Pattern, ResourceSpec
from benchmarks.servers import Managed, start_api

UNIT = 15 * 60_000
# Commands the bench itself sends to the private Redis (never part of a request's cost).
OWN_COMMANDS = frozenset({"info", "slowlog", "config", "ping", "script", "client", "hello",
                          "select", "command"})


class PrivateStack:
    """A private Redis and an API instance (and settings) pointing at it."""

    def __init__(self, run, maxmemory_mb: int) -> None:
        self.run = run
        self.maxmemory_mb = maxmemory_mb
        self.redis = None
        self.api: tuple[Managed, int] | None = None
        self.client = None
        self.settings = None

    async def start(self) -> PrivateStack:
        import redis.asyncio as aioredis

        from benchmarks.private_redis import PrivateRedis

        self.redis = await asyncio.to_thread(PrivateRedis, maxmemory_mb=self.maxmemory_mb)
        self.settings = self.run.env.settings.replace(redis_url=self.redis.url)
        self.client = aioredis.Redis.from_url(self.redis.url, decode_responses=True)
        return self

    async def api_port(self) -> int:
        if self.api is None:
            log_dir = Path(self.run.env.log_dir) / f"private-{self.redis.port}"
            log_dir.mkdir(exist_ok=True)
            self.api = await asyncio.to_thread(start_api, self.settings,
                                               self.run.config.http_workers, log_dir)
        return self.api[1]

    def http(self) -> dict[str, Any]:
        env = self.run.env
        return {"port": self.api[1], "partner_key": env.partner_key,
                "vendor_keys": env.vendor_keys, "idempotency": True}

    async def stop(self) -> None:
        if self.api is not None:
            await asyncio.to_thread(self.api[0].stop)
            self.api = None
        if self.client is not None:
            await self.client.aclose()
        if self.redis is not None:
            await asyncio.to_thread(self.redis.stop)


async def private_stack(run) -> PrivateStack:
    """The run's private Redis and API (one for redis_cost and scale, started once)."""
    if getattr(run, "private", None) is None:
        sizes = run.config.scale_sizes if "scale" in getattr(run, "names", ("scale",)) else ()
        # ~2 KiB per live reservation today, its stream entries until the next trim, the
        # phases' own writes; noeviction (a full Redis fails the scenario, never evicts).
        run.private = await PrivateStack(
            run, maxmemory_mb=max(512, max(sizes, default=0) * 4 // 1024 + 1024)).start()
    return run.private


async def close_private_stack(run) -> None:
    stack = getattr(run, "private", None)
    run.private = None
    if stack is not None:
        await stack.stop()


# ---- counters ---------------------------------------------------------------------------
async def counters(client, pid: int) -> dict[str, Any]:
    """One ``INFO all`` (one read event) and the process CPU."""
    info = await client.info("all")
    commands = {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                for k, v in info.items() if k.startswith("cmdstat_")}
    return {"cpu_s": process_cpu_s(pid), "reads": int(info["total_reads_processed"]),
            "commands_processed": int(info["total_commands_processed"]),
            "commands": commands, "used_memory": int(info["used_memory"])}


def deltas(before: dict, after: dict, ops: int) -> dict[str, Any]:
    """Per-operation figures between two snapshots (the closing INFO's read taken off)."""
    if not ops:
        return {}
    calls = {}
    for name, (n, usec) in after["commands"].items():
        n0, usec0 = before["commands"].get(name, (0, 0))
        if n - n0 and name not in OWN_COMMANDS:
            calls[name] = {"calls_per_op": round((n - n0) / ops, 3),
                           "usec_per_op": round((usec - usec0) / ops, 2)}
    scripts = [calls.get(k, {}) for k in ("evalsha", "eval")]
    return {
        "redis_cpu_us_per_op": round((after["cpu_s"] - before["cpu_s"]) / ops * 1e6, 2),
        # Script time includes the commands the scripts call (counted again by name below).
        "script_calls_per_op": round(sum(c.get("calls_per_op", 0) for c in scripts), 3),
        "script_usec_per_op": round(sum(c.get("usec_per_op", 0) for c in scripts), 2),
        "commands_per_op_incl_inside_scripts": round(
            sum(c["calls_per_op"] for c in calls.values()), 3),
        "read_events_per_op": round((after["reads"] - before["reads"] - 1) / ops, 3),
        "by_command": calls,
    }


def script_names() -> dict[str, str]:
    """SHA -> script name, from the engine's own script registry."""
    try:
        from engine.scripts import scripts

        return {s.sha: name for name, s in scripts().items()}
    except Exception:  # the registry moved: the SHAs stay as names
        return {}


def split_by_script(entries: list[dict], ops: int, names: dict[str, str]) -> dict[str, Any]:
    """Slow-log entries (every command, threshold 0) grouped by script, per operation.

    A command a script calls is logged too (Redis 7), from the script's client (address
    ``?:0``), just before the script's own entry: it is counted under that script as
    ``inside`` (its time is already part of the script's). Other commands are top-level.
    """
    if not ops:
        return {}
    groups: dict[str, dict[str, Any]] = {}
    inside: list[str] = []
    for entry in sorted(entries, key=lambda e: int(e.get("id") or 0)):
        command = entry.get("command") or ""
        if isinstance(command, bytes):
            command = command.decode(errors="replace")
        parts = command.split()
        if not parts:
            continue
        verb = parts[0].lower()
        address = entry.get("client_address") or ""
        if isinstance(address, bytes):
            address = address.decode(errors="replace")
        if address.startswith("?"):
            inside.append(verb)
            continue
        if verb in OWN_COMMANDS:
            inside.clear()
            continue
        if verb in ("evalsha", "eval") and len(parts) > 1:
            key = f"{verb} {names.get(parts[1], parts[1][:12])}"
        else:
            key = verb
        group = groups.setdefault(key, {"calls": 0, "us": 0, "inside": {}})
        group["calls"] += 1
        group["us"] += int(entry.get("duration") or 0)
        for called in inside:
            group["inside"][called] = group["inside"].get(called, 0) + 1
        inside.clear()
    out = {}
    for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["us"]):
        out[name] = {"calls_per_op": round(g["calls"] / ops, 3),
                     "us_per_op": round(g["us"] / ops, 2),
                     "us_per_call": round(g["us"] / g["calls"], 2)}
        if g["inside"]:
            out[name]["commands_inside_per_call"] = {
                k: round(v / g["calls"], 2) for k, v in sorted(g["inside"].items())}
    return out


# ---- redis_cost -------------------------------------------------------------------------
async def redis_cost(run) -> dict[str, Any]:
    c = run.config
    from benchmarks.env import api_available

    if not api_available():
        return {"description": "Redis cost per request", "phases": {}, "violations": 0,
                "notes": ["the HTTP API (api/) is not in this build"]}
    stack = await private_stack(run)
    entries: list[h.Entry] = []
    phases: dict[str, Any] = {}
    split: dict[str, Any] = {}
    notes: list[str] = []
    try:
        await stack.api_port()
        client, pid = stack.client, stack.redis.pid
        create_res = tuple(await run.vendor("cost", resources=16))
        hot_res = tuple(await run.vendor("costhot", resources=2, buffer_before_minutes=15,
                                         buffer_after_minutes=15))
        engine_res = tuple(ResourceSpec(f"cost-engine-{i}") for i in range(64))
        kinds = {
            "create": ("http_create", Pattern("distinct", create_res), True),
            "conflict": ("http_create", Pattern("hot", hot_res, hot_slots=c.hot_slots), True),
            "engine_place": ("hold", Pattern("distinct", engine_res), False),
        }
        # Under load: Redis process CPU, commandstats, read events, API worker CPU.
        for name, (workload, pattern, http) in kinds.items():
            before = await counters(client, pid)
            summary = await run.phase(
                f"redis cost: {name} (load)", workload, pattern, entries,
                http=stack.http() if http else None, settings=stack.settings, redis=client,
                redis_pid=pid, server=stack.api[0] if http else None,
                seconds=c.cost_seconds)
            after = await counters(client, pid)
            ops = _counted_ops(name, summary)
            summary["per_request"] = deltas(before, after, ops)
            summary["per_request"]["counted"] = ops
            summary["per_request"]["counted_as"] = _counted_as(name)
            phases[name] = summary
        # One at a time, slow log at 0 µs: time by script, round trips per request. Fresh
        # free slots for the creates and the placements; the hot slots stay held.
        kinds["create"] = ("http_create", Pattern(
            "distinct", tuple(await run.vendor("costseq", resources=16))), True)
        kinds["engine_place"] = ("hold", Pattern("distinct", tuple(
            ResourceSpec(f"cost-engine-seq-{i}") for i in range(64))), False)
        names = script_names()
        # What the idle servers read meanwhile (the API's background tasks), per second.
        idle_s = 1.0 if c.cost_sequential_ops >= 200 else 0.5
        idle0 = await counters(client, pid)
        await asyncio.sleep(idle_s)
        idle1 = await counters(client, pid)
        idle_reads_per_s = max(0.0, (idle1["reads"] - idle0["reads"] - 1) / idle_s)
        await client.config_set("slowlog-max-len", 1_000_000)
        await client.config_set("slowlog-log-slower-than", 0)
        try:
            for name, (workload, pattern, http) in kinds.items():
                await client.slowlog_reset()
                before = await counters(client, pid)
                t0 = time.monotonic()
                summary = await run.phase(
                    f"redis cost: {name} (one at a time)", workload, pattern, entries,
                    http=stack.http() if http else None, settings=stack.settings,
                    redis=client, redis_pid=pid, server=stack.api[0] if http else None,
                    concurrency=1, inline=True, max_ops=c.cost_sequential_ops,
                    seconds=max(10.0, c.seconds * 4))
                after = await counters(client, pid)
                window = time.monotonic() - t0
                log = await client.slowlog_get(-1)
                ops = _counted_ops(name, summary)
                d = deltas(before, after, ops)
                background = idle_reads_per_s * window / ops if ops else 0.0
                split[name] = {
                    "requests": summary["operations"], "counted": ops,
                    "outcomes": summary["outcomes"],
                    "round_trips_per_request": round(
                        (d.get("read_events_per_op") or 0) - background, 3),
                    "read_events_per_request_raw": d.get("read_events_per_op"),
                    "background_reads_per_s": idle_reads_per_s,
                    "commands_per_request_incl_inside_scripts": d.get(
                        "commands_per_op_incl_inside_scripts"),
                    "by_script": split_by_script(log, ops, names),
                    "slowlog_entries": len(log),
                    "latency_ms": summary["latency_ms"],
                }
                summary.pop("history", None)
        finally:
            await client.config_set("slowlog-log-slower-than", 10_000)
            await client.slowlog_reset()
        report = await run.verify(entries, drained=False, redis=client)
    finally:
        for phase in phases.values():
            phase.pop("history", None)
    engine = phases["engine_place"]["per_request"].get("redis_cpu_us_per_op")
    create = phases["create"]["per_request"].get("redis_cpu_us_per_op")
    conflict = phases["conflict"]["per_request"].get("redis_cpu_us_per_op")
    ratios = {"create_to_engine_place": _div(create, engine),
              "conflict_to_engine_place": _div(conflict, engine)}
    from benchmarks.scenarios import _target

    # The slow log gives each script's share; logging every command a script runs costs
    # inside the script's own time, so the absolute µs come from the load phase's
    # commandstats (script time per request), split by those shares.
    for kind in kinds:
        seq_scripts = {k: v for k, v in split.get(kind, {}).get("by_script", {}).items()
                       if k.startswith("eval")}
        total = sum(v["us_per_op"] for v in seq_scripts.values())
        load_us = phases[kind]["per_request"].get("script_usec_per_op")
        for v in seq_scripts.values():
            v["share_of_script_time"] = round(v["us_per_op"] / total, 3) if total else None
            v["us_per_op_under_load"] = round(load_us * v["us_per_op"] / total, 2) \
                if total and load_us else None
    for kind in kinds:
        per = phases[kind]["per_request"]
        seq = split.get(kind, {})
        scripts = ", ".join(f"{k.split(' ', 1)[1]} {v['us_per_op_under_load']}"
                            for k, v in seq.get("by_script", {}).items()
                            if k.startswith("eval"))
        notes.append(
            f"{kind}: Redis CPU {per.get('redis_cpu_us_per_op')} µs per {_counted_as(kind)} "
            f"under load (script time {per.get('script_usec_per_op')} µs in "
            f"{per.get('script_calls_per_op')} calls), split by script (slow-log shares): {scripts}; "
            f"round trips {seq.get('round_trips_per_request')}"
            + (f"; HTTP server CPU {phases[kind].get('server_cpu_us_per_op')} µs per request"
               if phases[kind].get("server_cpu_us_per_op") else ""))
    return {
        "description": "Redis CPU per request by script, API worker CPU per request, round "
                       "trips per request; private Redis, API instance of its own",
        "phases": phases, "by_script": split, "ratios": ratios,
        "redis_cpu_us": {"create": create, "conflict": conflict, "engine_place": engine},
        "api_worker_cpu_us_per_request": {
            k: phases[k].get("server_cpu_us_per_op") for k in ("create", "conflict")},
        "method": "load phases: Redis process CPU from /proc/<pid>/stat and INFO commandstats "
                  "deltas over the phase / counted requests (private Redis: nothing else "
                  "moves it); by script: a sequential phase with slowlog-log-slower-than 0, "
                  "each slow-log entry's EVALSHA SHA mapped to the script's name "
                  "(engine.scripts); round trips: INFO stats total_reads_processed delta "
                  "per request, one request at a time",
        "targets": [
            _target("Redis CPU per successful create <= 3x the engine's per placed hold",
                    ratios["create_to_engine_place"], 3.0, higher=False),
            _target("Redis CPU per conflicting create <= 1.5x the engine's per placed hold",
                    ratios["conflict_to_engine_place"], 1.5, higher=False),
        ],
        "notes": notes,
        "violations": len(report.violations), "verifier": report.as_dict(),
    }


def _counted_ops(kind: str, summary: dict) -> int:
    outcomes = summary.get("outcomes", {})
    if kind == "create":
        return outcomes.get("ok", 0)
    if kind == "conflict":
        return outcomes.get("conflict", 0)
    return outcomes.get("ok", 0)


def _counted_as(kind: str) -> str:
    return {"create": "201 creates", "conflict": "409 conflicts (the few first winners "
            "of each slot ride along)", "engine_place": "placed holds"}[kind]


def _div(a, b):
    return round(a / b, 3) if a and b else None


# ---- scale ------------------------------------------------------------------------------
async def build_live_set(runtime, vendor_id: str, resources: list[ResourceSpec], start: int,
                         count: int, progress=None, window: int = 2000,
                         between=None) -> float:
    """``count`` live reservations through ``Runtime.reservations.create`` (coalesced into
    pipelined batches); answers creates per second. ``between()`` is awaited every 50,000
    creates (the streams' trim: 7 entries a creation would take ~2 KiB more each)."""
    started = time.monotonic()
    done = 0

    async def one(i: int) -> None:
        r = resources[i % len(resources)]
        slot = T0 + (i // len(resources)) * 2 * r.unit_ms
        await runtime.reservations.create(partner_id=PARTNER, vendor_id=vendor_id,
                                          resource_id=r.id, start_ms=slot,
                                          end_ms=slot + r.unit_ms, requester_id="bench")

    for chunk in range(start, start + count, window):
        await asyncio.gather(*(one(i) for i in range(chunk, min(start + count,
                                                               chunk + window))))
        done += min(window, start + count - chunk)
        if progress:
            progress(done / count)
        if between is not None and done % 50_000 < window:
            await between()
    took = time.monotonic() - started
    return round(count / took, 1) if took else 0.0


async def trim_streams(client, keys) -> int:
    """Empty the commit-queue streams (no worker drains the private Redis; a live
    reservation's cost is its record, history, units, deadline and cap entry)."""
    trimmed = 0
    for shard in range(keys.shards):
        trimmed += await client.xtrim(keys.events(shard), maxlen=0, approximate=False)
    return trimmed


async def memory_by_kind(client, prefix: str, per: int) -> dict[str, Any]:
    """MEMORY USAGE of every key of the prefix, summed by kind (the part of the key name
    after the hash tag: ``r`` record, ``rh`` history, ``u`` unit, ``deadlines``, ...), in
    bytes per live reservation (``per``); pipelined, read-only."""
    by_kind: dict[str, list[int]] = {}
    batch: list[str] = []

    async def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.memory_usage(key, samples=0)
        for key, used in zip(batch, await pipe.execute()):
            rest = key.partition("}:")[2]
            kind = rest.partition(":")[0] if rest else key.removeprefix(prefix).split(":")[0]
            slot = by_kind.setdefault(kind, [0, 0])
            slot[0] += 1
            slot[1] += int(used or 0)
        batch.clear()

    async for key in client.scan_iter(match=f"{prefix}*", count=10_000):
        batch.append(key)
        if len(batch) >= 5_000:
            await flush()
    if batch:
        await flush()
    # Records of reservations the phases cancelled stay for their retention time: count
    # per reservation record present, live or not.
    records = by_kind.get("r", [0, 0])[0] or per
    return {"reservation_records": records,
            "by_kind": {kind: {"keys": n, "bytes_per_key": round(used / n, 1) if n else None,
                               "bytes_per_record": round(used / records, 1) if records
                               else None}
                        for kind, (n, used) in sorted(by_kind.items(),
                                                      key=lambda kv: -kv[1][1])}}


async def prefill_bookings(pool, schema: str, have: int, want: int, progress=None) -> float:
    """``want - have`` past, uncancelled bookings (every index and the exclusion constraint
    hold them; rehydration skips them, they have ended) by COPY; answers rows per second."""
    base = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    hour = datetime.timedelta(hours=1)
    half = datetime.timedelta(minutes=30)
    started = time.monotonic()
    columns = ["id", "reservation_id", "resource_key", "resource_id", "vendor_id",
               "partner_id", "requester_id", "slot_start", "slot_end", "block_start",
               "block_end"]
    chunk = 50_000
    async with pool.acquire() as conn:
        for low in range(have, want, chunk):
            rows = []
            for i in range(low, min(want, low + chunk)):
                k = i % 4096
                at = base + (i // 4096) * hour
                rows.append((f"prefill_{i}", f"prefill_r_{i}", k, f"prefill-{k}", "prefill",
                             "prefill", "prefill", at, at + half, at, at + half))
            await conn.copy_records_to_table("bookings", records=rows, columns=columns,
                                             schema_name=schema)
            if progress:
                progress((min(want, low + chunk) - have) / (want - have))
        await conn.execute(f'ANALYZE "{schema}".bookings')
    took = time.monotonic() - started
    return round((want - have) / took, 1) if took else 0.0


async def scale(run) -> dict[str, Any]:
    from benchmarks.env import api_available
    from engine.runtime import Runtime

    c = run.config
    sizes = sorted(set(c.scale_sizes))
    stack = await private_stack(run)
    entries: list[h.Entry] = []
    shared_entries: list[h.Entry] = []
    points: list[dict[str, Any]] = []
    notes: list[str] = []
    drains: list[dict[str, Any]] = []
    phases: dict[str, Any] = {}
    runtime = None
    try:
        client, pid = stack.client, stack.redis.pid
        if api_available():
            await stack.api_port()
        resources = await run.vendor("scale", resources=64)
        long = 4 * 3_600_000
        build_settings = stack.settings.replace(hold_ttl_ms=long, confirmed_ttl_ms=long,
                                                authorized_ttl_ms=long, redis_batch_max=256,
                                                redis_max_inflight_batches=4)
        runtime = await Runtime.open(build_settings, pool_max_size=2)
        keys = runtime.keys
        live = 0
        for n in sizes:
            add = n - live
            await trim_streams(client, keys)
            before = await counters(client, pid)
            tick = (lambda f, n=n: run.progress(f"scale: building {n:,} live", f)) \
                if run.progress else None
            trimmed = 0

            async def trim() -> None:
                nonlocal trimmed
                trimmed += await trim_streams(client, keys)

            rate = await build_live_set(runtime, resources[0].vendor_id, resources, live, add,
                                        tick, between=trim)
            await trim()
            after = await counters(client, pid)
            live = n
            point: dict[str, Any] = {
                "live_reservations": n, "built": add, "build_creates_per_s": rate,
                "bytes_per_live_reservation": round(
                    (after["used_memory"] - before["used_memory"]) / add, 1) if add else None,
                "used_memory": after["used_memory"],
                "redis_cpu_us_per_build_create": round(
                    (after["cpu_s"] - before["cpu_s"]) / add * 1e6, 2) if add else None,
                "stream_entries_trimmed": trimmed,
            }
            if n == sizes[-1]:  # where the bytes go, by key kind (largest set only)
                point["memory_usage_by_kind"] = await memory_by_kind(
                    client, stack.settings.key_prefix, n)
            engine_res = tuple(ResourceSpec(f"scale{n}-engine-{i}") for i in range(64))
            # Each phase gives back what it places (release / cancel at once, not rated), so
            # the live set stays at its size from one point to the next.
            engine = await run.phase(f"scale {n:,}: HoldEngine", "hold",
                                     Pattern("distinct", engine_res), entries, release=True,
                                     settings=stack.settings, redis=client, redis_pid=pid,
                                     seconds=c.scale_seconds)
            phases[f"engine_{n}"] = engine
            point["engine_per_s"] = engine["throughput_per_s"]
            if stack.api is not None:
                api_res = tuple(await run.vendor(f"scaleapi{n}", resources=16))
                api = await run.phase(f"scale {n:,}: POST /v1/reservations", "http_create",
                                      Pattern("distinct", api_res), entries, release=True,
                                      http=stack.http(), settings=stack.settings,
                                      redis=client, redis_pid=pid, server=stack.api[0],
                                      seconds=c.scale_seconds)
                phases[f"api_{n}"] = api
                point["api_per_s"] = api["throughput_per_s"]
                point["api_p99_ms"] = api["latency_ms"]["p99"]
            point["used_memory_after_phases"] = (await counters(client, pid))["used_memory"]
            points.append(point)
        await runtime.close()
        runtime = None
        report_private = await run.verify(entries, drained=False, redis=client)
    finally:
        if runtime is not None:
            await runtime.close()
        await close_private_stack(run)  # the live set goes with it
    # Drain with past bookings already in the table (the run's own schema, shared Redis).
    have = 0
    for want in sorted(set(c.scale_bookings)):
        tick = (lambda f, w=want: run.progress(f"scale: {w:,} bookings by COPY", f)) \
            if run.progress else None
        copy_rate = await prefill_bookings(run.env.pool, run.env.settings.db_schema, have,
                                           want, tick)
        have = want
        drain = await run.drain_backlog(shared_entries)
        drain["bookings_in_table_before"] = want
        drain["prefill_rows_per_s"] = copy_rate
        drains.append(drain)
        phases[f"drain_{want}"] = drain
    report_shared = await run.verify(shared_entries)
    first, last = (points[0], points[-1]) if points else ({}, {})
    from benchmarks.scenarios import _target

    def kept(key):
        return _div(last.get(key), first.get(key)) if len(points) > 1 else None

    # The largest build amortises what a first reservation pays once (new hash tables).
    max_bytes = last.get("bytes_per_live_reservation")
    big_drain = drains[-1] if drains else {}
    for p in points:
        notes.append(f"{p['live_reservations']:,} live: {p['bytes_per_live_reservation']} B "
                     f"each, HoldEngine {p['engine_per_s']}/s, API {p.get('api_per_s')}/s "
                     f"(built at {p['build_creates_per_s']}/s)")
    for d in drains:
        notes.append(f"drain with {d['bookings_in_table_before']:,} bookings in the table: "
                     f"{d['bookings_with_audit_per_s']}/s with audit rows "
                     f"(backlog {d['backlog']:,}, complete {d['audit_rows_complete']})")
    result = {
        "description": "engine and API throughput and Redis bytes per live reservation as "
                       "the live set grows (private Redis); drain rate with bookings "
                       "already in the table",
        "phases": phases, "points": points, "drains": [
            {k: d.get(k) for k in ("bookings_in_table_before", "backlog",
                                   "bookings_with_audit_per_s", "bookings_per_s",
                                   "audit_rows_complete", "prefill_rows_per_s")}
            for d in drains],
        "ratios": {"engine_largest_to_smallest": kept("engine_per_s"),
                   "api_largest_to_smallest": kept("api_per_s")},
        "method": "bytes: INFO memory used_memory delta over the build / reservations built "
                  "(commit-queue streams trimmed before and after: no worker drains them "
                  "here); throughput: load phases on distinct slots of resources outside the "
                  "live set, each win released (HoldEngine) or cancelled (API) at once and "
                  "not rated, so the live set keeps its size",
        "targets": [
            _target(f"<= 1 KiB of Redis per live reservation (at {last.get('live_reservations')})",
                    max_bytes, 1024, higher=False),
            _target(f"API throughput at {last.get('live_reservations')} live within 20 % of "
                    f"that at {first.get('live_reservations')}", kept("api_per_s"), 0.8),
            _target(f"engine throughput at {last.get('live_reservations')} live within 20 % "
                    f"of that at {first.get('live_reservations')}", kept("engine_per_s"), 0.8),
            _target(f"drain >= 3,000 bookings/s with {big_drain.get('bookings_in_table_before')}"
                    " bookings in the table", big_drain.get("bookings_with_audit_per_s")
                    if big_drain.get("audit_rows_complete") else 0 if big_drain else None,
                    3000),
        ],
        "notes": notes,
        "violations": len(report_private.violations) + len(report_shared.violations),
        "verifier": report_private.as_dict(),
        "verifier_shared": report_shared.as_dict(),
    }
    for phase in phases.values():
        phase.pop("history", None)
    return result
