"""``python -m benchmarks.list_pages``: what a page of ``GET /v1/reservations`` costs as the
table grows and as a client pages deeper (issue 17).

It fills a private schema with ``--rows`` reservation rows (SQL ``generate_series``: the
read model as the commit queue leaves it, written in bulk because the drain is measured
elsewhere), runs the real app in process (httpx ASGI transport, real Redis and Postgres),
and times pages: the first page and the page after ``--depth`` pages of cursors, for a
partner (its own rows) and an ops key (every row), at ``limit`` 50 and 200. It also prints
the plan Postgres uses for a deep page after the statement was prepared and run many times
(asyncpg prepares; a generic plan would show here). The schema is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

import asyncpg
import httpx

PARTNERS = 50
VENDORS = 20


async def fill(conn: asyncpg.Connection, rows: int) -> None:
    await conn.execute(f"""
        INSERT INTO partners (id, name)
        SELECT 'p' || i, 'P' || i FROM generate_series(0, {PARTNERS - 1}) i;
        INSERT INTO vendors (id) SELECT 'v' || i FROM generate_series(0, {VENDORS - 1}) i;
        INSERT INTO resources (id, vendor_id, unit_minutes, buffer_before_minutes,
                               buffer_after_minutes, shard_key)
        SELECT 'v' || i, 'v' || i, 15, 0, 0, 'v' || i FROM generate_series(0, {VENDORS - 1}) i;
        INSERT INTO reservations (id, partner_id, vendor_id, resource_id, requester_id,
                                  slot_start, slot_end, state, version, created_at,
                                  updated_at, expires_at, items)
        SELECT 'rsv_0_' || lpad(i::text, 26, '0'), 'p' || (i % {PARTNERS}),
               'v' || (i % {VENDORS}), 'v' || (i % {VENDORS}), 'r' || i,
               timestamptz '2031-01-01' + (i % 100000) * interval '15 minutes',
               timestamptz '2031-01-01' + (i % 100000 + 1) * interval '15 minutes',
               'HELD', 1,
               timestamptz '2030-01-01' + (i / 3) * interval '1 millisecond',
               timestamptz '2030-01-01', timestamptz '2031-01-01',
               jsonb_build_array(jsonb_build_object(
                   'resourceId', 'v' || (i % {VENDORS}),
                   'slotStart', 1924992000000 + (i % 100000) * 900000,
                   'slotEnd', 1924992000000 + (i % 100000 + 1) * 900000,
                   'blockStart', 1924992000000 + (i % 100000) * 900000,
                   'blockEnd', 1924992000000 + (i % 100000 + 1) * 900000))
        FROM generate_series(1, {rows}) i;
        ANALYZE reservations;""")


async def timed_pages(client: httpx.AsyncClient, headers: dict, limit: int, depth: int,
                      repeats: int) -> tuple[float, float]:
    """Median ms of the first page and of the page after ``depth`` pages."""
    first, deep = [], []
    for _ in range(repeats):
        cursor = None
        for page in range(depth + 1):
            params = {"limit": str(limit), **({"startingAfter": cursor} if cursor else {})}
            started = time.perf_counter()
            r = await client.get("/v1/reservations", params=params, headers=headers)
            elapsed = (time.perf_counter() - started) * 1000
            assert r.status_code == 200, r.text
            if page == 0:
                first.append(elapsed)
            cursor = r.json()["nextCursor"]
            if cursor is None:
                break
        deep.append(elapsed)
    return statistics.median(first), statistics.median(deep)


async def main(rows: int, depth: int, repeats: int) -> None:
    from api.app import create_app
    from api.auth import issue_key
    from engine import db
    from engine.settings import Settings

    settings = Settings.from_env(
        key_prefix=f"lp{uuid.uuid4().hex[:8]}:", db_schema=f"lp_{uuid.uuid4().hex[:8]}",
        partner_rate_per_minute=0, ip_rate_per_minute=0)
    await asyncio.to_thread(db.migrate, settings)
    conn = await asyncpg.connect(db._libpq_url(settings.database_url),  # noqa: SLF001
                                 server_settings={"search_path": settings.db_schema})
    try:
        started = time.perf_counter()
        await fill(conn, rows)
        print(f"filled {rows:,} reservations in {time.perf_counter() - started:.1f} s "
              f"({PARTNERS} partners, {VENDORS} vendors)")
        keys = {}
        for name, role, partner in (("partner", "partner", "p7"), ("ops", "ops", None)):
            issued, _ = await issue_key(conn, role, partner_id=partner)
            keys[name] = {"Authorization": f"Bearer {issued.key}"}
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            await app.state.services.reservations.engine.mark_ready()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                print(f"| caller | limit | first page ms | page {depth + 1} ms |")
                print("|---|---:|---:|---:|")
                for name in ("partner", "ops"):
                    for limit in (50, 200):
                        first, deep = await timed_pages(client, keys[name], limit, depth,
                                                        repeats)
                        print(f"| {name} | {limit} | {first:.1f} | {deep:.1f} |")
        plan = await conn.fetch("""
            EXPLAIN (ANALYZE, COSTS OFF)
            SELECT id FROM reservations
            WHERE ($1::text IS NULL OR partner_id = $1) AND ($2::text IS NULL OR vendor_id = $2)
              AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::text))
            ORDER BY created_at DESC, id DESC LIMIT 51""",
            "p7", None, await conn.fetchval("SELECT created_at FROM reservations "
                                            "ORDER BY created_at DESC OFFSET 5000 LIMIT 1"),
            "rsv_0_z")
        print("plan of a partner's deep page:")
        for line in plan:
            print("   ", line[0])
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
        await conn.close()
        import redis.asyncio as aioredis

        from tests.conftest import delete_prefix

        client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        await delete_prefix(client, settings.key_prefix)
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--depth", type=int, default=20, help="pages walked before timing")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
    asyncio.run(main(args.rows, args.depth, args.repeats))
