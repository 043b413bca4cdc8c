"""The batch commit: one Postgres transaction per batch of stream entries, and its SQL.

The commit-queue worker hands a batch to :func:`apply_batch`, which writes it with
set-based (unnest) statements. Delivery is at least once, so every write is keyed: history
and audit rows by event id, the snapshot by version, a booking by reservation id. The
bookings exclusion constraint is the last line against a double booking: a booking it
refuses fails that one reservation (``availability_changed``) and no other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from engine.store.events import (
    BOOKING_STATES,
    COMMIT_STATE,
    EventOutcome,
    EventResult,
    Info,
    Batch,
    event_id_of,
    fields_dict,
)
from engine.webhook_events import emit, transition_rows
from engine.store.sql import ms_sql as _ms
from engine.store.sql import ts_sql as _ts

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

# The snapshot only moves forward: an older or repeated event leaves it as it is. `items`
# (0014) lists every item: a multi-resource entry carries them ($18, JSON text; NULL for one
# resource, whose one item is built here from the row's own resource, slot and block).
_UPSERT_SNAPSHOT = f"""
INSERT INTO reservations (id, partner_id, vendor_id, resource_id, requester_id, slot_start,
                          slot_end, state, version, created_at, updated_at, expires_at,
                          failure_reason, metadata, booking_id, block_start, block_end, items)
SELECT s.id, s.partner_id, s.vendor_id, s.resource_id, s.requester_id, {_ts("s.slot_start")},
       {_ts("s.slot_end")}, s.state, s.version, {_ts("s.created_at")}, {_ts("s.updated_at")},
       {_ts("s.expires_at")}, s.failure_reason, s.metadata::jsonb, s.booking_id,
       {_ts("s.block_start")}, {_ts("s.block_end")},
       coalesce(s.items::jsonb, jsonb_build_array(jsonb_build_object(
           'resourceId', s.resource_id, 'slotStart', s.slot_start, 'slotEnd', s.slot_end,
           'blockStart', s.block_start, 'blockEnd', s.block_end)))
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
            $7::bigint[], $8::text[], $9::int[], $10::bigint[], $11::bigint[], $12::bigint[],
            $13::text[], $14::text[], $15::text[], $16::bigint[], $17::bigint[], $18::text[])
     AS s(id, partner_id, vendor_id, resource_id, requester_id, slot_start, slot_end, state,
          version, created_at, updated_at, expires_at, failure_reason, metadata, booking_id,
          block_start, block_end, items)
ON CONFLICT (id) DO UPDATE
SET state = EXCLUDED.state, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at,
    expires_at = EXCLUDED.expires_at,
    -- a move (reason 'modified') changes where the reservation sits, a transfer
    -- (reason 'transferred', issue 16) whose it is
    partner_id = EXCLUDED.partner_id, resource_id = EXCLUDED.resource_id, slot_start = EXCLUDED.slot_start,
    slot_end = EXCLUDED.slot_end, block_start = EXCLUDED.block_start,
    block_end = EXCLUDED.block_end, items = EXCLUDED.items,
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
       {_ts("b.block_end")}, b.fence_token, b.item
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::int[],
            $12::bigint[], $14::int[])
     WITH ORDINALITY
     AS b(id, reservation_id, resource_id, vendor_id, partner_id, requester_id, slot_start,
          slot_end, block_start, block_end, version, fence_token, item, ord)
JOIN resources r ON r.id = b.resource_id
WHERE (SELECT m.version > b.version AND m.state <> ALL($13::text[])
       FROM reservations m WHERE m.id = b.reservation_id) IS NOT TRUE"""
_BOOKING_COLUMNS = """
INSERT INTO bookings (id, reservation_id, resource_key, resource_id, vendor_id, partner_id,
                      requester_id, slot_start, slot_end, block_start, block_end,
                      fence_token, item)"""
# Fast form: skips reservations booked by an earlier delivery (a key probe each) and inserts
# plainly; a unique or exclusion violation sends the batch to the careful form.
_INSERT_BOOKINGS = f"""{_BOOKING_COLUMNS}{_BOOKING_ROWS}
  AND (SELECT true FROM bookings x WHERE x.reservation_id = b.reservation_id LIMIT 1) IS NULL
ORDER BY b.ord
RETURNING reservation_id, id, item
"""
_INSERT_BOOKINGS_CAREFULLY = f"""{_BOOKING_COLUMNS}{_BOOKING_ROWS}
ORDER BY b.ord
ON CONFLICT (reservation_id, item) DO NOTHING
RETURNING reservation_id, id, item
"""

_FIND_CONFLICT = f"""
SELECT bk.id FROM bookings bk JOIN resources r ON r.id = $1
WHERE int8range(bk.resource_key, bk.resource_key, '[]') && int8range(r.key, r.key, '[]')
  AND tstzrange(bk.block_start, bk.block_end, '[)')
      && tstzrange({_ts("$2::bigint")}, {_ts("$3::bigint")}, '[)')
  AND (bk.cancelled_at IS NULL OR bk.fence_token > $5) AND bk.reservation_id <> $4
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


# Called inside the batch's transaction, before it commits, with the reservations booked
# by it (the commit queue makes sure their booked markers are in Redis).
BeforeCommit = Callable[[asyncpg.Connection, list[str]], Awaitable[None]]

# Booking writers take it shared (per transaction), rehydration exclusive: one per schema.
BOOKING_LOCK_SHARED = "SELECT pg_advisory_xact_lock_shared(hashtext(current_schema()), 1)"
BOOKING_LOCK = "SELECT pg_advisory_lock(hashtext(current_schema()), 1)"
BOOKING_UNLOCK = "SELECT pg_advisory_unlock(hashtext(current_schema()), 1)"

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
            detail = EventOutcome(named.get("eventId") or event_id_of(named),
                                  named["reservationId"], result,
                                  applied.already_applied[position])
        outcomes.append(detail)
    return outcomes


