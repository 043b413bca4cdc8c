"""The system of record: transition events, bookings and the audit trail in Postgres.

The lifecycle scripts append one stream entry per transition; the commit-queue worker hands
a batch of them to :func:`apply_events`, which writes the whole batch in one transaction
with set-based (unnest) statements. Delivery is at least once, so every write is keyed:
history and audit rows by event id, the snapshot by version, a booking by reservation id.
The bookings exclusion constraint is the last line against a double booking: a booking it
refuses fails that one reservation (``availability_changed``) and no other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg
import orjson

from engine.db import columns, json_param, json_value
from engine.errors import ValidationError

STATES = frozenset((
    "INTENT_CREATED", "HELD", "AWAITING_VENDOR_CONFIRMATION", "CONFIRMED_BY_VENDOR",
    "AWAITING_VENDOR_AUTH", "VENDOR_AUTHORIZED", "AWAITING_REQUESTER_AUTH", "AUTHORIZED_BOTH",
    "COMMIT_IN_PROGRESS", "COMMITTED", "FAILED_VENDOR_TIMEOUT", "FAILED_VENDOR_AUTH",
    "FAILED_REQUESTER_AUTH", "FAILED_AVAILABILITY_CHANGED", "FAILED_COMMIT", "EXPIRED",
    "CANCELLED",
))
# States whose reason is the reason the reservation did not (or no longer does) go ahead.
ENDED_STATES = frozenset(s for s in STATES if s.startswith("FAILED_")) | {"EXPIRED", "CANCELLED"}
ACTORS = frozenset(("system", "vendor", "requester", "partner", "timeout", "ops", "admin"))
COMMIT_STATE = "COMMIT_IN_PROGRESS"
# A later snapshot in one of these states still stands behind the booking.
BOOKING_STATES = ("COMMIT_IN_PROGRESS", "COMMITTED")

_REQUIRED = ("eventId", "reservationId", "toState", "triggeredBy", "version", "timestamp",
             "partnerId", "vendorId", "resourceId", "requesterId", "slotStart", "slotEnd",
             "blockStart", "blockEnd", "createdAt")
_MS_FIELDS = ("timestamp", "slotStart", "slotEnd", "blockStart", "blockEnd", "createdAt")


def _ts(ms_column: str) -> str:
    """SQL turning integer ms since the epoch into timestamptz, exactly (no float detour)."""
    return f"(timestamptz 'epoch' + {ms_column} * interval '1 millisecond')"


def _ms(ts_column: str) -> str:
    return f"(extract(epoch FROM {ts_column}) * 1000)::bigint"


class EventResult(StrEnum):
    BOOKED = "booked"  # the reservation's booking row exists (new or from an earlier delivery)
    AVAILABILITY_CHANGED = "availability_changed"  # the exclusion constraint refused it
    RECORDED = "recorded"  # a non-commit transition, written now
    DUPLICATE = "duplicate"  # a non-commit transition that was already written
    SUPERSEDED = "superseded"  # a commit whose reservation has since failed: no booking
    REJECTED = "rejected"  # malformed (nothing written), or a commit on an unknown resource
    # (the transition is recorded, no booking is)


@dataclass(frozen=True, slots=True)
class EventOutcome:
    event_id: str
    reservation_id: str
    result: EventResult
    already_applied: bool = False  # the history row existed before this call
    booking_id: str | None = None
    conflicting_booking_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class _Event:
    event_id: str
    reservation_id: str
    from_state: str
    to_state: str
    triggered_by: str
    reason: str
    metadata: str  # JSON object text, validated
    idempotency_key: str
    version: int
    at_ms: int
    partner_id: str
    vendor_id: str
    resource_id: str
    requester_id: str
    slot_start_ms: int
    slot_end_ms: int
    block_start_ms: int
    block_end_ms: int
    created_at_ms: int
    expires_at_ms: int | None


def booking_id_for(reservation_id: str) -> str:
    """Deterministic, so a redelivered commit finds the booking its first delivery wrote."""
    return "bkg_" + reservation_id.removeprefix("rsv_")


def _parse_event(raw: dict[str, str]) -> _Event:
    missing = [name for name in _REQUIRED if not raw.get(name)]
    if missing:
        raise ValueError(f"missing fields: {', '.join(missing)}")
    reservation_id = raw["reservationId"]
    if not reservation_id.startswith("rsv_"):
        raise ValueError("reservationId is not a reservation id")
    to_state, from_state = raw["toState"], raw.get("fromState") or ""
    if to_state not in STATES or (from_state and from_state not in STATES):
        raise ValueError(f"unknown state {from_state!r} -> {to_state!r}")
    if raw["triggeredBy"] not in ACTORS:
        raise ValueError(f"unknown actor {raw['triggeredBy']!r}")
    try:
        ms = {name: int(raw[name]) for name in _MS_FIELDS}
        version = int(raw["version"])
        expires = int(raw["expiresAt"]) if raw.get("expiresAt") else None
    except ValueError:
        raise ValueError("version and timestamps must be integers") from None
    if not ms["blockStart"] <= ms["slotStart"] < ms["slotEnd"] <= ms["blockEnd"]:
        raise ValueError("intervals out of order: need blockStart <= slotStart < slotEnd <= blockEnd")
    metadata = raw.get("metadata") or "{}"
    try:
        if not isinstance(orjson.loads(metadata), dict):
            raise ValueError
    except ValueError:
        raise ValueError("metadata is not a JSON object") from None
    return _Event(raw["eventId"], reservation_id, from_state, to_state, raw["triggeredBy"],
                  raw.get("reason") or "", metadata, raw.get("idempotencyKey") or "", version,
                  ms["timestamp"], raw["partnerId"], raw["vendorId"], raw["resourceId"],
                  raw["requesterId"], ms["slotStart"], ms["slotEnd"], ms["blockStart"],
                  ms["blockEnd"], ms["createdAt"], expires)


# One unnest per statement: a batch is a handful of round trips whatever its size. History
# and audit rows come from the same arrays in one statement, so one exists iff the other does.
_INSERT_TRANSITIONS = f"""
WITH e AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::text[], $9::int[], $10::bigint[],
                         $11::text[], $12::text[])
        AS e(event_id, reservation_id, from_state, to_state, triggered_by, reason, metadata,
             idempotency_key, version, at_ms, partner_id, resource_id)
), history AS (
    INSERT INTO reservation_history (event_id, reservation_id, from_state, to_state,
                                     triggered_by, reason, metadata, idempotency_key, version, at)
    SELECT event_id, reservation_id, nullif(from_state, ''), to_state, triggered_by,
           nullif(reason, ''), metadata::jsonb, nullif(idempotency_key, ''), version,
           {_ts("at_ms")}
    FROM e
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
), audit AS (
    INSERT INTO audit_log (event_id, tenant_id, reservation_id, resource_id, action, actor, at,
                           metadata)
    SELECT event_id, partner_id, reservation_id, resource_id, 'reservation.' || lower(to_state),
           triggered_by, {_ts("at_ms")},
           jsonb_build_object('fromState', nullif(from_state, ''), 'toState', to_state,
                              'reason', reason, 'version', version,
                              'idempotencyKey', nullif(idempotency_key, ''),
                              'metadata', metadata::jsonb)
    FROM e
    ON CONFLICT (event_id) DO NOTHING
)
SELECT event_id FROM history
"""

# The snapshot only moves forward: an older or repeated event leaves it as it is.
_UPSERT_SNAPSHOT = f"""
INSERT INTO reservations (id, partner_id, vendor_id, resource_id, requester_id, slot_start,
                          slot_end, state, version, created_at, updated_at, expires_at,
                          failure_reason, metadata, booking_id)
