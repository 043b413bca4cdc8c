"""Keyset-paged reads of the read models (issue 17): reservations, bookings, vendors,
partners and API keys (never a digest). Every function answers at most ``limit`` rows after
the given position, in one fixed total order, so paging while rows are inserted shows no
row twice and skips none that existed when paging began.

Orders: reservations and bookings newest first, ``(created_at, id)`` descending (the
timestamp is the reservation's creation, written once; the id breaks ties); vendors,
partners and keys by id.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from engine.db import columns
from engine.store.queries import StoredReservation


@dataclass(frozen=True, slots=True)
class BookingRow:
    id: str
    reservation_id: str
    resource_id: str
    vendor_id: str
    partner_id: str
    requester_id: str
    slot_start: datetime
    slot_end: datetime
    created_at: datetime
    cancelled_at: datetime | None


@dataclass(frozen=True, slots=True)
class PartnerRow:
    id: str
    name: str
    active: bool


@dataclass(frozen=True, slots=True)
class KeyRow:
    id: str
    prefix: str
    role: str
    partner_id: str | None
    vendor_id: str | None
    created_at: datetime
    revoked_at: datetime | None


async def reservations(conn: asyncpg.Connection, *, partner_id: str | None,
                       vendor_id: str | None, states: list[str] | None,
                       start_from: datetime | None, start_to: datetime | None,
                       after: tuple[datetime, str] | None, limit: int
                       ) -> list[StoredReservation]:
    """A page of reservations in the one stored shape (items included, no history)."""
    rows = await conn.fetch(
        f"""SELECT {columns(StoredReservation)} FROM reservations
            WHERE ($1::text IS NULL OR partner_id = $1)
              AND ($2::text IS NULL OR vendor_id = $2)
              AND ($3::text[] IS NULL OR state = ANY($3))
              AND ($4::timestamptz IS NULL OR slot_start >= $4)
              AND ($5::timestamptz IS NULL OR slot_start < $5)
              AND ($6::timestamptz IS NULL OR (created_at, id) < ($6, $7::text))
            ORDER BY created_at DESC, id DESC LIMIT $8""",
        partner_id, vendor_id, states, start_from, start_to,
        after[0] if after else None, after[1] if after else None, limit)
    return [StoredReservation.from_row(row) for row in rows]


async def bookings(conn: asyncpg.Connection, *, partner_id: str | None, vendor_id: str | None,
                   start_from: datetime | None, start_to: datetime | None,
                   after: tuple[datetime, str] | None, limit: int) -> list[BookingRow]:
    rows = await conn.fetch(
        f"""SELECT {columns(BookingRow)} FROM bookings
            WHERE ($1::text IS NULL OR partner_id = $1)
              AND ($2::text IS NULL OR vendor_id = $2)
              AND ($3::timestamptz IS NULL OR slot_start >= $3)
              AND ($4::timestamptz IS NULL OR slot_start < $4)
              AND ($5::timestamptz IS NULL OR (created_at, id) < ($5, $6::text))
            ORDER BY created_at DESC, id DESC LIMIT $7""",
        partner_id, vendor_id, start_from, start_to,
        after[0] if after else None, after[1] if after else None, limit)
    return [BookingRow(**row) for row in rows]


async def vendors(conn: asyncpg.Connection, *, after: str | None, limit: int):
    from engine.directory import Vendor

    rows = await conn.fetch(
        f"""SELECT {columns(Vendor)} FROM vendors WHERE ($1::text IS NULL OR id > $1)
            ORDER BY id LIMIT $2""", after, limit)
    return [Vendor(**row) for row in rows]


async def partners(conn: asyncpg.Connection, *, after: str | None,
                   limit: int) -> list[PartnerRow]:
    rows = await conn.fetch(
        f"""SELECT {columns(PartnerRow)} FROM partners WHERE ($1::text IS NULL OR id > $1)
            ORDER BY id LIMIT $2""", after, limit)
    return [PartnerRow(**row) for row in rows]


async def keys(conn: asyncpg.Connection, *, role: str | None, partner_id: str | None,
               vendor_id: str | None, after: str | None, limit: int) -> list[KeyRow]:
    rows = await conn.fetch(
        f"""SELECT {columns(KeyRow)} FROM api_keys
            WHERE ($1::text IS NULL OR role = $1)
              AND ($2::text IS NULL OR partner_id = $2)
              AND ($3::text IS NULL OR vendor_id = $3)
              AND ($4::text IS NULL OR id > $4)
            ORDER BY id LIMIT $5""", role, partner_id, vendor_id, after, limit)
    return [KeyRow(**row) for row in rows]