async def apply_batch(conn: asyncpg.Connection, events: list[dict[str, str]], *,
                      count_transitions: bool = False,
                      lookup: InfoLookup | None = None,
                      before_commit: BeforeCommit | None = None,
                      unbookable: frozenset[str] | set[str] = frozenset()) -> AppliedBatch:
    """:func:`apply_events` for the commit queue: the same writes, in ONE transaction, and
    the same outcomes, with an :class:`EventOutcome` only for commit, rejected and deferred
    entries.

    An entry carrying a path is written as one history and one audit row per transition.
    Entries after a reservation's creation do not carry its unchanging fields: they come
    from the creation entry in the same batch or from the snapshot an earlier batch wrote;
    then from ``lookup`` (the live Redis record: its creation entry may sit in another
    consumer's batch, not committed yet); an entry whose reservation is known nowhere is
    ``deferred`` (nothing written). The commits of ``unbookable`` reservations (their
    payments failed, issue 12) write no booking and come back ``superseded``."""
    batch = Batch(events)
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
        if batch.reservation_id[row] in unbookable:
            continue
        newest = latest[batch.reservation_id[row]]
        if versions[newest] == versions[row] or to_states[newest] in BOOKING_STATES:
            bookable.append(row)
    try:
        written, fates = await _write(conn, batch, latest, commits, bookable, careful=False,
                                       before_commit=before_commit)
    except (asyncpg.UniqueViolationError, asyncpg.ExclusionViolationError):
        # A concurrent delivery of the same events, or a booking the constraint refuses:
        # the whole transaction again, with ON CONFLICT and one savepoint per booking.
        written, fates = await _write(conn, batch, latest, commits, bookable, careful=True,
                                       before_commit=before_commit)

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


async def _write(conn: asyncpg.Connection, batch: Batch, latest: dict[str, int],
                 commits: list[int], bookable: list[int], *, careful: bool,
                 before_commit: BeforeCommit | None) -> tuple[list, dict[int, tuple]]:
    async with conn.transaction():
        joined, columns = batch.transition_columns()
        written = await conn.fetch(_INSERT_TRANSITIONS[joined, careful], *columns)
        booked: dict[str, str] = {}
        conflicts: dict[int, str | None] = {}
        if bookable:
            # Rehydration reads the bookings under the exclusive form of this lock: a
            # booking commits either before it reads (and gets its markers from it) or
            # after it has finished (and ``before_commit`` sees to its markers).
            await conn.execute(BOOKING_LOCK_SHARED)
        if bookable and careful:
            booked, conflicts = await _insert_bookings_carefully(conn, batch, bookable)
        elif bookable:
            booked = _first_items(await conn.fetch(_INSERT_BOOKINGS,
                                                   *_booking_params(batch, bookable)))
        fates = await _booking_fates(conn, batch, commits, booked, conflicts) if commits else {}
        await conn.execute(_UPSERT_SNAPSHOT, *batch.snapshot_columns(latest.values(), booked))
        late = batch.metadata_rows()
        if late:
            await conn.execute(_MERGE_LATE_METADATA, *late)
        if booked and before_commit is not None:
            await before_commit(conn, list(booked))
        # Events out (issue 14): the outbox rows of the transitions written now, in this
        # transaction (engine/webhook_events.py); last, so its ordering lock is held only
        # until the commit.
        await emit(conn, transition_rows(batch, sorted(r[0] - 1 for r in written)))
    return written, fates


_BOOKING_STATES = list(BOOKING_STATES)


def _booking_params(batch: Batch, rows: list[int]) -> list:
    """The booking statements' parameters: $1..$12 and $14 the rows (one per item of a
    multi-resource reservation), $13 the states that supersede a booking."""
    columns = batch.booking_columns(rows)
    return [*columns[:12], _BOOKING_STATES, columns[12]]


def _first_items(rows) -> dict[str, str]:
    """Reservation id -> its booking id (item 0's: a multi-resource reservation has one
    booking row per item, issue 16)."""
    return {r[0]: r[1] for r in rows if r[2] == 0}


async def _insert_bookings_carefully(conn: asyncpg.Connection, batch: Batch, rows: list[int]
                                     ) -> tuple[dict[str, str], dict[int, str | None]]:
    """Insert every booking at once; on an exclusion violation, one savepoint per booking.

    Returns the bookings inserted now (reservation id -> booking id) and, for each commit
    event (row) the constraint refused, the id of a booking in its way.
    """
    try:
        async with conn.transaction():
            return _first_items(await conn.fetch(_INSERT_BOOKINGS_CAREFULLY,
                                                 *_booking_params(batch, rows))), {}
    except asyncpg.ExclusionViolationError:
        pass
    inserted: dict[str, str] = {}
    conflicts: dict[int, str | None] = {}
    for row in rows:  # batch order: the earlier event wins within the batch
        try:
            async with conn.transaction():
                inserted.update(_first_items(await conn.fetch(
                    _INSERT_BOOKINGS_CAREFULLY, *_booking_params(batch, [row]))))
        except asyncpg.ExclusionViolationError:
            conflicts[row] = await conn.fetchval(
                _FIND_CONFLICT, batch.resource_id[row], batch.block_start[row],
                batch.block_end[row], batch.reservation_id[row], batch.fence_token[row])
    return inserted, conflicts


async def _booking_fates(conn: asyncpg.Connection, batch: Batch, commits: list[int],
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
            "SELECT reservation_id, id FROM bookings WHERE reservation_id = ANY($1::text[]) "
            "AND item = 0",
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