SELECT s.id, s.partner_id, s.vendor_id, s.resource_id, s.requester_id, {_ts("s.slot_start")},
       {_ts("s.slot_end")}, s.state, s.version, {_ts("s.created_at")}, {_ts("s.updated_at")},
       {_ts("s.expires_at")}, s.failure_reason, s.metadata::jsonb, s.booking_id
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
            $7::bigint[], $8::text[], $9::int[], $10::bigint[], $11::bigint[], $12::bigint[],
            $13::text[], $14::text[], $15::text[])
     AS s(id, partner_id, vendor_id, resource_id, requester_id, slot_start, slot_end, state,
          version, created_at, updated_at, expires_at, failure_reason, metadata, booking_id)
ON CONFLICT (id) DO UPDATE
SET state = EXCLUDED.state, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at,
    expires_at = EXCLUDED.expires_at,
    failure_reason = coalesce(EXCLUDED.failure_reason, reservations.failure_reason),
    booking_id = coalesce(EXCLUDED.booking_id, reservations.booking_id),
    metadata = reservations.metadata || EXCLUDED.metadata
WHERE reservations.version < EXCLUDED.version
"""

# No booking for a commit whose reservation has already moved on to a failure: a redelivered
# commit must not resurrect a slot the engine has given up on. (The snapshot is looked up by
# key through the CTE; a correlated NOT EXISTS let the planner hash the whole table.)
_INSERT_BOOKINGS = f"""
WITH moved_on AS (
    SELECT id, version FROM reservations
    WHERE id = ANY($2::text[]) AND state <> ALL($12::text[])
)
INSERT INTO bookings (id, reservation_id, resource_key, resource_id, vendor_id, partner_id,
                      requester_id, slot_start, slot_end, block_start, block_end)
