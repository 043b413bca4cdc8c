"""The availability engine's targets (issue 13), through a real ``slotguard serve``:

    python -m benchmarks.availability [--seconds 10] [--workers 2] [--connections 64]
                                      [--clients 2] [--vendors 1000]

1. ``week``: one vendor (Europe/Berlin, Mon-Fri 09:00-17:00, 15-minute unit), 20 busy
   blocks and 50 live holds in the week; ``GET …/availability`` of that week in 15-minute
   slots (672 slots) from ``--connections`` keep-alive connections; latency p50/p95/p99.
2. ``round-robin``: ``--vendors`` vendors with a schedule and two busy blocks each, one
   day (96 slots of 15 minutes) each, queried round-robin; answers per second.
3. ``placement``: POST /v1/reservations on a vendor with rules (schedule + blocks) and on
   one without any, interleaved rounds; req/s of each. Next to it, in-process, the CPU the
   rules check adds to one create (``check_placement``: cached rules, one ``refusals``).

Uses the configured Redis and Postgres (``REDIS_URL`` / ``DATABASE_URL``) under a
throwaway key prefix and schema, removed afterwards; rate limits and the hold cap are off.
Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import sys
import time
import uuid

import httpx
import orjson

from benchmarks.api_http import _cleanup, _free_port, _iso, _wait_ready

MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR


def _week_start_ms() -> int:
    """A Friday 00:00 UTC one to two weeks ahead (the horizon is measured from now): the
    benchmark's week is the Monday to Monday after it."""
    now = int(time.time() * 1000)
    day = now // DAY * DAY
    # 1970-01-01 was a Thursday: (days + 3) % 7 == 0 on Mondays.
    monday = day + ((7 - (day // DAY + 3) % 7) % 7) * DAY + 7 * DAY
    return monday - 3 * DAY


WEEK_START_MS = _week_start_ms()
SCHEDULE = {"timeZone": "Europe/Berlin",
            "weekly": {d: [["09:00", "17:00"]] for d in ("mon", "tue", "wed", "thu", "fri")},
            "slotDurationMinutes": 15, "horizonDays": 730}


async def _get_load(host: str, port: int, paths: list[bytes], seconds: float,
                    connections: int) -> tuple[list[float], dict[int, int]]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    counter = iter(range(10**12))

    async def one() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                raw = paths[next(counter) % len(paths)]
                started = time.perf_counter()
                writer.write(raw)
                head = await reader.readuntil(b"\r\n\r\n")
                lower = head.lower()
                at = lower.find(b"content-length:")
                length = int(lower[at + 15:lower.index(b"\r\n", at)]) if at >= 0 else 0
                if length:
                    await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                status = int(head[9:12])
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return latencies, statuses


async def _warm(port: int, paths: list[bytes], connections: int) -> None:
    queue = list(paths)

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while queue:
                writer.write(queue.pop())
                head = await reader.readuntil(b"\r\n\r\n")
                lower = head.lower()
                at = lower.find(b"content-length:")
                await reader.readexactly(int(lower[at + 15:lower.index(b"\r\n", at)]))
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))


def _client(args) -> tuple[list[float], dict[int, int]]:
    host, port, paths, seconds, connections = args
    return asyncio.run(_get_load(host, port, paths, seconds, connections))


def _run_gets(port: int, paths: list[bytes], opts) -> dict:
    per = max(1, opts.connections // opts.clients)
    jobs = [("127.0.0.1", port, paths[i::opts.clients] or paths, opts.seconds, per)
            for i in range(opts.clients)]
    with multiprocessing.get_context("spawn").Pool(opts.clients) as pool:
        results = pool.map(_client, jobs)
    latencies = sorted(x for lat, _ in results for x in lat)
    statuses: dict[int, int] = {}
    for _, per_status in results:
        for status, count in per_status.items():
            statuses[status] = statuses.get(status, 0) + count

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {"requests": len(latencies), "per_s": len(latencies) / opts.seconds,
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
            "statuses": statuses, "connections": per * opts.clients}


def _get(path: str, key: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {key}\r\n\r\n"
            ).encode()


async def _seed(env: dict, vendors: int) -> None:
    """Vendors, schedules and blocks straight through the directory and store modules."""
    import asyncpg

    from engine import availability_store as store
    from engine import directory
    from engine.availability import Block
    from engine.schedule import parse_schedule

    conn = await asyncpg.connect(env["DATABASE_URL"],
                                 server_settings={"search_path": env["SLOTGUARD_DB_SCHEMA"]})
    try:
        doc = parse_schedule(SCHEDULE).document()
        await directory.create_vendor(conn, "week", confirmation_required=False)
        await store.put_schedule(conn, "week", doc)
        for i in range(20):  # 20 blocks over the working week, 1 hour each
            day, hour = i // 4, 9 + 2 * (i % 4)
            start = WEEK_START_MS + (3 + day) * DAY + (hour - 1) * HOUR  # Mon.. in CET
            await store.insert_block(conn, "week", Block(f"blk_w{i}", start, start + HOUR))
        await directory.create_vendor(conn, "bare", confirmation_required=False)
        await directory.create_vendor(conn, "ruled", confirmation_required=False)
        await store.put_schedule(conn, "ruled", parse_schedule(
            {**SCHEDULE, "weekly": {d: [["00:00", "24:00"]] for d in
                                    ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}}
        ).document())
        for i in range(20):
            start = WEEK_START_MS + 40 * DAY + i * DAY
            await store.insert_block(conn, "ruled", Block(f"blk_r{i}", start, start + HOUR))
        for n in range(vendors):
            vid = f"rr{n}"
            await directory.create_vendor(conn, vid, confirmation_required=False)
            await store.put_schedule(conn, vid, doc)
            for j in range(2):
                start = WEEK_START_MS + 3 * DAY + (9 + 3 * j) * HOUR
                await store.insert_block(conn, vid, Block(f"blk_{vid}_{j}", start,
                                                          start + HOUR))
    finally:
        await conn.close()


def _placement_round(port: int, key: str, vendor: str, seconds: float, connections: int,
                     base_ms: int) -> float:
    async def go() -> int:
        done = 0
        deadline = time.perf_counter() + seconds
        counter = iter(range(10**9))

        async def one() -> None:
            nonlocal done
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                while time.perf_counter() < deadline:
                    n = next(counter)
                    start = base_ms + n * 15 * MINUTE
                    body = orjson.dumps({"vendorId": vendor, "slotStartTime": _iso(start),
                                         "slotEndTime": _iso(start + 15 * MINUTE),
                                         "requesterId": "bench"})
                    writer.write((f"POST /v1/reservations HTTP/1.1\r\nhost: b\r\n"
                                  f"authorization: Bearer {key}\r\ncontent-type: "
                                  f"application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                                  ).encode() + body)
                    head = await reader.readuntil(b"\r\n\r\n")
                    lower = head.lower()
                    at = lower.find(b"content-length:")
                    await reader.readexactly(int(lower[at + 15:lower.index(b"\r\n", at)]))
                    if head[9:12] == b"201":
                        done += 1
            finally:
                writer.close()

        await asyncio.gather(*(one() for _ in range(connections)))
        return done

    return asyncio.run(go()) / seconds


def _check_cost(iterations: int = 20_000) -> tuple[float, float]:
    """µs per ``refusals`` call for the rules of ``ruled`` and for an empty rule set."""
    from engine import availability as av
    from engine.availability import Block, Rules
    from engine.schedule import parse_schedule

    sched = parse_schedule({**SCHEDULE, "weekly": {d: [["00:00", "24:00"]] for d in
                                                   ("mon", "tue", "wed", "thu", "fri", "sat",
                                                    "sun")}})
    blocks = tuple(Block(f"b{i}", WEEK_START_MS + 40 * DAY + i * DAY,
                         WEEK_START_MS + 40 * DAY + i * DAY + HOUR) for i in range(20))
    ruled, bare = Rules("ruled", 1, sched, blocks), Rules("bare")
    now = WEEK_START_MS - DAY
    out = []
    for rules in (ruled, bare):
        started = time.perf_counter()
        for i in range(iterations):
            start = WEEK_START_MS + i * 15 * MINUTE
            av.refusals(rules, "ruled", start, start + 15 * MINUTE, now)
        out.append((time.perf_counter() - started) / iterations * 1e6)
    return out[0], out[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--vendors", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args(argv)

    prefix, schema = f"bench{uuid.uuid4().hex[:8]}:", f"bench_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "SLOTGUARD_KEY_PREFIX": prefix, "SLOTGUARD_DB_SCHEMA": schema,
           "SLOTGUARD_PARTNER_RATE_PER_MINUTE": "0", "SLOTGUARD_IP_RATE_PER_MINUTE": "0",
           "SLOTGUARD_PARTNER_MAX_LIVE_HOLDS": "0"}
    env.setdefault("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    env.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
    cli = [sys.executable, "-m", "slotguard"]

    def run(*args: str) -> str:
        return subprocess.run([*cli, *args], env=env, check=True, capture_output=True,
                              text=True).stdout

    report: dict = {"load_before": os.getloadavg()}
    try:
        run("migrate")
        run("partners", "create", "--id", "bench")
        key = run("keys", "create", "--role", "partner", "--partner", "bench"
                  ).strip().splitlines()[-1]
        asyncio.run(_seed(env, opts.vendors))
        port = _free_port()
        api = subprocess.Popen([*cli, "serve", "--port", str(port), "--workers",
                                str(opts.workers), "--no-access-log", "--log-level",
                                "warning"], env=env)
        try:
            _wait_ready(f"http://127.0.0.1:{port}/health/ready", api)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}",
                              headers={"authorization": f"Bearer {key}"}) as client:
                held = 0
                for i in range(7 * 48):  # 50 live holds in the week's open hours
                    start = WEEK_START_MS + 3 * DAY + i * 30 * MINUTE
                    r = client.post("/v1/reservations", json={
                        "vendorId": "week", "slotStartTime": _iso(start),
                        "slotEndTime": _iso(start + 15 * MINUTE), "requesterId": "bench"})
                    held += r.status_code == 201
                    if held == 50:
                        break
                report["week_holds"] = held
            week = (f"/v1/vendors/week/availability?startTime={_iso(WEEK_START_MS + 3 * DAY)}"
                    f"&endTime={_iso(WEEK_START_MS + 10 * DAY)}&slotDuration=15"
                    f"&includeConfidence=true").replace("+", "%2B")
            report["week"] = _run_gets(port, [_get(week, key)], opts)
            day = (f"?startTime={_iso(WEEK_START_MS + 3 * DAY)}"
                   f"&endTime={_iso(WEEK_START_MS + 4 * DAY)}&slotDuration=15")
            paths = [_get(f"/v1/vendors/rr{n}/availability{day}", key)
                     for n in range(opts.vendors)]
            # Warm-up (not measured): every worker loads each vendor's catalog entry and
            # rules from Postgres once; the target is about the answers, not first loads.
            started = time.perf_counter()
            asyncio.run(_warm(port, paths * 4, 16))
            report["warmup_s"] = time.perf_counter() - started
            report["round_robin"] = _run_gets(port, paths, opts)
            rounds = []
            for r_i in range(opts.rounds):
                base = WEEK_START_MS + 60 * DAY + r_i * 30 * DAY
                with_rules = _placement_round(port, key, "ruled", opts.seconds / 2,
                                              opts.connections // 2, base)
                without = _placement_round(port, key, "bare", opts.seconds / 2,
                                           opts.connections // 2, base)
                rounds.append((with_rules, without))
            report["placement"] = rounds
        finally:
            api.terminate()
            api.wait(timeout=20)
        report["check_us"] = _check_cost()
    finally:
        _cleanup(prefix, schema)
    report["load_after"] = os.getloadavg()
    _print(report, opts)
    return 0


def _print(report: dict, opts) -> None:
    print(f"slotguard serve --workers {opts.workers}; load (1/5/15) before "
          f"{' '.join(f'{x:.1f}' for x in report['load_before'])}, after "
          f"{' '.join(f'{x:.1f}' for x in report['load_after'])}")
    print(f"  round-robin warm-up (every vendor 4 times, not measured): "
          f"{report['warmup_s']:.0f} s")
    for name in ("week", "round_robin"):
        r = report[name]
        print(f"  {name:12s} {r['per_s']:8.0f} answers/s  p50 {r['p50_ms']:.1f} ms  "
              f"p95 {r['p95_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
              f"({r['connections']} connections, statuses {r['statuses']})")
    print(f"  week holds placed: {report['week_holds']}")
    for i, (with_rules, without) in enumerate(report["placement"], 1):
        print(f"  placement round {i}: with rules {with_rules:.0f} creates/s, without "
              f"{without:.0f} creates/s (ratio of cost {without / with_rules:.2f})")
    ruled, bare = report["check_us"]
    print(f"  rules check in-process: {ruled:.1f} µs per create with 20 blocks + hours, "
          f"{bare:.1f} µs with no rules")


if __name__ == "__main__":
    raise SystemExit(main())
