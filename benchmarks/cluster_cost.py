"""Engine throughput and Redis server cost per operation on 1 Redis, 1 master and 3 masters.

``python -m benchmarks.cluster_cost [--seconds S] [--processes P] [--concurrency C]
[--topologies single,1,3] [--json PATH]``

For each topology (a private non-cluster redis-server; local Redis Clusters of 1 and 3
masters, a replica each, :mod:`slotguard.local_cluster`) it places holds through the
access layer (HoldEngine.place: one ``place_hold`` script call each, coalesced, routed by
slot) from P client processes of C tasks for S seconds, on resources spread over every
shard (no conflicts: the per-op cost of a successful placement), and reads before and after,
on every master: ``INFO commandstats`` (calls and µs inside EVALSHA/EVAL) and ``INFO cpu``
(the server process's user+sys CPU, networking and replication included). It reports
throughput, and per master: operations, µs of script per call, and process CPU µs per
operation. On 2 shared cores the client processes and every server share the CPUs, so the
throughput of 3 masters cannot grow; the per-op server cost is what says whether one master's
ceiling multiplies with N masters on N cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

T0 = 1_924_992_000_000
UNIT = 15 * 60_000
RESOURCES = 256
SHARDS = 16
IDLE_S = 3.0


def _start_single() -> tuple[str, subprocess.Popen, Path]:
    from slotguard.local_cluster import free_cluster_ports

    port = free_cluster_ports(1)[0]
    tmp = Path(tempfile.mkdtemp(prefix="slotguard-cost-"))
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp), "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(port=port)
    for _ in range(300):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}", proc, tmp


def _masters(url: str, cluster: bool) -> list[redis.Redis]:
    if not cluster:
        return [redis.Redis.from_url(url)]
    from redis.cluster import RedisCluster

    rc = RedisCluster.from_url(url)
    try:
        return [redis.Redis(host=n.host, port=n.port) for n in rc.get_primaries()]
    finally:
        rc.close()


def _sample(client: redis.Redis) -> dict:
    stats = client.info("commandstats")
    cpu = client.info("cpu")
    reads = client.info("stats").get("total_reads_processed", 0)
    calls = usec = 0
    for name in ("cmdstat_evalsha", "cmdstat_eval"):
        if name in stats:
            calls += stats[name]["calls"]
            usec += stats[name]["usec"]
    return {"calls": calls, "usec": usec, "reads": reads,
            "cpu_s": cpu["used_cpu_user"] + cpu["used_cpu_sys"]}


def _client(url: str, cluster: bool, seconds: float, concurrency: int, seed: int,
            barrier, out) -> None:
    async def run() -> int:
        from benchmarks.holds import HoldEngine
        from engine.access import RedisAccess
        from engine.connection import open_redis
        from engine.keys import KeySpace
        from engine.resources import Resource, ResourceCatalog
        from engine.settings import Settings

        settings = Settings.from_env({}, redis_url=url, redis_cluster=cluster,
                                     key_prefix="cost:", shards=SHARDS)
        client = open_redis(settings, health_check_interval=0)
        if cluster:
            await client.initialize()
        access = RedisAccess(client, wait_replicas=settings.redis_wait_replicas)
        await access.load_scripts()
        keys = KeySpace(settings.key_prefix, SHARDS)
        catalog = ResourceCatalog([Resource(f"r{i}", unit_ms=UNIT) for i in range(RESOURCES)])
        engine = HoldEngine(access, keys, catalog, settings)
        barrier.wait(120)
        deadline = time.monotonic() + seconds
        done = 0

        async def task(t: int) -> None:
            nonlocal done
            n = 0
            while time.monotonic() < deadline:
                resource = f"r{(seed * 7919 + t * 31 + n) % RESOURCES}"
                start = T0 + ((seed * 1_000_003 + t * 10_007 + n) % 10_000_000) * 2 * UNIT
                await engine.place(resource, start, start + UNIT, ttl_ms=120_000)
                n += 1
                done += 1

        await asyncio.gather(*(task(t) for t in range(concurrency)))
        await access.close()
        await client.aclose()
        return done

    out.put(asyncio.run(run()))


def measure(topology: str, seconds: float, processes: int, concurrency: int) -> dict:
    from slotguard.local_cluster import LocalCluster

    cluster = None
    single = None
    if topology == "single":
        url, proc, tmp = _start_single()
        single = (proc, tmp)
        is_cluster = False
    else:
        cluster = LocalCluster(masters=int(topology), replicas=1).start()
        url, is_cluster = cluster.seed_url, True
    try:
        masters = _masters(url, is_cluster)
        # Idle cost first (serverCron, the cluster bus, replication pings): subtracted, so
        # the per-call figure is what the calls cost.
        idle_before = [_sample(m) for m in masters]
        idle_started = time.monotonic()
        time.sleep(IDLE_S)
        idle_rate = [(_sample(m)["cpu_s"] - b["cpu_s"]) / (time.monotonic() - idle_started)
                     for m, b in zip(masters, idle_before)]
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(processes + 1)
        queue = ctx.Queue()
        procs = [ctx.Process(target=_client, args=(url, is_cluster, seconds, concurrency, i,
                                                   barrier, queue)) for i in range(processes)]
        for p in procs:
            p.start()
        barrier.wait(120)
        before = [_sample(m) for m in masters]
        started = time.monotonic()
        ops = sum(queue.get(timeout=seconds + 300) for _ in procs)
        elapsed = time.monotonic() - started
        after = [_sample(m) for m in masters]
        for p in procs:
            p.join(60)
        per_master = []
        for m, b, a, idle in zip(masters, before, after, idle_rate):
            calls = a["calls"] - b["calls"]
            net_cpu = a["cpu_s"] - b["cpu_s"] - idle * elapsed
            per_master.append({
                "node": f"{m.connection_pool.connection_kwargs['port']}",
                "script_calls": calls,
                "script_us_per_call": round((a["usec"] - b["usec"]) / calls, 2) if calls else None,
                "process_cpu_us_per_call": round((a["cpu_s"] - b["cpu_s"]) * 1e6 / calls, 2)
                if calls else None,
                "process_cpu_net_of_idle_us_per_call": round(net_cpu * 1e6 / calls, 2)
                if calls else None,
                "idle_cpu_ms_per_s": round(idle * 1000, 2),
                # Socket reads the node processed per script call: its batches' size seen
                # from the server (the per-batch costs are spread over this many calls).
                "calls_per_read": round(calls / max(1, a["reads"] - b["reads"]), 2),
                "process_cpu_s": round(a["cpu_s"] - b["cpu_s"], 3)})
        for m in masters:
            m.close()
        return {"topology": topology, "ops": ops, "seconds": round(elapsed, 2),
                "ops_per_s": round(ops / elapsed), "masters": per_master,
                "load_average": os.getloadavg()}
    finally:
        if cluster is not None:
            cluster.stop()
        if single is not None:
            single[0].kill()
            single[0].wait(10)
            shutil.rmtree(single[1], ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster_cost")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64,
                        help="tasks per client process")
    parser.add_argument("--scale-concurrency", action="store_true",
                        help="tasks per client process times the number of masters (the same "
                             "load per master on every topology)")
    parser.add_argument("--topologies", default="single,1,3")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = []
    for topology in [t.strip() for t in args.topologies.split(",") if t.strip()]:
        per = int(topology) if args.scale_concurrency and topology.isdigit() else 1
        result = measure(topology, args.seconds, args.processes, args.concurrency * per)
        result["concurrency_per_process"] = args.concurrency * per
        results.append(result)
        print(json.dumps(result), flush=True)
    print("| topology | holds/s | per master: script calls, µs inside the script per call, "
          "server CPU µs per call (net of idle), calls per socket read |")
    print("|---|---:|---|")
    for r in results:
        masters = "; ".join(f"{m['script_calls']} calls, {m['script_us_per_call']} µs, "
                            f"{m['process_cpu_us_per_call']} µs "
                            f"({m['process_cpu_net_of_idle_us_per_call']} µs), "
                            f"{m['calls_per_read']} calls/read"
                            for m in r["masters"])
        print(f"| {r['topology']} | {r['ops_per_s']} | {masters} |")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "results": results},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