SELECT b.id, b.reservation_id, r.key, b.resource_id, b.vendor_id, b.partner_id,
       b.requester_id, {_ts("b.slot_start")}, {_ts("b.slot_end")}, {_ts("b.block_start")},
       {_ts("b.block_end")}
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::int[])
     WITH ORDINALITY
     AS b(id, reservation_id, resource_id, vendor_id, partner_id, requester_id, slot_start,
          slot_end, block_start, block_end, version, ord)
JOIN resources r ON r.id = b.resource_id
WHERE NOT EXISTS (SELECT 1 FROM moved_on m
                  WHERE m.id = b.reservation_id AND m.version > b.version)
ORDER BY b.ord
ON CONFLICT (reservation_id) DO NOTHING
RETURNING reservation_id, id
"""

_FIND_CONFLICT = f"""
SELECT bk.id FROM bookings bk JOIN resources r ON r.id = $1
WHERE int8range(bk.resource_key, bk.resource_key, '[]') && int8range(r.key, r.key, '[]')
  AND tstzrange(bk.block_start, bk.block_end, '[)')
      && tstzrange({_ts("$2::bigint")}, {_ts("$3::bigint")}, '[)')
  AND bk.cancelled_at IS NULL AND bk.reservation_id <> $4
ORDER BY bk.block_start LIMIT 1
"""


async def apply_events(conn: asyncpg.Connection, events: list[dict[str, str]]) -> list[EventOutcome]:
    """Write a batch of stream events in ONE transaction; one outcome per event, in order.

    Idempotent: applying a batch again writes nothing new and reports the same bookings
    (``already_applied`` is then true). A commit event (toState ``COMMIT_IN_PROGRESS``)
    writes the booking; if the exclusion constraint refuses it, that event reports
    ``availability_changed`` (with the booking in the way) and the rest of the batch still
    commits. A malformed event is ``rejected`` and writes nothing. Values are ``str`` as a
    ``decode_responses=True`` Redis client returns them.
    """
    parsed: dict[str, _Event] = {}
    outcomes: list[EventOutcome | _Event] = []
    for raw in events:
        try:
            event = _parse_event(raw)
        except ValueError as exc:
            outcomes.append(EventOutcome(str(raw.get("eventId", "")),
                                         str(raw.get("reservationId", "")),
                                         EventResult.REJECTED, reason=str(exc)))
            continue
        parsed.setdefault(event.event_id, event)
        outcomes.append(event)
    if not parsed:
        return [o for o in outcomes if isinstance(o, EventOutcome)]

    batch = list(parsed.values())
    latest = _latest_per_reservation(batch)
    commits = [e for e in batch if e.to_state == COMMIT_STATE]
    # A later event of the same batch that left the booking states supersedes the commit.
    bookable = [e for e in commits if latest[e.reservation_id].version == e.version
                or latest[e.reservation_id].to_state in BOOKING_STATES]
    async with conn.transaction():
        new_ids = {r[0] for r in await conn.fetch(_INSERT_TRANSITIONS, *_history_columns(batch))}
        booked, conflicts = await _insert_bookings(conn, bookable) if bookable else ({}, {})
        fates = await _booking_fates(conn, commits, booked, conflicts) if commits else {}
        await conn.execute(_UPSERT_SNAPSHOT, *_snapshot_columns(latest.values(), booked))

    seen: set[str] = set()
    result: list[EventOutcome] = []
    for item in outcomes:
        if isinstance(item, EventOutcome):
            result.append(item)
            continue
        applied = item.event_id not in new_ids or item.event_id in seen
        seen.add(item.event_id)
        if item.to_state == COMMIT_STATE:
            fate, booking_id, conflicting, reason = fates[item.event_id]
            result.append(EventOutcome(item.event_id, item.reservation_id, fate, applied,
                                       booking_id, conflicting, reason))
        else:
            result.append(EventOutcome(item.event_id, item.reservation_id,
                                       EventResult.DUPLICATE if applied else EventResult.RECORDED,
                                       applied))
    return result


async def _insert_bookings(conn: asyncpg.Connection, commits: list[_Event]
                           ) -> tuple[dict[str, str], dict[str, str | None]]:
    """Insert every booking at once; on an exclusion violation, one savepoint per booking.

    Returns the bookings inserted now (reservation id -> booking id) and, for each commit
    event the constraint refused, the id of a booking in its way.
    """
    states = list(BOOKING_STATES)
    try:
        async with conn.transaction():
            return dict(await conn.fetch(_INSERT_BOOKINGS, *_booking_columns(commits), states)), {}
    except asyncpg.ExclusionViolationError:
        pass
    inserted: dict[str, str] = {}
    conflicts: dict[str, str | None] = {}
    for event in commits:  # batch order: the earlier event wins within the batch
        try:
            async with conn.transaction():
                inserted.update(await conn.fetch(_INSERT_BOOKINGS, *_booking_columns([event]),
                                                 states))
        except asyncpg.ExclusionViolationError:
            conflicts[event.event_id] = await conn.fetchval(
                _FIND_CONFLICT, event.resource_id, event.block_start_ms, event.block_end_ms,
                event.reservation_id)
    return inserted, conflicts


async def _booking_fates(conn: asyncpg.Connection, commits: list[_Event], booked: dict[str, str],
                         conflicts: dict[str, str | None]) -> dict[str, tuple]:
    """What became of each commit event: booked, refused, superseded or unknown resource.

    Adds the bookings of earlier deliveries to ``booked``. Costs no query when every
    commit of the batch was booked just now (the common case).
    """
    others = list({e.reservation_id for e in commits if e.reservation_id not in booked})
    if others:
        booked.update(await conn.fetch(
            "SELECT reservation_id, id FROM bookings WHERE reservation_id = ANY($1::text[])",
            others))
    missing = {e.resource_id for e in commits if e.reservation_id not in booked}
    known: set[str] = set()
    if missing:
        known = {r[0] for r in await conn.fetch(
            "SELECT id FROM resources WHERE id = ANY($1::text[])", list(missing))}
    fates = {}
    for e in commits:
        if e.reservation_id in booked:
            fates[e.event_id] = (EventResult.BOOKED, booked[e.reservation_id], None, None)
        elif e.event_id in conflicts:
            fates[e.event_id] = (EventResult.AVAILABILITY_CHANGED, None, conflicts[e.event_id],
                                 "the interval overlaps a committed booking")
        elif e.resource_id not in known:
            fates[e.event_id] = (EventResult.REJECTED, None, None,
                                 f"unknown resource {e.resource_id!r}")
        else:
            fates[e.event_id] = (EventResult.SUPERSEDED, None, None,
                                 "the reservation has since failed")
    return fates


def _latest_per_reservation(batch: list[_Event]) -> dict[str, _Event]:
    latest: dict[str, _Event] = {}
    for e in batch:
        if e.reservation_id not in latest or latest[e.reservation_id].version < e.version:
            latest[e.reservation_id] = e
    return latest


def _history_columns(batch: list[_Event]) -> list[list[Any]]:
    return [[e.event_id for e in batch], [e.reservation_id for e in batch],
            [e.from_state for e in batch], [e.to_state for e in batch],
            [e.triggered_by for e in batch], [e.reason for e in batch],
            [e.metadata for e in batch], [e.idempotency_key for e in batch],
            [e.version for e in batch], [e.at_ms for e in batch],
            [e.partner_id for e in batch], [e.resource_id for e in batch]]


def _snapshot_columns(latest: Iterable[_Event], booked: dict[str, str]) -> list[list[Any]]:
    # ON CONFLICT DO UPDATE may touch a row once per statement: one row per reservation,
    # from its newest event of the batch.
    rows = list(latest)
    return [[e.reservation_id for e in rows], [e.partner_id for e in rows],
            [e.vendor_id for e in rows], [e.resource_id for e in rows],
            [e.requester_id for e in rows], [e.slot_start_ms for e in rows],
            [e.slot_end_ms for e in rows], [e.to_state for e in rows],
            [e.version for e in rows], [e.created_at_ms for e in rows],
            [e.at_ms for e in rows], [e.expires_at_ms for e in rows],
            [(e.reason or e.to_state.lower()) if e.to_state in ENDED_STATES else None
             for e in rows],
            [e.metadata for e in rows], [booked.get(e.reservation_id) for e in rows]]


def _booking_columns(commits: list[_Event]) -> list[list[Any]]:
    return [[booking_id_for(e.reservation_id) for e in commits],
            [e.reservation_id for e in commits], [e.resource_id for e in commits],
            [e.vendor_id for e in commits], [e.partner_id for e in commits],
            [e.requester_id for e in commits], [e.slot_start_ms for e in commits],
            [e.slot_end_ms for e in commits], [e.block_start_ms for e in commits],
            [e.block_end_ms for e in commits], [e.version for e in commits]]


# ---- reads: rehydration, reservation records, audit queries ---------------------------------
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
class StoredReservation:
    id: str
    partner_id: str
    vendor_id: str
    resource_id: str
    requester_id: str
    slot_start: datetime
    slot_end: datetime
    state: str
    version: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    booking_id: str | None
    failure_reason: str | None
    metadata: dict[str, Any]
    history: list[Transition] = field(default_factory=list, metadata={"column": False})


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
    return StoredReservation(**{**row, "metadata": json_value(row["metadata"])}, history=[
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
    if not 1 <= limit <= MAX_AUDIT_PAGE:
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


# ---- writes outside the event stream ------------------------------------------------------
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
    """Keep a stream entry that failed too often, durably. Idempotent per (stream, entry)."""
    status = await conn.execute(
        """INSERT INTO dead_letters (stream, entry_id, fields, error, deliveries)
           VALUES ($1, $2, $3::text::jsonb, $4, $5)
           ON CONFLICT (stream, entry_id) DO NOTHING""",
        stream, entry_id, json_param(fields), error, deliveries)
    return status == "INSERT 0 1"
