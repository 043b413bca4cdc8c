"""Stream entries -> columns: the commit queue's entries parsed and checked completely.

One entry per script call (lua/lib/emit_transition.lua): its ``path`` lists every state the
call passed through (waived steps included), ``version`` is the version after the last one,
and the fields that never change (partner, vendor, resource, requester, slot, block,
created-at) ride on the creation entry only. A batch becomes one column per field and one
row per transition, keyed ``<reservation id>:<version>``; an entry that fails any check is
refused whole (nothing of it is written) with its reason, for the dead letters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from engine.lifecycle import ACTORS, State

STATES = frozenset(s.value for s in State)
# States whose reason is the reason the reservation did not (or no longer does) go ahead.
ENDED_STATES = frozenset(s for s in STATES if s.startswith("FAILED_")) | {"EXPIRED", "CANCELLED"}
# The actors a transition may name (engine/reservations.py checks callers against the same).
COMMIT_STATE = "COMMIT_IN_PROGRESS"
# A later snapshot in one of these states still stands behind the booking.
BOOKING_STATES = ("COMMIT_IN_PROGRESS", "COMMITTED")

_SEPARATOR = "\x1f"  # ASCII unit separator: never in an id, a state, or JSON text
# (joined columns, split by Postgres: see engine/store/commit.py)

# Fields every stream entry carries (lua/lib/emit_transition.lua), and the fields that never
# change, carried by the creation entry only (older entries carry them on every event).
_REQUIRED = ("reservationId", "toState", "triggeredBy", "version", "timestamp")
INFO_FIELDS = ("partnerId", "vendorId", "resourceId", "requesterId", "slotStart", "slotEnd",
               "blockStart", "blockEnd", "createdAt")
# A move (lua/modify_reservation.lua, reason "modified"): the old and the new resource,
# slot and block; from it on the reservation's resource, slot and block are the new ones.
MOVE_FIELDS = tuple(f"moved{side}{name}" for side in ("From", "To")
                    for name in ("ResourceId", "SlotStart", "SlotEnd", "BlockStart",
                                 "BlockEnd"))
# A transfer (lua/transfer_accept.lua, reason "transferred", issue 16): the partner that held
# it and the one that holds it now; from it on the reservation's partner is the new one.
TRANSFER_FIELDS = ("transferredFromPartnerId", "transferredToPartnerId")
# Every field an entry may carry, in the order emit_transition.lua writes them (kept for
# tooling and tests that build entries by hand).
FIELD_LAYOUT = ["reservationId", "version", "fromState", "toState", "triggeredBy",
                "timestamp", "path", "fromVersion", "expiresAt", "reason", "metadata",
                "idempotencyKey", *INFO_FIELDS, *MOVE_FIELDS, "fenceToken",
                *TRANSFER_FIELDS]
# (resource, slot start, slot end, block start, block end) of one side of a move.
Place = tuple[str, int, int, int, int]


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


def booking_id_for(reservation_id: str) -> str:
    """Deterministic, so a redelivered commit finds the booking its first delivery wrote."""
    return "bkg_" + reservation_id.removeprefix("rsv_")


def _json_string(value: str) -> str:
    return orjson.dumps(value).decode()


# The unchanging fields of one reservation: partner, vendor, resource, requester, slot
# start/end, block start/end, created-at (ms).
Info = tuple[str, str, str, str, int, int, int, int, int]


@dataclass(slots=True)
class Entry:
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
    moved_from: Place | None = None  # a move: where the reservation was
    moved_to: Place | None = None  # and where it is now
    fence_token: int | None = None  # a commit's fencing token (issue 15)
    transferred: tuple[str, str] | None = None  # a transfer: (from partner, to partner)


class Batch:
    """A batch parsed straight into columns: one list per column, one row per distinct
    transition (an entry carrying a path gives one row per state it passed), no object per
    row. Built in two steps: parse, then :meth:`build` once the unchanging fields of
    reservations created in earlier batches are known."""

    __slots__ = ("event_id", "reservation_id", "from_state", "to_state", "triggered_by",
                 "reason", "metadata", "idempotency_key", "version", "at_ms", "partner_id",
                 "vendor_id", "resource_id", "requester_id", "slot_start", "slot_end",
                 "block_start", "block_end", "created_at", "expires_at", "audit", "rows",
                 "rejected", "entries", "info", "fence_token", "items")

    def __init__(self, events: list[dict[str, str] | list[str]]) -> None:
        (self.event_id, self.reservation_id, self.from_state, self.to_state,
         self.triggered_by, self.reason, self.metadata, self.idempotency_key, self.version,
         self.at_ms, self.partner_id, self.vendor_id, self.resource_id, self.requester_id,
         self.slot_start, self.slot_end, self.block_start, self.block_end, self.created_at,
         self.expires_at, self.audit) = ([] for _ in range(21))
        self.fence_token: list[int | None] = []  # per row: the commit's fencing token
        self.rows: list[list[int]] = []  # per entry: its rows (empty: rejected or deferred)
        self.rejected: dict[int, EventOutcome] = {}  # by position: rejected and deferred
        self.entries: list[Entry | None] = []  # per position; None when rejected
        self.info: dict[str, Info] = {}  # reservation id -> its unchanging fields
        # A multi-resource reservation's items (issue 16): reservation id -> [(resource,
        # slot start, slot end, block start, block end), ...]; every entry carries them.
        self.items: dict[str, list[tuple]] = {}
        for position, raw in enumerate(events):
            named = raw if type(raw) is not list else fields_dict(raw)
            entry, error = parse_entry(named, self.info)
            if entry is not None and named.get("items"):
                items = parse_items(named["items"])
                if items is None:
                    entry, error = None, "items is not a list of items"
                else:
                    self.items[entry.reservation_id] = items
            self.entries.append(entry)
            if error is not None:
                self.rejected[position] = EventOutcome(
                    str(named.get("eventId") or event_id_of(named)),
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
                if entry.moved_to is not None:
                    # From this entry on the reservation sits on its new resource and slot.
                    fields = (fields[0], fields[1], entry.moved_to[0], fields[3],
                              *entry.moved_to[1:], fields[8])
                    info[entry.reservation_id] = fields
                if entry.transferred is not None:
                    # From this entry on the reservation is the new partner's.
                    fields = (entry.transferred[1], *fields[1:])
                    info[entry.reservation_id] = fields
                row = index.get(event_id)
                if row is not None:  # the same transition twice in one batch: written once
                    rows.append(row)
                    from_state = to_state
                    continue
                rows.append(index.setdefault(event_id, len(self.event_id)))
                metadata = entry.metadata if i == 0 else "{}"
                self._append(event_id, entry, from_state, to_state, version, metadata, fields)
                from_state = to_state

    def _append(self, event_id: str, entry: Entry, from_state: str, to_state: str,
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
        self.fence_token.append(entry.fence_token)
        # The audit row's metadata, as JSON text Postgres parses once (states come from a
        # closed set, so only reason and key need escaping; metadata is a validated
        # object): the same jsonb as jsonb_build_object, at a fraction of its cost.
        moved = "" if entry.moved_to is None else (
            f',"modification":{{"from":{_place_json(entry.moved_from)},'
            f'"to":{_place_json(entry.moved_to)}}}')
        if entry.transferred is not None:
            moved += (f',"transfer":{{"fromPartnerId":{_json_string(entry.transferred[0])},'
                      f'"toPartnerId":{_json_string(entry.transferred[1])}}}')
        self.audit.append(
            f'{{"fromState":{chr(34) + from_state + chr(34) if from_state else "null"},'
            f'"toState":"{to_state}",'
            f'"reason":{_json_string(reason) if reason else chr(34) * 2},'
            f'"version":{version},'
            f'"idempotencyKey":{_json_string(idempotency_key) if idempotency_key else "null"},'
            f'"metadata":{metadata}{moved}}}')


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
        """One booking row per commit row, or per item of a multi-resource reservation
        (issue 16: item 0 keeps the reservation's booking id and the commit's fencing token,
        which comes from its resource's counter; item k gets ``<id>.<k>`` and no token, so
        only the exclusion constraint guards it). Columns: the 11 of a booking, the fencing
        token, the item index."""
        if not self.items or not any(self.reservation_id[r] in self.items for r in rows):
            reservation_ids = [self.reservation_id[r] for r in rows]
            return [[booking_id_for(r) for r in reservation_ids], reservation_ids,
                    [self.resource_id[r] for r in rows], [self.vendor_id[r] for r in rows],
                    [self.partner_id[r] for r in rows], [self.requester_id[r] for r in rows],
                    [self.slot_start[r] for r in rows], [self.slot_end[r] for r in rows],
                    [self.block_start[r] for r in rows], [self.block_end[r] for r in rows],
                    [self.version[r] for r in rows], [self.fence_token[r] for r in rows],
                    [0] * len(rows)]
        columns: list[list[Any]] = [[] for _ in range(13)]
        for r in rows:
            rid = self.reservation_id[r]
            places = self.items.get(rid) or [(self.resource_id[r], self.slot_start[r],
                                              self.slot_end[r], self.block_start[r],
                                              self.block_end[r])]
            for k, (resource, start, end, block_start, block_end) in enumerate(places):
                booking = booking_id_for(rid) + (f".{k}" if k else "")
                for column, value in zip(columns, (
                        booking, rid, resource, self.vendor_id[r], self.partner_id[r],
                        self.requester_id[r], start, end, block_start, block_end,
                        self.version[r], self.fence_token[r] if k == 0 else None, k)):
                    column.append(value)
        return columns

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
                [self.block_start[r] for r in rows], [self.block_end[r] for r in rows],
                self._items_json(rows)]

    def _items_json(self, rows: list[int]) -> list[str | None]:
        """Per row, a multi-resource reservation's items as the snapshot's ``items`` JSON
        (migration 0014); None for one resource (the statement builds its one item)."""
        if not self.items:
            return [None] * len(rows)
        out: list[str | None] = []
        for r in rows:
            places = self.items.get(self.reservation_id[r])
            out.append(None if places is None else orjson.dumps([
                {"resourceId": resource, "slotStart": start, "slotEnd": end,
                 "blockStart": block_start, "blockEnd": block_end}
                for resource, start, end, block_start, block_end in places]).decode())
        return out

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


def _place_json(place: Place | None) -> str:
    if place is None:
        return "null"
    resource, slot_start, slot_end, block_start, block_end = place
    return orjson.dumps({"resourceId": resource, "slotStart": slot_start, "slotEnd": slot_end,
                         "blockStart": block_start, "blockEnd": block_end}).decode()


def _parse_move(get) -> tuple[Place | None, Place | None, str | None]:
    """A move's old and new place (both or neither), or why the entry is refused."""
    values = [get(n) for n in MOVE_FIELDS]
    if not any(v is not None for v in values):
        return None, None, None
    if not all(values):
        return None, None, "missing fields: " + ", ".join(
            n for n, v in zip(MOVE_FIELDS, values) if not v)
    places = []
    for side in (values[:5], values[5:]):
        try:
            slot_start, slot_end, block_start, block_end = map(int, side[1:])
        except ValueError:
            return None, None, "version and timestamps must be integers"
        if not block_start <= slot_start < slot_end <= block_end:
            return None, None, ("move intervals out of order: need blockStart <= slotStart < "
                                "slotEnd <= blockEnd")
        places.append((side[0], slot_start, slot_end, block_start, block_end))
    return places[0], places[1], None


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
    entry, error = parse_entry(named, {})
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


