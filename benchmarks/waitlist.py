"""Waitlist handoff benchmark (issue 16): ``python -m benchmarks.waitlist``.

Against a private redis-server (benchmarks/private_redis.py: its own port and temp dir,
stopped at the end), two measurements:

1. **Redis CPU per script call** (``INFO commandstats``, ``usec_per_call`` of EVALSHA, reset
   before each phase, each phase calling one script only, one call at a time): the scripts
   this branch extends (``create_reservation``, ``transition`` for ``expire`` and ``cancel``)
   against the same scripts at the branch point (``--base``, default c34460e, read with
   ``git show``), with no waitlist, and with one waiting entry per slot (each call then also
   places the entry's hold: the handoff).
2. **Expiry → handoff latency** with a reaper loop on the worker's schedule (every
   ``--period-ms``, aligned to the period as arq's cron is to whole seconds): holds with
   deadlines spread over a few seconds, one waiting entry each; per handoff, the new hold's
   creation time (server clock) minus the old hold's deadline; every entry must be fulfilled
   exactly once (one creation event each).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

from benchmarks.private_redis import PrivateRedis
from engine import scripts as script_loader
from engine.access import RedisAccess
from engine.keys import KeySpace
from engine.limits import Limits
from engine.reservations import ReservationEngine
from engine.resources import MINUTE_MS, Resource, ResourceCatalog, Vendor
from engine.settings import Settings
from engine.waitlist import EntryPlacement, WaitlistEngine

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_893_456_000_000  # 2030-01-01, far ahead of any clock
UNIT = 15 * MINUTE_MS


def base_source(name: str, commit: str) -> str:
    """Script ``name`` as it was at ``commit``, includes expanded (generated ones as now)."""
    def read(relative: str) -> str:
        if relative.startswith("@"):
            return script_loader._generated(relative)  # noqa: SLF001
        return subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:lua/{relative}"],
                              check=True, capture_output=True, text=True).stdout
    return script_loader.expand(f"{name}.lua", read=read)


class Bench:
    def __init__(self, url: str, settings: Settings, base: str, pid: int) -> None:
        self.pid = pid
        self.redis = aioredis.Redis.from_url(url, decode_responses=True)
        self.access = RedisAccess(self.redis)
        self.settings = settings
        self.keys = KeySpace(settings.key_prefix, settings.shards)
        self.resources = [Resource(f"room-{i}", unit_ms=UNIT, vendor_id="v1")
                          for i in range(64)]
        self.catalog = ResourceCatalog(self.resources, [Vendor("v1", "room-0", True)])
        self.limits = Limits(self.access, self.keys, settings)
        self.engine = ReservationEngine(self.access, self.keys, self.catalog, settings,
                                        limits=self.limits)
        self.waitlist = WaitlistEngine(self.access, self.keys, settings)
        self.base = base
        self.base_sha: dict[str, str] = {}
        self.slot = 0

    async def setup(self) -> None:
        await self.engine.mark_ready()
        for name in ("create_reservation", "transition"):
            self.base_sha[name] = await self.redis.script_load(base_source(name, self.base))
            await self.redis.script_load(self.access.scripts[name].source)

    def next_slot(self) -> tuple[Resource, int, int]:
        self.slot += 1
        resource = self.resources[self.slot % len(self.resources)]
        start = T0 + (self.slot // len(self.resources)) * 2 * UNIT
        return resource, start, start + 2 * UNIT

    # ---- raw script calls (the engine's own argument lists) ------------------------------
    def create_call(self, ttl_ms: int):
        resource, start, end = self.next_slot()
        p = self.engine.placement(partner_id="p1", vendor=self.catalog.vendor("v1"),
                                  resource=resource, start_ms=start, end_ms=end,
                                  requester_id="r", metadata_text="{}", idempotency_key="",
                                  triggered_by="partner")
        s = self.settings
        shard = self.keys.shard_of(resource.id)
        keys = [self.keys.unit_root(shard), self.keys.reservation(p.reservation_id),
                self.keys.history(p.reservation_id), self.keys.fence(resource.id),
                self.keys.events(shard), self.keys.deadlines(shard), self.keys.ready(shard)]
        argv = [p.reservation_id, "p1", "v1", resource.id, "r", start, end, p.first_unit,
                p.last_unit, p.block_start_ms, p.block_end_ms, 1, 0, "{}", "", "partner",
                ttl_ms, s.confirmed_ttl_ms, s.authorized_ttl_ms, s.max_hold_units,
                s.record_retention_ms]
        return p, keys, argv

    def transition_call(self, rid: str, op: str):
        s = self.settings
        shard = self.keys.shard_of_id(rid)
        keys = [self.keys.unit_root(shard), self.keys.reservation(rid), self.keys.history(rid),
                self.keys.events(shard), self.keys.deadlines(shard)]
        argv = [rid, op, "timeout" if op == "expire" else "partner", "", "", "{}", "",
                s.hold_ttl_ms, s.confirmed_ttl_ms, s.authorized_ttl_ms, s.record_retention_ms,
                s.booked_marker_retention_ms, "", 0, s.max_hold_total_ms, s.max_extensions,
                "", "", ""]
        return keys, argv

    async def evalsha(self, sha: str, keys: list, argv: list):
        return await self.redis.evalsha(sha, len(keys), *keys, *argv)

    def sha(self, name: str, version: str) -> str:
        return self.base_sha[name] if version == "base" else self.access.scripts[name].sha

    async def hold(self, ttl_ms: int) -> tuple:
        p, keys, argv = self.create_call(ttl_ms)
        reply = await self.evalsha(self.sha("create_reservation", "new"), keys, argv)
        assert int(reply[0]) == 1, reply
        return p, int(reply[3])

    async def wait_entry(self, p) -> str:
        entry_id = self.keys.new_waitlist_entry_id(p.resource.shard_name)
        added = await self.waitlist.add(EntryPlacement(
            entry_id=entry_id, partner_id="p2", vendor=p.vendor, resource=p.resource,
            start_ms=p.start_ms, end_ms=p.end_ms, first_unit=p.first_unit,
            last_unit=p.last_unit, block_start_ms=p.block_start_ms,
            block_end_ms=p.block_end_ms, requester_id="r2", ttl_ms=3_600_000,
            metadata_text='{"origin":"waitlist"}'), cap_expires_at_ms=T0)
        assert added.entry.state == "waiting", added
        return entry_id

    def cpu_ns(self) -> int:
        """The private Redis's time on a CPU (/proc/<pid>/schedstat, ns): unlike
        commandstats' wall-clock usec it does not count the time the process waits for a
        CPU, which dominates on a loaded 2-core machine."""
        with open(f"/proc/{self.pid}/schedstat") as f:
            return int(f.read().split()[0])

    async def start(self) -> None:
        await self.redis.config_resetstat()
        self._cpu0 = self.cpu_ns()

    async def usec_per_call(self) -> tuple[float, int, float]:
        cpu = self.cpu_ns() - self._cpu0
        stats = await self.redis.info("commandstats")
        evalsha = stats.get("cmdstat_evalsha", {"usec": 0, "calls": 0})
        calls = max(1, evalsha["calls"])
        return evalsha["usec"] / calls, evalsha["calls"], cpu / 1000 / calls

    # ---- phases --------------------------------------------------------------------------
    async def phase_create(self, version: str, n: int) -> dict:
        calls = [self.create_call(600_000) for _ in range(n)]
        await self.start()
        for _, keys, argv in calls:
            reply = await self.evalsha(self.sha("create_reservation", version), keys, argv)
            assert int(reply[0]) == 1, reply
        usec, count, cpu = await self.usec_per_call()
        return {"usec_per_call": round(usec, 2), "cpu_us_per_call": round(cpu, 2),
                "calls": count}

    async def phase_transition(self, op: str, version: str, n: int, waitlisted: bool) -> dict:
        ttl = 1 if op == "expire" else 600_000
        made = [await self.hold(ttl) for _ in range(n)]
        if waitlisted:
            if op == "expire":  # an entry must be written before its hold lapses
                raise ValueError("expire with a waitlist is measured with a long ttl")
            for p, _ in made:
                await self.wait_entry(p)
        if op == "expire":
            await asyncio.sleep(0.05)
        await self.start()
        handed = 0
        for p, _ in made:
            keys, argv = self.transition_call(p.reservation_id, op)
            reply = await self.evalsha(self.sha("transition", version), keys, argv)
            assert int(reply[0]) == 1, reply
            handed += len(reply[7]) // 4 if len(reply) > 7 else 0
        usec, count, cpu = await self.usec_per_call()
        return {"usec_per_call": round(usec, 2), "cpu_us_per_call": round(cpu, 2),
                "calls": count, "handoffs": handed}

    async def phase_expire_waitlisted(self, version: str, n: int) -> dict:
        """Expiry with an entry per slot: holds long enough for the entries to be written
        meanwhile (15 ms per hold, at least 3 s), then the expiries once every deadline
        passed."""
        made = [await self.hold(max(3_000, 15 * n)) for _ in range(n)]
        for p, _ in made:
            await self.wait_entry(p)
        latest = max(d for _, d in made)
        while int((await self.redis.time())[0]) * 1000 <= latest + 1:
            await asyncio.sleep(0.05)
        await self.start()
        handed = 0
        for p, _ in made:
            keys, argv = self.transition_call(p.reservation_id, "expire")
            reply = await self.evalsha(self.sha("transition", version), keys, argv)
            assert int(reply[0]) == 1, reply
            handed += len(reply[7]) // 4 if len(reply) > 7 else 0
        usec, count, cpu = await self.usec_per_call()
        return {"usec_per_call": round(usec, 2), "cpu_us_per_call": round(cpu, 2),
                "calls": count, "handoffs": handed}

    async def latency(self, holds: int, period_ms: int, spread_ms: int) -> dict:
        """Holds with deadlines spread over ``spread_ms``, an entry each, a reaper loop."""
        before = await self._waitlist_creations()
        made = []
        for _ in range(holds):
            p, deadline = await self.hold(5_000 + random.randrange(spread_ms))
            made.append((p, deadline, await self.wait_entry(p)))
        stop = asyncio.Event()

        async def reaper() -> None:
            while not stop.is_set():
                for shard in range(self.keys.shards):
                    await self.engine.reap(shard)
                now = time.time() * 1000
                await asyncio.sleep((period_ms - now % period_ms) / 1000)

        task = asyncio.create_task(reaper())
        try:
            deadline_all = max(d for _, d, _ in made) + 3 * period_ms
            while int((await self.redis.time())[0]) * 1000 < deadline_all:
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await task
        lags, fulfilled = [], 0
        for p, deadline, entry_id in made:
            entry = await self.redis.hgetall(self.keys.waitlist_entry(entry_id))
            if entry.get("st") != "fulfilled":
                continue
            fulfilled += 1
            rec = await self.redis.hgetall(self.keys.reservation(entry["r"]))
            lags.append(int(rec["c"]) - deadline)
        creations = await self._waitlist_creations() - before
        lags.sort()
        return {"holds": holds, "fulfilled": fulfilled, "creation_events": creations,
                "period_ms": period_ms,
                "lag_ms": {"min": lags[0], "p50": statistics.median(lags),
                           "p99": lags[int(len(lags) * 0.99) - 1], "max": lags[-1]}}

    async def _waitlist_creations(self) -> int:
        count = 0
        for shard in range(self.keys.shards):
            for _, e in await self.redis.xrange(self.keys.events(shard)):
                count += e.get("origin") == "waitlist"
        return count

    async def close(self) -> None:
        await self.access.close()
        await self.redis.aclose()


async def main(args) -> dict:
    server = PrivateRedis()
    try:
        settings = Settings.from_env({}, redis_url=server.url, key_prefix="wb:", shards=16,
                                     partner_max_live_holds=0)
        bench = Bench(server.url, settings, args.base, server.pid)
        try:
            await bench.setup()
            out: dict = {"base": args.base, "n": args.n, "cpu": {}}
            rounds: dict[str, list[float]] = {}
            # Interleaved rounds: the shared machine's load drifts; medians per phase.
            for _ in range(args.rounds):
                for version in ("base", "new"):
                    for name, run in (
                            ("create", lambda v: bench.phase_create(v, args.n)),
                            ("cancel", lambda v: bench.phase_transition("cancel", v, args.n,
                                                                        False)),
                            ("expire", lambda v: bench.phase_transition("expire", v, args.n,
                                                                        False))):
                        got = await run(version)
                        print(f"{name}/{version}: {got}", file=sys.stderr, flush=True)
                        rounds.setdefault(f"{name}/{version}", []).append(got)
                got = await bench.phase_transition("cancel", "new", args.n, True)
                assert got["handoffs"] == args.n, got
                rounds.setdefault("cancel/new+handoff", []).append(got)
                got = await bench.phase_expire_waitlisted("new", args.n)
                assert got["handoffs"] == args.n, got
                rounds.setdefault("expire/new+handoff", []).append(got)
            out["cpu"] = {name: {
                "median_cpu_us_per_call": round(statistics.median(
                    g["cpu_us_per_call"] for g in v), 1),
                "median_commandstats_usec_per_call": round(statistics.median(
                    g["usec_per_call"] for g in v), 1),
                "rounds_cpu_us": [g["cpu_us_per_call"] for g in v]}
                for name, v in rounds.items()}
            out["latency"] = await bench.latency(args.holds, args.period_ms, args.spread_ms)
            out["load_average"] = os.getloadavg()
            return out
        finally:
            await bench.close()
    finally:
        server.stop()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2_000, help="calls per CPU phase")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--base", default="c34460e", help="commit of the scripts before")
    parser.add_argument("--holds", type=int, default=200, help="holds of the latency run")
    parser.add_argument("--period-ms", type=int, default=1_000, help="the reaper's period")
    parser.add_argument("--spread-ms", type=int, default=5_000,
                        help="deadlines spread over this long")
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))


if __name__ == "__main__":
    cli()
