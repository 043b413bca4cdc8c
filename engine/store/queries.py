"""Read models and audit queries: reservations once Redis forgot them, bookings to
restore as booked markers, the audit log (and its one write outside the stream)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from engine.db import columns, json_param, json_value
from engine.errors import ValidationError
from engine.store.sql import ms_sql as _ms

@dataclass(frozen=True, slots=True)
class Booking:
    id: str
    reservation_id: str
    resource_id: str
    vendor_id: str
    partner_id: str
    slot_start_ms: int
    slot_end_ms: int
    block_start_ms: int  # the buffered interval the booked markers must cover
    block_end_ms: int


@dataclass(frozen=True, slots=True)
class Transition:
    event_id: str
    from_state: str | None
    to_state: str
    triggered_by: str
    reason: str | None
    metadata: dict[str, Any]
    idempotency_key: str | None
    version: int
    at: datetime


@dataclass(frozen=True, slots=True)
class StoredItem:
    """One item of a reservation as Postgres records it (``reservations.items``, 0014)."""

    resource_id: str
    slot_start_ms: int
    slot_end_ms: int
    block_start_ms: int
    block_end_ms: int


@dataclass(frozen=True, slots=True)
class StoredReservation:
    """A reservation as Postgres records it: the one shape every read of the
    ``reservations`` table answers (GET once Redis forgot it, the lists). ``resource_id``,
    the slot and the block are item 0's; ``items`` lists every item (one for a
    one-resource reservation). ``history`` is filled by :func:`load_reservation` only."""

    id: str
    partner_id: str
    vendor_id: str
    resource_id: str
    requester_id: str
    slot_start: datetime
    slot_end: datetime
    block_start: datetime | None
    block_end: datetime | None
    state: str
    version: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    booking_id: str | None
    failure_reason: str | None
    metadata: dict[str, Any]
    items: list[StoredItem]
    history: list[Transition] = field(default_factory=list, metadata={"column": False})

    @property
    def multi_resource(self) -> bool:
        return len(self.items) > 1

    @classmethod
    def from_row(cls, row, history: list[Transition] | None = None) -> "StoredReservation":
        """A row selected with ``columns(StoredReservation)``."""
        return cls(**{**row, "metadata": json_value(row["metadata"]),
                      "items": stored_items(row["items"])}, history=history or [])


def stored_items(value) -> list[StoredItem]:
    """The ``items`` column (jsonb, with or without the codec) as :class:`StoredItem` s."""
    return [StoredItem(i["resourceId"], int(i["slotStart"]), int(i["slotEnd"]),
                       int(i["blockStart"]), int(i["blockEnd"]))
            for i in json_value(value)]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    event_id: str
    tenant_id: str | None
    reservation_id: str | None
    resource_id: str | None
    action: str
    actor: str
    at: datetime
    metadata: dict[str, Any]


async def bookings_to_rehydrate(conn: asyncpg.Connection, now: datetime) -> list[Booking]:
    """Live bookings whose buffered interval has not ended at ``now``, by resource and start.

    Read-only; after a Redis restart their units become booked markers again before any
    hold is accepted (DESIGN invariant 6).
    """
    rows = await conn.fetch(
        f"""SELECT id, reservation_id, resource_id, vendor_id, partner_id,
                   {_ms("slot_start")}, {_ms("slot_end")}, {_ms("block_start")},
                   {_ms("block_end")}
            FROM bookings WHERE block_end > $1 AND cancelled_at IS NULL
            ORDER BY resource_id, block_start""", now)
    return [Booking(*row) for row in rows]


async def bookings_of(conn: asyncpg.Connection, reservation_ids: list[str]) -> list[Booking]:
    """The live bookings of these reservations (the caller's transaction sees its own)."""
    rows = await conn.fetch(
        f"""SELECT id, reservation_id, resource_id, vendor_id, partner_id,
                   {_ms("slot_start")}, {_ms("slot_end")}, {_ms("block_start")},
                   {_ms("block_end")}
            FROM bookings WHERE reservation_id = ANY($1::text[]) AND cancelled_at IS NULL""",
        reservation_ids)
    return [Booking(*row) for row in rows]


async def load_reservation(conn: asyncpg.Connection, reservation_id: str) -> StoredReservation | None:
    """The snapshot and its transitions by version; answers reads once Redis has forgotten."""
    row = await conn.fetchrow(
        f"SELECT {columns(StoredReservation)} FROM reservations WHERE id = $1", reservation_id)
    if row is None:
        return None
    history = await conn.fetch(
        f"""SELECT {columns(Transition)} FROM reservation_history
            WHERE reservation_id = $1 ORDER BY version""",
        reservation_id)
    return StoredReservation.from_row(row, [
        Transition(**{**h, "metadata": json_value(h["metadata"])}) for h in history])


MAX_AUDIT_PAGE = 1000


async def query_audit(conn: asyncpg.Connection, *, reservation_id: str | None = None,
                      resource_id: str | None = None, actor: str | None = None,
                      since: datetime | None = None, until: datetime | None = None,
                      limit: int = 100, after_id: int | None = None) -> list[AuditEntry]:
    """Audit rows matching every given filter, oldest first; ``since <= at < until``.

    Page with ``after_id`` = the last ``id`` of the previous page (keyset, stable under
    concurrent appends).
    """
    if not 1 <= limit <= MAX_AUDIT_PAGE + 1:  # + 1: the row that shows a next page exists
        raise ValidationError(f"limit must be between 1 and {MAX_AUDIT_PAGE}",
                              details={"field": "limit"})
    if since is not None and until is not None and until <= since:
        raise ValidationError("until must be after since", details={"field": "until"})
    rows = await conn.fetch(
        f"""SELECT {columns(AuditEntry)} FROM audit_log
           WHERE ($1::text IS NULL OR reservation_id = $1)
             AND ($2::text IS NULL OR resource_id = $2)
             AND ($3::text IS NULL OR actor = $3)
             AND ($4::timestamptz IS NULL OR at >= $4)
             AND ($5::timestamptz IS NULL OR at < $5)
             AND ($6::bigint IS NULL OR id > $6)
           ORDER BY id LIMIT $7""",
        reservation_id, resource_id, actor, since, until, after_id, limit)
    return [AuditEntry(**{**r, "metadata": json_value(r["metadata"])}) for r in rows]


async def record_audit(conn: asyncpg.Connection, *, event_id: str, action: str, actor: str,
                       at: datetime, tenant_id: str | None = None,
                       reservation_id: str | None = None, resource_id: str | None = None,
                       metadata: dict[str, Any] | None = None) -> bool:
    """Append one audit row for an action that is not a stream event (e.g. manual release).

    Idempotent on ``event_id``: returns False when that event was already recorded.
    """
    if not event_id or not action or not actor:
        raise ValidationError("event_id, action and actor are required")
    status = await conn.execute(
        """INSERT INTO audit_log (event_id, tenant_id, reservation_id, resource_id, action,
                                  actor, at, metadata)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::jsonb)
           ON CONFLICT (event_id) DO NOTHING""",
        event_id, tenant_id, reservation_id, resource_id, action, actor, at,
        json_param(metadata or {}))
    return status == "INSERT 0 1"