def event_id_of(named: dict[str, str]) -> str:
    return f"{named.get('reservationId', '')}:{named.get('version', '')}"


def parse_items(text: str) -> list[tuple] | None:
    """A multi-resource entry's ``items`` (lua/create_multi_reservation.lua): JSON
    ``[[resource, slot start, slot end, first, last, block start, block end], ...]`` as
    (resource, slot start, slot end, block start, block end); None when malformed."""
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(raw, list) or not raw:
        return None
    out = []
    for item in raw:
        if (not isinstance(item, list) or len(item) != 7 or not isinstance(item[0], str)
                or not all(type(v) is int for v in item[1:])
                or not item[5] <= item[1] < item[2] <= item[6]):
            return None
        out.append((item[0], item[1], item[2], item[5], item[6]))
    return out


def parse_entry(named: dict[str, str], info: dict[str, Info]
                 ) -> tuple[Entry | None, str | None]:
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
    moved_from, moved_to, error = _parse_move(get)
    if error is not None:
        return None, error
    if moved_to is not None and states != [from_state]:
        return None, "a move keeps its state"
    fence_token = get("fenceToken")
    if fence_token is not None:
        if not fence_token.isdigit() or len(fence_token) > 18:
            return None, "fenceToken must be a non-negative integer"
        fence_token = int(fence_token)
    transferred = None
    sides = [get(n) for n in TRANSFER_FIELDS]
    if any(v is not None for v in sides):
        if not all(sides):
            return None, "missing fields: " + ", ".join(
                n for n, v in zip(TRANSFER_FIELDS, sides) if not v)
        if states != [from_state]:
            return None, "a transfer keeps its state"
        transferred = (sides[0], sides[1])
    return Entry(reservation_id, from_state, states, version, actor, get("reason") or "",
                  metadata, get("idempotencyKey") or "", at, expires, moved_from,
                  moved_to, fence_token, transferred), None
