"""Availability inputs in Postgres (issue 13): schedules, busy blocks, revisions.

Every function takes an asyncpg connection on the deployment's schema. Every write bumps
the vendor's revision in the same transaction and returns it, so a revision names exactly
one set of inputs (engine/availability_rules.py publishes it to Redis afterwards).
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import orjson

from engine.availability import Block, Rules
from engine.errors import NotFound
from engine.schedule import parse_schedule


def _json(value):
    """A jsonb value with or without the pool's codec (engine/db.py)."""
    return orjson.loads(value) if isinstance(value, (str, bytes)) else value


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


async def _bump(conn: asyncpg.Connection, vendor_id: str) -> int:
    return await conn.fetchval(
        "INSERT INTO availability_revisions (vendor_id, revision) VALUES ($1, 1) "
        "ON CONFLICT (vendor_id) DO UPDATE SET revision = availability_revisions.revision + 1 "
        "RETURNING revision", vendor_id)


def _block(row) -> Block:
    return Block(block_id=row["id"], start_ms=_ms(row["start_at"]), end_ms=_ms(row["end_at"]),
                 status=row["status"], resource_id=row["resource_id"], source=row["source"],
                 calendar_id=row["calendar_id"])


async def load_rules(conn: asyncpg.Connection, vendor_id: str) -> Rules:
    """The vendor's rules at one revision (one snapshot: a repeatable-read transaction)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        revision = await conn.fetchval(
            "SELECT revision FROM availability_revisions WHERE vendor_id = $1", vendor_id)
        doc = await conn.fetchval("SELECT schedule FROM vendor_schedules WHERE vendor_id = $1",
                                  vendor_id)
        rows = await conn.fetch(
            "SELECT id, resource_id, start_at, end_at, status, source, calendar_id "
            "FROM busy_blocks WHERE vendor_id = $1 ORDER BY start_at, id", vendor_id)
    schedule = parse_schedule(_json(doc)) if doc is not None else None
    return Rules(vendor_id=vendor_id, revision=revision or 0, schedule=schedule,
                 blocks=tuple(_block(r) for r in rows))


async def put_schedule(conn: asyncpg.Connection, vendor_id: str, document: dict) -> int:
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO vendor_schedules (vendor_id, schedule) VALUES ($1, $2::text::jsonb) "
            "ON CONFLICT (vendor_id) DO UPDATE SET schedule = EXCLUDED.schedule, "
            "updated_at = now()", vendor_id, orjson.dumps(document).decode())
        return await _bump(conn, vendor_id)


async def get_schedule(conn: asyncpg.Connection, vendor_id: str) -> dict | None:
    doc = await conn.fetchval("SELECT schedule FROM vendor_schedules WHERE vendor_id = $1",
                              vendor_id)
    return None if doc is None else _json(doc)


async def count_blocks(conn: asyncpg.Connection, vendor_id: str, *,
                       excluding_calendar: str | None = None) -> int:
    return await conn.fetchval(
        "SELECT count(*) FROM busy_blocks WHERE vendor_id = $1 "
        "AND calendar_id IS DISTINCT FROM $2", vendor_id, excluding_calendar)


async def insert_block(conn: asyncpg.Connection, vendor_id: str, block: Block) -> int:
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO busy_blocks (id, vendor_id, resource_id, start_at, end_at, status, "
            "source, calendar_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            block.block_id, vendor_id, block.resource_id, _dt(block.start_ms),
            _dt(block.end_ms), block.status, block.source, block.calendar_id)
        return await _bump(conn, vendor_id)


async def delete_block(conn: asyncpg.Connection, vendor_id: str, block_id: str
                       ) -> tuple[Block, int]:
    async with conn.transaction():
        row = await conn.fetchrow(
            "DELETE FROM busy_blocks WHERE vendor_id = $1 AND id = $2 RETURNING id, "
            "resource_id, start_at, end_at, status, source, calendar_id", vendor_id, block_id)
        if row is None:
            raise NotFound("busy block not found", code="UNKNOWN_BUSY_BLOCK",
                           details={"blockId": block_id})
        return _block(row), await _bump(conn, vendor_id)


async def list_blocks(conn: asyncpg.Connection, vendor_id: str) -> list[Block]:
    rows = await conn.fetch(
        "SELECT id, resource_id, start_at, end_at, status, source, calendar_id "
        "FROM busy_blocks WHERE vendor_id = $1 ORDER BY start_at, id", vendor_id)
    return [_block(r) for r in rows]


async def replace_calendar(conn: asyncpg.Connection, vendor_id: str, calendar_id: str,
                           blocks: list[Block]) -> tuple[list[Block], int]:
    """Replace every block of one imported calendar; answers the blocks it removed."""
    async with conn.transaction():
        removed = await conn.fetch(
            "DELETE FROM busy_blocks WHERE vendor_id = $1 AND calendar_id = $2 RETURNING id, "
            "resource_id, start_at, end_at, status, source, calendar_id",
            vendor_id, calendar_id)
        await conn.executemany(
            "INSERT INTO busy_blocks (id, vendor_id, resource_id, start_at, end_at, status, "
            "source, calendar_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            [(b.block_id, vendor_id, b.resource_id, _dt(b.start_ms), _dt(b.end_ms), b.status,
              b.source, calendar_id) for b in blocks])
        return [_block(r) for r in removed], await _bump(conn, vendor_id)
