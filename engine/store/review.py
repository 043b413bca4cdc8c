"""Manual review: work for a human, and the dead letters kept durably outside Redis."""

from __future__ import annotations

from typing import Any

import asyncpg

from engine.db import json_param
from engine.errors import ValidationError


async def record_manual_review(conn: asyncpg.Connection, kind: str, reservation_id: str | None,
                               resource_id: str | None, details: dict[str, Any]) -> int:
    """Open a case for a human; returns its id.

    Idempotent per (kind, reservation): while a case is open, reporting it again returns
    the open case and changes nothing.
    """
    if not kind:
        raise ValidationError("kind is required", details={"field": "kind"})
    case_id = await conn.fetchval(
        """INSERT INTO manual_review (kind, reservation_id, resource_id, details)
           VALUES ($1, $2, $3, $4::text::jsonb)
           ON CONFLICT (kind, reservation_id) WHERE resolved_at IS NULL DO NOTHING
           RETURNING id""",
        kind, reservation_id, resource_id, json_param(details))
    if case_id is None:
        case_id = await conn.fetchval(
            """SELECT id FROM manual_review
               WHERE kind = $1 AND reservation_id = $2 AND resolved_at IS NULL""",
            kind, reservation_id)
    return case_id


async def record_dead_letter(conn: asyncpg.Connection, *, stream: str, entry_id: str,
                             fields: dict[str, str], error: str, deliveries: int) -> bool:
    """Keep a stream entry that could not be written, durably. Idempotent per (stream,
    entry).

    The entry may be dead precisely because Postgres refuses part of it (a NUL byte): such
    characters are kept as visible escapes (``\\u0000``), so the letter itself is always
    storable; the shard's dead-letter stream in Redis keeps the exact bytes."""
    status = await conn.execute(
        """INSERT INTO dead_letters (stream, entry_id, fields, error, deliveries)
           VALUES ($1, $2, $3::text::jsonb, $4, $5)
           ON CONFLICT (stream, entry_id) DO NOTHING""",
        stream, entry_id, json_param(storable(fields)), storable_text(error), deliveries)
    return status == "INSERT 0 1"


def storable_text(value: str) -> str:
    """``value`` with what Postgres text cannot hold made visible: a NUL byte becomes the
    six characters ``\\u0000`` (the dead-letter stream in Redis keeps the exact bytes)."""
    return value.replace("\x00", "\\u0000") if "\x00" in value else value


def storable(fields: dict[str, Any]) -> dict[str, Any]:
    return {storable_text(str(k)): storable_text(str(v)) for k, v in fields.items()}
