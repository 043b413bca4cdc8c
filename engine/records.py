"""The system of record: transition events, bookings and the audit trail in Postgres.

The lifecycle scripts append one stream entry per transition; the commit-queue worker hands
a batch of them to :func:`apply_events`, which writes the whole batch in one transaction
with set-based (unnest) statements. Delivery is at least once, so every write is keyed:
history and audit rows by event id, the snapshot by version, a booking by reservation id.
The bookings exclusion constraint is the last line against a double booking: a booking it
refuses fails that one reservation (``availability_changed``) and no other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
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

# Fields every stream entry carries (lua/lib/emit_transition.lua), and the fields that never
# change, carried by the creation entry only (older entries carry them on every event).
_REQUIRED = ("reservationId", "toState", "triggeredBy", "version", "timestamp")
INFO_FIELDS = ("partnerId", "vendorId", "resourceId", "requesterId", "slotStart", "slotEnd",
               "blockStart", "blockEnd", "createdAt")
# Every field an entry may carry, in the order emit_transition.lua writes them (kept for
# tooling and tests that build entries by hand).
FIELD_LAYOUT = ["reservationId", "version", "fromState", "toState", "triggeredBy",
                "timestamp", "path", "fromVersion", "expiresAt", "reason", "metadata",
                "idempotencyKey", *INFO_FIELDS]


def _ts(ms_column: str) -> str:
    """SQL turning integer ms since the epoch into timestamptz, exactly (no float detour)."""
    return f"(timestamptz 'epoch' + {ms_column} * interval '1 millisecond')"


def _ms(ts_column: str) -> str:
    return f"(extract(epoch FROM {ts_column}) * 1000)::bigint"


class EventResult(StrEnum):
    BOOKED = "booked"  # the reservation's booking row exists (new or from an earlier delivery)
    AVAILABILITY_CHANGED = "availability_changed"  # the exclusion constraint refused it
    RECORDED = "recorded"  # non-commit transitions, written now
    DUPLICATE = "duplicate"  # non-commit transitions that were already written
    SUPERSEDED = "superseded"  # a commit whose reservation has since failed: no booking
    REJECTED = "rejected"  # malformed (nothing written), or a commit on an unknown resource
    # (the transition is recorded, no booking is)
    DEFERRED = "deferred"  # a later entry of a reservation whose creation entry is not
    # written yet (nothing written): try again once it is


@dataclass(frozen=True, slots=True)
class EventOutcome:
    event_id: str
    reservation_id: str
    result: EventResult
    already_applied: bool = False  # the history rows existed before this call
    booking_id: str | None = None
    conflicting_booking_id: str | None = None
    reason: str | None = None


@dataclass(slots=True)
class AppliedBatch:
    """What became of each entry of a batch, without an object per entry.

    The commit queue's view of :func:`apply_batch`; :func:`apply_events` expands it into one
    :class:`EventOutcome` per entry.
    """

    results: list[EventResult]  # per entry, in order
    already_applied: list[bool]  # per entry: all its history rows existed before (or
    # earlier in the batch)
    details: dict[int, EventOutcome]  # by position: every commit entry, every rejected and
    # every deferred one
    transitions: Counter[tuple[str, str, str]]  # (fromState, toState, triggeredBy) ->
    # transitions written now; filled only when asked for (metrics)


def booking_id_for(reservation_id: str) -> str:
    """Deterministic, so a redelivered commit finds the booking its first delivery wrote."""
    return "bkg_" + reservation_id.removeprefix("rsv_")


def _json_string(value: str) -> str:
    return orjson.dumps(value).decode()


# The unchanging fields of one reservation: partner, vendor, resource, requester, slot
# start/end, block start/end, created-at (ms).
Info = tuple[str, str, str, str, int, int, int, int, int]


@dataclass(slots=True)
class _Entry:
    """One parsed stream entry: one script call, one or more transitions."""

    reservation_id: str
    from_state: str
    states: list[str]  # every state the call entered, in order
    version: int  # the version after the last state
    actor: str
    reason: str
    metadata: str  # the call's metadata (its first transition's)
    idempotency_key: str
    at: int
    expires: int | None


class _Batch:
    """A batch parsed straight into columns: one list per column, one row per distinct
    transition (an entry carrying a path gives one row per state it passed), no object per
    row. Built in two steps: parse, then :meth:`build` once the unchanging fields of
    reservations created in earlier batches are known."""

    __slots__ = ("event_id", "reservation_id", "from_state", "to_state", "triggered_by",
                 "reason", "metadata", "idempotency_key", "version", "at_ms", "partner_id",
                 "vendor_id", "resource_id", "requester_id", "slot_start", "slot_end",
                 "block_start", "block_end", "created_at", "expires_at", "audit", "rows",
                 "rejected", "entries", "info", "raw")

    def __init__(self, events: list[dict[str, str] | list[str]]) -> None:
        (self.event_id, self.reservation_id, self.from_state, self.to_state,
         self.triggered_by, self.reason, self.metadata, self.idempotency_key, self.version,
         self.at_ms, self.partner_id, self.vendor_id, self.resource_id, self.requester_id,
         self.slot_start, self.slot_end, self.block_start, self.block_end, self.created_at,
         self.expires_at, self.audit) = ([] for _ in range(21))
        self.rows: list[list[int]] = []  # per entry: its rows (empty: rejected or deferred)
        self.rejected: dict[int, EventOutcome] = {}  # by position: rejected and deferred
        self.entries: list[_Entry | None] = []  # per position; None when rejected
        self.info: dict[str, Info] = {}  # reservation id -> its unchanging fields
        self.raw = events
        for position, raw in enumerate(events):
            named = raw if type(raw) is not list else fields_dict(raw)
            entry, error = _parse_entry(named, self.info)
            self.entries.append(entry)
            if error is not None:
                self.rejected[position] = EventOutcome(
                    str(named.get("eventId") or _event_id(named)),
                    str(named.get("reservationId", "")), EventResult.REJECTED, reason=error)

    def unknown_reservations(self) -> list[str]:
        """Reservations of this batch whose creation entry is not in it."""
        info = self.info
        return list({e.reservation_id for e in self.entries
                     if e is not None and e.reservation_id not in info})

    def build(self, known: dict[str, Info]) -> None:
        """Fill the columns; ``known`` has the unchanging fields of reservations created in
        earlier batches. An entry of a reservation known nowhere is deferred."""
        info = self.info
        index: dict[str, int] = {}
        for position, entry in enumerate(self.entries):
            rows: list[int] = []
            self.rows.append(rows)
            if entry is None:
                continue
            fields = info.get(entry.reservation_id) or known.get(entry.reservation_id)
            if fields is None:
                self.rejected[position] = EventOutcome(
                    f"{entry.reservation_id}:{entry.version}", entry.reservation_id,
                    EventResult.DEFERRED,
                    reason="no creation entry written for this reservation yet")
                continue
            first = entry.version - len(entry.states) + 1
            from_state = entry.from_state
            for i, to_state in enumerate(entry.states):
                version = first + i
                event_id = f"{entry.reservation_id}:{version}"
                row = index.get(event_id)
                if row is not None:  # the same transition twice in one batch: written once
                    rows.append(row)
                    from_state = to_state
                    continue
                rows.append(index.setdefault(event_id, len(self.event_id)))
                metadata = entry.metadata if i == 0 else "{}"
                self._append(event_id, entry, from_state, to_state, version, metadata, fields)
                from_state = to_state

    def _append(self, event_id: str, entry: _Entry, from_state: str, to_state: str,
                version: int, metadata: str, fields: Info) -> None:
        reason, idempotency_key = entry.reason, entry.idempotency_key
        self.event_id.append(event_id)
        self.reservation_id.append(entry.reservation_id)
        self.from_state.append(from_state)
        self.to_state.append(to_state)
        self.triggered_by.append(entry.actor)
        self.reason.append(reason)
        self.metadata.append(metadata)
        self.idempotency_key.append(idempotency_key)
        self.version.append(version)
        self.at_ms.append(entry.at)
        (partner, vendor, resource, requester, slot_start, slot_end, block_start, block_end,
         created) = fields
        self.partner_id.append(partner)
        self.vendor_id.append(vendor)
        self.resource_id.append(resource)
        self.requester_id.append(requester)
        self.slot_start.append(slot_start)
        self.slot_end.append(slot_end)
        self.block_start.append(block_start)
        self.block_end.append(block_end)
        self.created_at.append(created)
        self.expires_at.append(entry.expires)
        # The audit row's metadata, as JSON text Postgres parses once (states come from a
        # closed set, so only reason and key need escaping; metadata is a validated
        # object): the same jsonb as jsonb_build_object, at a fraction of its cost.
        self.audit.append(
            f'{{"fromState":{chr(34) + from_state + chr(34) if from_state else "null"},'
            f'"toState":"{to_state}",'
            f'"reason":{_json_string(reason) if reason else chr(34) * 2},'
            f'"version":{version},'
            f'"idempotencyKey":{_json_string(idempotency_key) if idempotency_key else "null"},'
            f'"metadata":{metadata}}}')


    def transition_columns(self) -> tuple[bool, list[Any]]:
        """The transitions statement's parameters, and whether they are joined text.

        asyncpg encodes an array element by element (two ABC isinstance checks each, a
        third of the drain's Python time); a column joined with a separator Postgres splits
        (string_to_array) costs one C-level join. A text column whose values contain the
        separator, or a batch of one event (``''`` would split into no element), goes as
        arrays.
        """
        text = [self.event_id, self.reservation_id, self.from_state, self.to_state,
                self.triggered_by, self.reason, self.metadata, self.idempotency_key]
        tail = [self.partner_id, self.resource_id, self.audit]
        if len(self.event_id) > 1:
            joined = [_SEPARATOR.join(column) for column in text + tail]
            if all(value.count(_SEPARATOR) == len(self.event_id) - 1 for value in joined):
                numbers = [_SEPARATOR.join(map(str, self.version)),
                           _SEPARATOR.join(map(str, self.at_ms))]
                return True, joined[:8] + numbers + joined[8:]
        return False, text + [self.version, self.at_ms] + tail

    def latest_per_reservation(self) -> dict[str, int]:
        """Reservation id -> row of its newest event in the batch."""
        latest: dict[str, int] = {}
        versions = self.version
        for row, reservation_id in enumerate(self.reservation_id):
            other = latest.get(reservation_id)
            if other is None or versions[other] < versions[row]:
                latest[reservation_id] = row
        return latest

    def booking_columns(self, rows: list[int]) -> list[list[Any]]:
        reservation_ids = [self.reservation_id[r] for r in rows]
        return [[booking_id_for(r) for r in reservation_ids], reservation_ids,
                [self.resource_id[r] for r in rows], [self.vendor_id[r] for r in rows],
                [self.partner_id[r] for r in rows], [self.requester_id[r] for r in rows],
                [self.slot_start[r] for r in rows], [self.slot_end[r] for r in rows],
                [self.block_start[r] for r in rows], [self.block_end[r] for r in rows],
                [self.version[r] for r in rows]]

    def snapshot_columns(self, latest: Iterable[int], booked: dict[str, str]) -> list[list[Any]]:
        # ON CONFLICT DO UPDATE may touch a row once per statement: one row per reservation,
        # from its newest event of the batch.
        rows = list(latest)
        to_states = [self.to_state[r] for r in rows]
        return [[self.reservation_id[r] for r in rows], [self.partner_id[r] for r in rows],
                [self.vendor_id[r] for r in rows], [self.resource_id[r] for r in rows],
                [self.requester_id[r] for r in rows], [self.slot_start[r] for r in rows],
                [self.slot_end[r] for r in rows], to_states, [self.version[r] for r in rows],
                [self.created_at[r] for r in rows], [self.at_ms[r] for r in rows],
                [self.expires_at[r] for r in rows],
                [(self.reason[r] or state.lower()) if state in ENDED_STATES else None
                 for r, state in zip(rows, to_states)],
                self._merged_metadata(rows),
                [booked.get(self.reservation_id[r]) for r in rows],
                [self.block_start[r] for r in rows], [self.block_end[r] for r in rows]]

    def metadata_rows(self) -> list[list[Any]] | None:
        """(reservation, version, metadata) of the rows carrying metadata, or None."""
        rows = [r for r, m in enumerate(self.metadata) if m != "{}"]
        if not rows:
            return None
        return [[self.reservation_id[r] for r in rows], [self.version[r] for r in rows],
                [self.metadata[r] for r in rows]]

    def _merged_metadata(self, latest: list[int]) -> list[str]:
        """Per reservation, the metadata of its transitions in this batch merged in version
        order (a creation's metadata rides on its first transition, not its newest)."""
        found: dict[str, list[tuple[int, str]]] = {}
        for row, metadata in enumerate(self.metadata):
            if metadata != "{}":
                found.setdefault(self.reservation_id[row], []).append((self.version[row],
                                                                       metadata))
        out = []
        for row in latest:
            parts = found.get(self.reservation_id[row])
            if not parts:
                out.append("{}")
            elif len(parts) == 1:
                out.append(parts[0][1])
            else:
                merged: dict[str, Any] = {}
                for _, text in sorted(parts):
                    merged.update(orjson.loads(text))
                out.append(orjson.dumps(merged).decode())
        return out


def fields_dict(flat: list[str]) -> dict[str, str]:
    """A stream entry's flat [name, value, ...] list as a dict."""
    pairs = iter(flat)
    return dict(zip(pairs, pairs))


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(orjson.loads(text), dict)
    except ValueError:
        return False


def expand_entry(fields: dict[str, str] | list[str]) -> list[dict[str, str]]:
    """One stream entry as one dict per transition it records (eventId, fromState, toState,
    version, ...), as the worker writes them; ``ValueError`` for an entry it would refuse.
    For tools and tests: the worker itself goes straight to columns."""
    named = fields if type(fields) is not list else fields_dict(fields)
    entry, error = _parse_entry(named, {})
    if entry is None:
        raise ValueError(error)
    first = entry.version - len(entry.states) + 1
    out = []
    from_state = entry.from_state
    for i, to_state in enumerate(entry.states):
        out.append({"eventId": f"{entry.reservation_id}:{first + i}",
                    "reservationId": entry.reservation_id, "fromState": from_state,
                    "toState": to_state, "version": str(first + i),
                    "triggeredBy": entry.actor, "reason": entry.reason,
                    "metadata": entry.metadata if i == 0 else "{}",
                    "timestamp": str(entry.at)})
        from_state = to_state
    return out


def _event_id(named: dict[str, str]) -> str:
    return f"{named.get('reservationId', '')}:{named.get('version', '')}"


def _parse_entry(named: dict[str, str], info: dict[str, Info]
                 ) -> tuple[_Entry | None, str | None]:
    """One stream entry checked completely; (entry, None) or (None, why it is refused).

    Registers the unchanging fields of a creation entry in ``info`` (the first one of a
    reservation wins)."""
    get = named.get
    missing = [n for n in _REQUIRED if not get(n)]
    if missing:
        return None, "missing fields: " + ", ".join(missing)
    reservation_id, to_state, actor = named["reservationId"], named["toState"], named["triggeredBy"]
    if not reservation_id.startswith("rsv_"):
        return None, "reservationId is not a reservation id"
    from_state = get("fromState") or ""
    path = get("path")
    states = path.split(",") if path else [to_state]
    if states[-1] != to_state:
        return None, "path does not end in toState"
    if (from_state and from_state not in STATES) or any(s not in STATES for s in states):
        return None, f"unknown state {from_state!r} -> {path or to_state!r}"
    if actor not in ACTORS:
        return None, f"unknown actor {actor!r}"
    metadata = get("metadata") or "{}"
    try:
        version, at = int(named["version"]), int(named["timestamp"])
        expires = int(get("expiresAt")) if get("expiresAt") else None
        from_version = int(get("fromVersion")) if get("fromVersion") else None
    except ValueError:
        return None, "version and timestamps must be integers"
    first = version - len(states) + 1
    if first < 1 or (from_version is not None and from_version != first):
        return None, "versions do not match the path"
    if metadata != "{}" and not _is_json_object(metadata):
        return None, "metadata is not a JSON object"
    if any(get(n) is not None for n in INFO_FIELDS):
        values = [get(n) for n in INFO_FIELDS]
        if not all(values):
            return None, "missing fields: " + ", ".join(
                n for n, v in zip(INFO_FIELDS, values) if not v)
        partner, vendor, resource, requester = values[:4]
        try:
            slot_start, slot_end, block_start, block_end, created = map(int, values[4:])
        except ValueError:
            return None, "version and timestamps must be integers"
        if not block_start <= slot_start < slot_end <= block_end:
            return None, ("intervals out of order: need blockStart <= slotStart < "
                          "slotEnd <= blockEnd")
        info.setdefault(reservation_id, (partner, vendor, resource, requester, slot_start,
                                         slot_end, block_start, block_end, created))
    return _Entry(reservation_id, from_state, states, version, actor, get("reason") or "",
                  metadata, get("idempotencyKey") or "", at, expires), None


_SEPARATOR = "\x1f"  # ASCII unit separator: never in an id, a state, or JSON text
_TRANSITION_NAMES = """
        AS e(event_id, reservation_id, from_state, to_state, triggered_by, reason, metadata,
             idempotency_key, version, at_ms, partner_id, resource_id, audit, ord)"""
_TRANSITION_ARRAYS = """
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::text[], $9::int[], $10::bigint[],
                         $11::text[], $12::text[], $13::text[]) WITH ORDINALITY""" + _TRANSITION_NAMES
_TRANSITION_JOINED = "\n    SELECT * FROM unnest(" + ", ".join(
    f"string_to_array(${i}::text, E'\\x1f')" + {9: "::int[]", 10: "::bigint[]"}.get(i, "")
    for i in range(1, 14)) + ") WITH ORDINALITY" + _TRANSITION_NAMES
_HISTORY_ROWS = f"""
    INSERT INTO reservation_history (event_id, reservation_id, from_state, to_state,
                                     triggered_by, reason, metadata, idempotency_key, version, at)
    SELECT event_id, reservation_id, nullif(from_state, ''), to_state, triggered_by,
           nullif(reason, ''), metadata::jsonb, nullif(idempotency_key, ''), version,
           {_ts("at_ms")}
    FROM e"""
_AUDIT_ROWS = f"""
    INSERT INTO audit_log (event_id, tenant_id, reservation_id, resource_id, action, actor, at,
                           metadata)
    SELECT event_id, partner_id, reservation_id, resource_id, 'reservation.' || lower(to_state),
           triggered_by, {_ts("at_ms")}, audit::jsonb
    FROM e"""


def _insert_transitions(rows: str, careful: bool) -> str:
    """One unnest per statement: a batch is a handful of round trips whatever its size.

    History and audit rows come from the same arrays in one statement, so one exists iff
    the other does. The fast form skips the events already written (one primary-key probe
    each: a scalar subquery, never a join the planner could turn into a scan of the whole
    history) and inserts the rest plainly; a concurrent writer of the same event makes it
    fail with a unique violation, and the batch is written again in the careful form
    (ON CONFLICT). Both answer the ordinals (1-based) of the events written now.
    """
    if careful:
        return f"""
WITH e AS ({rows}
), history AS ({_HISTORY_ROWS}
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
), audit AS ({_AUDIT_ROWS}
    ON CONFLICT (event_id) DO NOTHING
)
SELECT e.ord FROM e JOIN history h ON h.event_id = e.event_id
"""
    return f"""
WITH e AS ({rows}
    WHERE (SELECT true FROM reservation_history h WHERE h.event_id = e.event_id) IS NULL
), history AS ({_HISTORY_ROWS}
), audit AS ({_AUDIT_ROWS}
)
SELECT ord FROM e
"""


# (joined, careful) -> statement
_INSERT_TRANSITIONS = {(joined, careful): _insert_transitions(
    _TRANSITION_JOINED if joined else _TRANSITION_ARRAYS, careful)
    for joined in (False, True) for careful in (False, True)}

# The snapshot only moves forward: an older or repeated event leaves it as it is.
_UPSERT_SNAPSHOT = f"""
INSERT INTO reservations (id, partner_id, vendor_id, resource_id, requester_id, slot_start,
                          slot_end, state, version, created_at, updated_at, expires_at,
                          failure_reason, metadata, booking_id, block_start, block_end)
SELECT s.id, s.partner_id, s.vendor_id, s.resource_id, s.requester_id, {_ts("s.slot_start")},
       {_ts("s.slot_end")}, s.state, s.version, {_ts("s.created_at")}, {_ts("s.updated_at")},
       {_ts("s.expires_at")}, s.failure_reason, s.metadata::jsonb, s.booking_id,
       {_ts("s.block_start")}, {_ts("s.block_end")}
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
            $7::bigint[], $8::text[], $9::int[], $10::bigint[], $11::bigint[], $12::bigint[],
            $13::text[], $14::text[], $15::text[], $16::bigint[], $17::bigint[])
     AS s(id, partner_id, vendor_id, resource_id, requester_id, slot_start, slot_end, state,
          version, created_at, updated_at, expires_at, failure_reason, metadata, booking_id,
          block_start, block_end)
ON CONFLICT (id) DO UPDATE
SET state = EXCLUDED.state, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at,
    expires_at = EXCLUDED.expires_at,
    failure_reason = coalesce(EXCLUDED.failure_reason, reservations.failure_reason),
    booking_id = coalesce(EXCLUDED.booking_id, reservations.booking_id),
    metadata = reservations.metadata || EXCLUDED.metadata
WHERE reservations.version < EXCLUDED.version
"""
# An older entry written after a newer one (its batch committed later) still brings its
# metadata (a creation's): merged under the newer keys, nothing else changes.
_MERGE_LATE_METADATA = """
UPDATE reservations r SET metadata = m.metadata::jsonb || r.metadata
FROM unnest($1::text[], $2::int[], $3::text[]) AS m(id, version, metadata)
WHERE r.id = m.id AND r.version > m.version AND m.metadata <> '{}'
"""

# No booking for a commit whose reservation has already moved on to a failure: a redelivered
# commit must not resurrect a slot the engine has given up on. The snapshot is probed by key,
# one scalar subquery per booking: a join let the planner scan (or hash) the whole table.
_BOOKING_ROWS = f"""
SELECT b.id, b.reservation_id, r.key, b.resource_id, b.vendor_id, b.partner_id,
       b.requester_id, {_ts("b.slot_start")}, {_ts("b.slot_end")}, {_ts("b.block_start")},
       {_ts("b.block_end")}
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::int[])
     WITH ORDINALITY
     AS b(id, reservation_id, resource_id, vendor_id, partner_id, requester_id, slot_start,
          slot_end, block_start, block_end, version, ord)
JOIN resources r ON r.id = b.resource_id
WHERE (SELECT m.version > b.version AND m.state <> ALL($12::text[])
       FROM reservations m WHERE m.id = b.reservation_id) IS NOT TRUE"""
_BOOKING_COLUMNS = """
INSERT INTO bookings (id, reservation_id, resource_key, resource_id, vendor_id, partner_id,
                      requester_id, slot_start, slot_end, block_start, block_end)"""
# Fast form: skips reservations booked by an earlier delivery (a key probe each) and inserts
# plainly; a unique or exclusion violation sends the batch to the careful form.
_INSERT_BOOKINGS = f"""{_BOOKING_COLUMNS}{_BOOKING_ROWS}
  AND (SELECT true FROM bookings x WHERE x.reservation_id = b.reservation_id) IS NULL
ORDER BY b.ord
RETURNING reservation_id, id
"""
_INSERT_BOOKINGS_CAREFULLY = f"""{_BOOKING_COLUMNS}{_BOOKING_ROWS}
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


# The unchanging fields of reservations created in earlier batches (later entries do not
# carry them).
_KNOWN_INFO = f"""
SELECT id, partner_id, vendor_id, resource_id, requester_id, {_ms("slot_start")},
       {_ms("slot_end")}, {_ms("coalesce(block_start, slot_start)")},
       {_ms("coalesce(block_end, slot_end)")}, {_ms("created_at")}
FROM reservations WHERE id = ANY($1::text[])"""


async def known_info(conn: asyncpg.Connection, reservation_ids: list[str]) -> dict[str, Info]:
    if not reservation_ids:
        return {}
    return {r[0]: tuple(r[1:]) for r in await conn.fetch(_KNOWN_INFO, reservation_ids)}


# Where the unchanging fields of reservations Postgres does not know yet may be found (the
# commit queue reads the live Redis records): reservation ids -> what is known of them.
InfoLookup = Callable[[list[str]], Awaitable[dict[str, Info]]]


async def apply_events(conn: asyncpg.Connection, events: list[dict[str, str]]) -> list[EventOutcome]:
    """Write a batch of stream events in ONE transaction; one outcome per event, in order.

    Idempotent: applying a batch again writes nothing new and reports the same bookings
    (``already_applied`` is then true). A commit event (toState ``COMMIT_IN_PROGRESS``)
    writes the booking; if the exclusion constraint refuses it, that event reports
    ``availability_changed`` (with the booking in the way) and the rest of the batch still
    commits. A malformed event is ``rejected`` and writes nothing. Values are ``str`` as a
    ``decode_responses=True`` Redis client returns them.
    """
    applied = await apply_batch(conn, events)
    outcomes = []
    for position, (raw, result) in enumerate(zip(events, applied.results)):
        detail = applied.details.get(position)
        if detail is None:
            named = raw if type(raw) is not list else fields_dict(raw)
            detail = EventOutcome(named.get("eventId") or _event_id(named),
                                  named["reservationId"], result,
                                  applied.already_applied[position])
        outcomes.append(detail)
    return outcomes


async def apply_batch(conn: asyncpg.Connection, events: list[dict[str, str]], *,
                      count_transitions: bool = False,
                      lookup: InfoLookup | None = None) -> AppliedBatch:
    """:func:`apply_events` for the commit queue: the same writes, in ONE transaction, and
    the same outcomes, with an :class:`EventOutcome` only for commit, rejected and deferred
    entries.

    An entry carrying a path is written as one history and one audit row per transition.
    Entries after a reservation's creation do not carry its unchanging fields: they come
    from the creation entry in the same batch or from the snapshot an earlier batch wrote;
    then from ``lookup`` (the live Redis record: its creation entry may sit in another
    consumer's batch, not committed yet); an entry whose reservation is known nowhere is
    ``deferred`` (nothing written)."""
    batch = _Batch(events)
    unknown = batch.unknown_reservations()
    known = await known_info(conn, unknown) if unknown else {}
    if lookup is not None and len(known) < len(unknown):
        known.update(await lookup([r for r in unknown if r not in known]))
    batch.build(known)
    if not batch.event_id:
        return AppliedBatch([o.result for o in
                             (batch.rejected[p] for p in range(len(events)))],
                            [False] * len(events), batch.rejected, Counter())
    latest = batch.latest_per_reservation()
    to_states, versions = batch.to_state, batch.version
    commits = [row for row, state in enumerate(to_states) if state == COMMIT_STATE]
    # A later event of the same batch that left the booking states supersedes the commit.
    bookable = []
    for row in commits:
        newest = latest[batch.reservation_id[row]]
        if versions[newest] == versions[row] or to_states[newest] in BOOKING_STATES:
            bookable.append(row)
    try:
        written, fates = await _write(conn, batch, latest, commits, bookable, careful=False)
    except (asyncpg.UniqueViolationError, asyncpg.ExclusionViolationError):
        # A concurrent delivery of the same events, or a booking the constraint refuses:
        # the whole transaction again, with ON CONFLICT and one savepoint per booking.
        written, fates = await _write(conn, batch, latest, commits, bookable, careful=True)

    all_new = len(written) == len(batch.event_id)
    new = None if all_new else {r[0] - 1 for r in written}
    results: list[EventResult] = []
    already: list[bool] = []
    seen: set[int] = set()
    details = batch.rejected
    for position, rows in enumerate(batch.rows):
        if not rows:
            results.append(details[position].result)
            already.append(False)
            continue
        applied = True
        commit = None
        for row in rows:
            if not (row in seen or (new is not None and row not in new)):
                applied = False
            seen.add(row)
            if to_states[row] == COMMIT_STATE:
                commit = row
        already.append(applied)
        if commit is not None:
            fate, booking_id, conflicting, reason = fates[commit]
            results.append(fate)
            details[position] = EventOutcome(batch.event_id[commit],
                                             batch.reservation_id[commit], fate, applied,
                                             booking_id, conflicting, reason)
        else:
            results.append(EventResult.DUPLICATE if applied else EventResult.RECORDED)
    transitions: Counter[tuple[str, str, str]] = Counter()
    if count_transitions:
        transitions.update(
            (batch.from_state[row], to_states[row], batch.triggered_by[row])
            for row in range(len(to_states)) if new is None or row in new)
    return AppliedBatch(results, already, details, transitions)


async def _write(conn: asyncpg.Connection, batch: _Batch, latest: dict[str, int],
                 commits: list[int], bookable: list[int], *, careful: bool
                 ) -> tuple[list, dict[int, tuple]]:
    async with conn.transaction():
        joined, columns = batch.transition_columns()
        written = await conn.fetch(_INSERT_TRANSITIONS[joined, careful], *columns)
        booked: dict[str, str] = {}
        conflicts: dict[int, str | None] = {}
        if bookable and careful:
            booked, conflicts = await _insert_bookings_carefully(conn, batch, bookable)
        elif bookable:
            booked = dict(await conn.fetch(_INSERT_BOOKINGS, *batch.booking_columns(bookable),
                                           _BOOKING_STATES))
        fates = await _booking_fates(conn, batch, commits, booked, conflicts) if commits else {}
        await conn.execute(_UPSERT_SNAPSHOT, *batch.snapshot_columns(latest.values(), booked))
        late = batch.metadata_rows()
        if late:
            await conn.execute(_MERGE_LATE_METADATA, *late)
    return written, fates


_BOOKING_STATES = list(BOOKING_STATES)


async def _insert_bookings_carefully(conn: asyncpg.Connection, batch: _Batch, rows: list[int]
                                     ) -> tuple[dict[str, str], dict[int, str | None]]:
    """Insert every booking at once; on an exclusion violation, one savepoint per booking.

    Returns the bookings inserted now (reservation id -> booking id) and, for each commit
    event (row) the constraint refused, the id of a booking in its way.
    """
    try:
        async with conn.transaction():
            return dict(await conn.fetch(_INSERT_BOOKINGS_CAREFULLY, *batch.booking_columns(rows),
                                         _BOOKING_STATES)), {}
    except asyncpg.ExclusionViolationError:
        pass
    inserted: dict[str, str] = {}
    conflicts: dict[int, str | None] = {}
    for row in rows:  # batch order: the earlier event wins within the batch
        try:
            async with conn.transaction():
                inserted.update(await conn.fetch(_INSERT_BOOKINGS_CAREFULLY,
                                                 *batch.booking_columns([row]), _BOOKING_STATES))
        except asyncpg.ExclusionViolationError:
            conflicts[row] = await conn.fetchval(
                _FIND_CONFLICT, batch.resource_id[row], batch.block_start[row],
                batch.block_end[row], batch.reservation_id[row])
    return inserted, conflicts


async def _booking_fates(conn: asyncpg.Connection, batch: _Batch, commits: list[int],
                         booked: dict[str, str], conflicts: dict[int, str | None]
                         ) -> dict[int, tuple]:
    """What became of each commit event (by row): booked, refused, superseded or unknown
    resource.

    Adds the bookings of earlier deliveries to ``booked``. Costs no query when every
    commit of the batch was booked just now (the common case).
    """
    reservation_ids, resource_ids = batch.reservation_id, batch.resource_id
    others = list({reservation_ids[r] for r in commits if reservation_ids[r] not in booked})
    if others:
        booked.update(await conn.fetch(
            "SELECT reservation_id, id FROM bookings WHERE reservation_id = ANY($1::text[])",
            others))
    missing = {resource_ids[r] for r in commits if reservation_ids[r] not in booked}
    known: set[str] = set()
    if missing:
        known = {r[0] for r in await conn.fetch(
            "SELECT id FROM resources WHERE id = ANY($1::text[])", list(missing))}
    fates = {}
    for row in commits:
        reservation_id = reservation_ids[row]
        if reservation_id in booked:
            fates[row] = (EventResult.BOOKED, booked[reservation_id], None, None)
        elif row in conflicts:
            fates[row] = (EventResult.AVAILABILITY_CHANGED, None, conflicts[row],
                          "the interval overlaps a committed booking")
        elif resource_ids[row] not in known:
            fates[row] = (EventResult.REJECTED, None, None,
                          f"unknown resource {resource_ids[row]!r}")
        else:
            fates[row] = (EventResult.SUPERSEDED, None, None, "the reservation has since failed")
    return fates


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
