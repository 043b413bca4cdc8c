"""``slotguard status [--json]``: is this deployment healthy, and on which servers?

Reports the servers in use and where each address came from (environment, ``.slotguard/env``,
default), the migrations applied against those the package ships, the shards whose booked
markers are rehydrated (``ready``), the commit-queue lag (entries waiting in the streams,
delivered but unacknowledged, the oldest pending age), the live holds (reservations with a
deadline in Redis) and, when the API's URL is known (``SLOTGUARD_API_URL`` or the env file),
its ``/health/ready``. Exit 0 when every check passes, 1 otherwise. A server that cannot be
reached is a failed check (reported in its line), not a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

CHECK_TIMEOUT_S = 5.0
# A pending entry older than this means no worker is draining (reclaim_idle_ms is 30 s).
MAX_PENDING_AGE_MS = 60_000


def register(subparsers: argparse._SubParsersAction) -> None:
    status = subparsers.add_parser(
        "status", help="servers in use, migrations, shards, commit-queue lag, live holds",
        description="Check the deployment the other commands would use. Exit 0 when "
                    "healthy, 1 otherwise.")
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.set_defaults(func=cmd_status, announce_servers=False)


@dataclass
class Check:
    name: str
    ok: bool
    summary: str
    data: dict[str, Any] = field(default_factory=dict)


def cmd_status(args: argparse.Namespace) -> int:
    from engine.settings import Settings
    from slotguard import envfile

    servers = getattr(args, "servers", None) or envfile.resolve()
    settings = Settings.from_env()
    checks = asyncio.run(collect(settings, servers.api_url))
    healthy = all(c.ok for c in checks)
    if args.json:
        print(json.dumps({
            "healthy": healthy,
            "servers": {name: {"value": envfile.redact(value), "source": servers.source_of(name)}
                        for name, value in servers.values.items()},
            "envFileIgnored": servers.ignored,
            "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(servers.describe())
        for check in checks:
            print(f"  {check.name:<14}{'ok  ' if check.ok else 'FAIL'}  {check.summary}")
        print("healthy" if healthy else "not healthy")
    return 0 if healthy else 1


async def collect(settings, api_url: str | None) -> list[Check]:
    checks = [await _guarded("postgres", _postgres(settings))]
    checks += await _redis_checks(settings)
    if api_url:
        checks.append(await asyncio.to_thread(_api, api_url))
    return checks


async def _guarded(name: str, coro) -> Check:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            return await coro
    except Exception as exc:  # noqa: BLE001 (an unreachable server is a failed check)
        return Check(name, False, f"unreachable: {_reason(exc)}")


async def _postgres(settings) -> Check:
    import asyncpg
    from yoyo import read_migrations

    from engine import db

    shipped = sorted(m.id for m in read_migrations(db.MIGRATIONS))
    conn = await asyncpg.connect(db._libpq_url(settings.database_url))  # noqa: SLF001
    try:
        exists = await conn.fetchval(
            "SELECT to_regclass($1) IS NOT NULL",
            f"{db.quoted_schema(settings)}.{db.MIGRATION_TABLE}")
        applied = [] if not exists else sorted(r[0] for r in await conn.fetch(
            f"SELECT migration_id FROM {db.quoted_schema(settings)}.{db.MIGRATION_TABLE}"))
    finally:
        await conn.close()
    missing = [m for m in shipped if m not in applied]
    summary = (f"schema {settings.db_schema}: {len(applied)} of {len(shipped)} migrations "
               "applied")
    if missing:
        summary += f"; pending {', '.join(missing)} (run `slotguard migrate`)"
    return Check("migrations", not missing, summary,
                 {"schema": settings.db_schema, "applied": applied, "pending": missing})


async def _redis_checks(settings) -> list[Check]:
    from engine.connection import eviction_allowed, eviction_policy, open_redis
    from engine.keys import KeySpace
    from jobs.commit_queue import GROUP

    keys = KeySpace(settings.key_prefix, settings.shards)
    redis = open_redis(settings, socket_timeout=CHECK_TIMEOUT_S,
                       socket_connect_timeout=CHECK_TIMEOUT_S)
    try:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await redis.ping()
                policy = await eviction_policy(redis)
        except Exception as exc:  # noqa: BLE001
            return [Check("redis", False, f"unreachable: {_reason(exc)}")]
        checks = [Check("redis", eviction_allowed(policy, settings),
                        f"maxmemory-policy {policy}", {"maxmemoryPolicy": policy})]
        shards = range(settings.shards)
        pipe = redis.pipeline(transaction=False)
        for shard in shards:
            pipe.exists(keys.ready(shard))
        for shard in shards:
            pipe.xlen(keys.events(shard))
        for shard in shards:
            pipe.zcard(keys.deadlines(shard))
        pipe.get(keys.shard_count())
        replies = await pipe.execute()
        ready = sum(int(r) for r in replies[:settings.shards])
        lengths = replies[settings.shards:2 * settings.shards]
        live = sum(int(r) for r in replies[2 * settings.shards:3 * settings.shards])
        recorded = replies[-1]
        shard_note = (f"{ready} of {settings.shards} shards ready (booked markers "
                      "rehydrated)")
        shards_ok = ready == settings.shards
        if recorded is not None and str(recorded) != str(settings.shards):
            shards_ok = False
            shard_note += f"; the data was written with {recorded} shards"
        elif not shards_ok:
            shard_note += "; a worker or API process rehydrates them at start"
        checks.append(Check("shards", shards_ok, shard_note,
                            {"ready": ready, "shards": settings.shards,
                             "recordedShards": recorded}))
        pending, oldest = 0, 0
        now_ms = int(time.time() * 1000)
        for shard in shards:
            if not lengths[shard]:
                continue
            try:
                summary = await redis.xpending(keys.events(shard), GROUP)
            except Exception:  # noqa: BLE001 (no consumer group yet: nothing delivered)
                continue
            pending += summary["pending"]
            if summary["pending"]:
                first = int(str(summary["min"]).split("-")[0])
                oldest = max(oldest, now_ms - first)
        waiting = sum(int(n) for n in lengths)
        checks.append(Check(
            "commit queue", oldest <= MAX_PENDING_AGE_MS,
            f"{waiting} entries in the streams, {pending} delivered and unacknowledged, "
            f"oldest pending {oldest} ms",
            {"entries": waiting, "pending": pending, "oldestPendingAgeMs": oldest}))
        checks.append(Check("live holds", True, f"{live} reservations live in Redis",
                            {"live": live}))
        return checks
    finally:
        await redis.aclose()


def _api(url: str) -> Check:
    try:
        with urllib.request.urlopen(f"{url}/health/ready", timeout=CHECK_TIMEOUT_S) as reply:
            return Check("api", reply.status == 200, f"{url}/health/ready answered "
                         f"{reply.status}", {"url": url, "status": reply.status})
    except urllib.error.HTTPError as exc:
        return Check("api", False, f"{url}/health/ready answered {exc.code}",
                     {"url": url, "status": exc.code})
    except (urllib.error.URLError, OSError) as exc:
        return Check("api", False, f"{url} unreachable: {_reason(exc)}", {"url": url})


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "reason", "") or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
