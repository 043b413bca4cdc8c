"""Retention of the outbox and the delivery log (issue 14, jobs/webhook_retention.py), on
real Postgres with explicit timestamps and an explicit "now" (no sleeps): settled
deliveries past the window go in bounded batches, pending ones never, and every event the
live stream may resume from within the window stays."""

from __future__ import annotations

import datetime as dt

import asyncpg
import pytest

from engine.db import create_pool
from engine.event_stream import StreamQuery, read_after
from jobs.webhook_retention import prune
from tests.test_api_fixtures import api_settings, migrated  # noqa: F401  (fixtures)

NOW_MS = 1_924_992_000_000  # 2031-01-01T00:00Z, the job's "now"
DAY = dt.timedelta(days=1)
NOW = dt.datetime.fromtimestamp(NOW_MS / 1000, dt.timezone.utc)


@pytest.fixture
async def pool(migrated):  # noqa: F811
    pool = await create_pool(migrated, max_size=2)
    yield pool
    await pool.close()


async def add_event(conn: asyncpg.Connection, key: str, age: dt.timedelta,
                    deliveries: list[str] = ()) -> int:
    """One outbox row emitted ``age`` before NOW, and a delivery per status given."""
    at = NOW - age
    position = await conn.fetchval(
        "INSERT INTO webhook_events (event_key, type, audience, partner_id, vendor_id, "
        "reservation_id, version, payload, occurred_at, emitted_at) VALUES ($1, "
        "'reservation.created', 'tenants', 'p1', 'v1', $1, 1, '{}'::jsonb, $2, $2) "
        "RETURNING position", key, at)
    for n, status in enumerate(deliveries):
        await conn.execute(
            "INSERT INTO webhook_deliveries (id, endpoint_id, event_position, webhook_id, "
            "type, status, created_at, delivered_at) VALUES ($1, $2, $3, $4, "
            "'reservation.created', $5::text, $6::timestamptz, "
            "CASE WHEN $5::text = 'delivered' THEN $6::timestamptz END)",
            f"dlv_{key}_{n}", f"whe_{n}", position, f"msg_{position}", status, at)
    return position


async def test_retention_deletes_settled_rows_past_the_window_only(pool, migrated):  # noqa: F811
    settings = migrated.replace(webhook_retention_days=30)
    async with pool.acquire() as conn:
        for n in range(3):
            await conn.execute(
                "INSERT INTO webhook_endpoints (id, owner_kind, owner_id, url, events, secret) "
                "VALUES ($1, 'partner', 'p1', 'http://example.com/', ARRAY['*'], 's')",
                f"whe_{n}")
        old = 31 * DAY
        gone, kept = {}, {}
        # oldest first: positions grow with time, as the writers' lock makes them
        for i in range(5):  # more old settled rows than one batch
            gone[f"bulk-{i}"] = await add_event(conn, f"old-bulk-{i}", 60 * DAY, ["delivered"])
        # one delivery still pending: the event and that delivery stay (its settled sibling
        # goes)
        kept["pending"] = await add_event(conn, "old-pending", 40 * DAY,
                                          ["delivered", "pending"])
        gone["no-delivery"] = await add_event(conn, "old-bare", old + 5 * DAY)
        gone["delivered"] = await add_event(conn, "old-delivered", old, ["delivered"])
        gone["all-settled"] = await add_event(conn, "old-settled", old,
                                              ["delivered", "failed", "dead"])
        # inside the window, whatever their state
        kept["recent"] = await add_event(conn, "recent", 29 * DAY, ["delivered", "dead"])
        kept["recent-bare"] = await add_event(conn, "recent-bare", DAY)
        window = StreamQuery(None, None, None, None)
        resume_from = kept["recent"] - 1
        stream_before = await read_after(pool, window, resume_from)
        assert [p for p, _, _ in stream_before] == [kept["recent"], kept["recent-bare"]]

    deleted = await prune(pool, settings, now_ms=NOW_MS, batch=2)

    async with pool.acquire() as conn:
        positions = {r[0] for r in await conn.fetch("SELECT position FROM webhook_events")}
        left = sorted((r[0], r[1]) for r in await conn.fetch(
            "SELECT event_position, status FROM webhook_deliveries"))
    assert positions == set(kept.values())
    assert left == sorted([(kept["pending"], "pending"), (kept["recent"], "delivered"),
                           (kept["recent"], "dead")])
    # 1 + 3 + 1 + 5 settled deliveries, 3 + 5 events (the pending one's event stays)
    assert deleted == {"deliveries": 10, "events": 8}
    # A Last-Event-ID inside the window resumes exactly as before.
    assert await read_after(pool, window, resume_from) == stream_before
    # Again: nothing more to delete.
    assert await prune(pool, settings, now_ms=NOW_MS, batch=2) == {"deliveries": 0,
                                                                     "events": 0}
    # The pending delivery settles; the next run past the window takes it and its event.
    async with pool.acquire() as conn:
        await conn.execute("UPDATE webhook_deliveries SET status = 'delivered' "
                           "WHERE status = 'pending'")
    assert await prune(pool, settings, now_ms=NOW_MS) == {"deliveries": 1, "events": 1}


async def test_retention_zero_keeps_everything(pool, migrated):  # noqa: F811
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO webhook_endpoints (id, owner_kind, owner_id, url, events, secret) "
            "VALUES ('whe_0', 'ops', '', 'http://example.com/', ARRAY['*'], 's')")
        await add_event(conn, "ancient", 3650 * DAY, ["delivered"])
    off = migrated.replace(webhook_retention_days=0)
    assert await prune(pool, off, now_ms=NOW_MS) == {"deliveries": 0, "events": 0}
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM webhook_deliveries") == 1
        assert await conn.fetchval("SELECT count(*) FROM webhook_events") == 1
