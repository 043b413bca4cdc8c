"""Replay and parity (issue 17; Tartware roll service §4.3): rebuild a reservation from its
audit rows and compare what the other stores say.

The audit log is append-only and written once per transition (``event_id`` =
``<reservation id>:<version>``, metadata ``fromState``/``toState``/``reason``/``version``/
``idempotencyKey``/``metadata``/``modification``); it is the source replayed. Per version the
report says:

- ``match``: the audit row and the ``reservation_history`` row agree (and, for the newest
  event, the reservation row, the booking row and the Redis record agree with the state the
  audit rows rebuild);
- ``diff``: both exist and disagree (``details`` names each field: ``{"audit", "found"}``);
- ``missing``: the audit has the event, a store does not (no history row; or the reservation
  row / Redis record is older than the audit says);
- ``extra``: a store has an event the audit lacks (a history row, or a reservation row /
  Redis record newer than the newest audit row).

The rebuilt state of the newest event: its ``toState`` and version; the partner
(``tenant_id``) and resource of its row; the time of its transition (the row's
``updated_at``); a failure reason for ended states (the reason, else the state in lower
case); the slot of the last move, when there was one (creation slots are not in the audit).
Booking: COMMITTED needs a live booking row ``bkg_<…>`` on the rebuilt resource (and the row's
``booking_id``); any state but COMMIT_IN_PROGRESS/COMMITTED needs none. A multi-resource
reservation (issue 16) is booked once every item of its row's ``items`` has its live booking
row ``bkg_<…>.k`` (item 0: ``bkg_<…>``) on the item's resource and slot (``bookingRows``
details, per item); its Redis record's items must be the row's (same version). The report
lists the row's ``items`` in its summary (the Redis record's when there is no row). The Redis record may
be gone once a terminal reservation's retention passed; a live one must be there.

Events still in the commit queue show as drift until drained: parity skips reservations
changed within ``settle_ms`` and the alert waits (deploy/prometheus/alerts.yml).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from engine.lifecycle import TERMINAL
from engine.store.events import ENDED_STATES, booking_id_for

STATUSES = ("match", "diff", "missing", "extra")
BOOKING_STATES = ("COMMIT_IN_PROGRESS", "COMMITTED")
TERMINAL_STATES = frozenset(s.value for s in TERMINAL)

# Reads the Redis record: reservation id -> engine.reservations.Reservation | None.
RedisReader = Callable[[str], Awaitable[Any]]


def _ms(value) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def _json(value) -> Any:
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _version_of(event_id: str, reservation_id: str) -> int | None:
    head, _, tail = event_id.rpartition(":")
    return int(tail) if head == reservation_id and tail.isdigit() else None


async def load(conn, reservation_id: str) -> dict[str, Any]:
    """Every row of one reservation: audit, history, reservation, booking."""
    audit = await conn.fetch(
        "SELECT event_id, tenant_id, resource_id, action, actor, at, metadata FROM audit_log "
        "WHERE reservation_id = $1 ORDER BY id", reservation_id)
    history = await conn.fetch(
        "SELECT event_id, from_state, to_state, triggered_by, reason, metadata, "
        "idempotency_key, version, at FROM reservation_history WHERE reservation_id = $1",
        reservation_id)
    row = await conn.fetchrow(
        "SELECT partner_id, resource_id, slot_start, slot_end, state, version, updated_at, "
        "booking_id, failure_reason, items FROM reservations WHERE id = $1", reservation_id)
    # One booking row per item (issue 16); item 0 is the reservation's booking.
    bookings = await conn.fetch(
        "SELECT id, item, resource_id, slot_start, slot_end, cancelled_at FROM bookings "
        "WHERE reservation_id = $1 ORDER BY item", reservation_id)
    booking = next((b for b in bookings if b["item"] == 0), None)
    return {"audit": audit, "history": history, "row": row, "booking": booking,
            "bookings": bookings}


def _row_items(row) -> list[dict[str, Any]] | None:
    """The reservation row's items (migration 0014) as ``{resourceId, slotStart, slotEnd}``
    (ms), or None without a row."""
    if row is None:
        return None
    return [{"resourceId": i["resourceId"], "slotStart": i["slotStart"],
             "slotEnd": i["slotEnd"]} for i in _json(row["items"]) or []]


def _record_items(record) -> list[dict[str, Any]]:
    """The Redis record's items the same way (a one-resource record: its one resource)."""
    items = getattr(record, "items", None) or [
        (record.resource_id, record.slot_start_ms, record.slot_end_ms)]
    return [{"resourceId": i[0], "slotStart": i[1], "slotEnd": i[2]} for i in items]


def _field(diffs: dict, store: str, name: str, audit: Any, found: Any) -> None:
    if audit != found:
        diffs.setdefault(store, {})[name] = {"audit": audit, "found": found}


def compare(reservation_id: str, rows: dict[str, Any], record: Any) -> dict[str, Any]:
    """The replay report of one reservation from its rows and Redis record (None: absent)."""
    audit: dict[int, Any] = {}
    other_audit = 0
    for a in rows["audit"]:
        version = _version_of(a["event_id"], reservation_id)
        if version is None:
            other_audit += 1
        else:
            audit[version] = a
    history = {h["version"]: h for h in rows["history"]}
    row, booking = rows["row"], rows["booking"]
    stores_max = max([*history, row["version"] if row else 0,
                      record.version if record is not None else 0, 0])
    last = max(audit, default=0)
    versions = sorted(set(audit) | set(history) | set(range(last + 1, stores_max + 1)))
    events = []
    for version in versions:
        event_id = f"{reservation_id}:{version}"
        a, h = audit.get(version), history.get(version)
        details: dict[str, Any] = {}
        if a is None:
            found = {"historyRow": h is not None,
                     "reservationRowVersion": row["version"] if row else None,
                     "redisRecordVersion": record.version if record is not None else None}
            events.append({"eventId": event_id, "status": "extra", "details": found})
            continue
        meta = _json(a["metadata"]) or {}
        status = "match"
        if h is None:
            status, details["historyRow"] = "missing", "absent"
        else:
            _field(details, "historyRow", "fromState", meta.get("fromState"), h["from_state"])
            _field(details, "historyRow", "toState", meta.get("toState"), h["to_state"])
            _field(details, "historyRow", "triggeredBy", a["actor"], h["triggered_by"])
            _field(details, "historyRow", "reason", meta.get("reason") or None, h["reason"])
            _field(details, "historyRow", "idempotencyKey", meta.get("idempotencyKey"),
                   h["idempotency_key"])
            _field(details, "historyRow", "at", _ms(a["at"]), _ms(h["at"]))
            _field(details, "historyRow", "metadata", meta.get("metadata") or {},
                   _json(h["metadata"]) or {})
        if version == last:
            status = _snapshot(details, reservation_id, audit, row, booking, record, status,
                               rows.get("bookings") or ())
        if details and status == "match":
            status = "diff"
        events.append({"eventId": event_id, "status": status, "details": details})
    counts = {s: sum(1 for e in events if e["status"] == s) for s in STATUSES}
    rebuilt = _rebuilt(audit)
    items = _row_items(row)
    if items is None and record is not None:
        items = _record_items(record)
    return {"reservationId": reservation_id, "events": events,
            "summary": {"events": len(events), **counts,
                        "drift": counts["diff"] + counts["missing"] + counts["extra"],
                        "rebuiltState": rebuilt.get("state"),
                        "rebuiltVersion": rebuilt.get("version"),
                        "auditRows": len(audit), "otherAuditRows": other_audit,
                        "historyRows": len(history), "reservationRow": row is not None,
                        "bookingRow": booking is not None,
                        "bookingRows": len(rows.get("bookings") or []),
                        "items": items or [],
                        "redisRecord": record is not None}}


def _rebuilt(audit: dict[int, Any]) -> dict[str, Any]:
    """The reservation as its audit rows say it is after the newest one."""
    if not audit:
        return {}
    version = max(audit)
    newest = audit[version]
    meta = _json(newest["metadata"]) or {}
    state = meta.get("toState")
    moved = None
    for v in sorted(audit):
        modification = (_json(audit[v]["metadata"]) or {}).get("modification")
        if modification:
            moved = modification.get("to")
    return {"state": state, "version": version, "partnerId": newest["tenant_id"],
            "resourceId": newest["resource_id"], "updatedAt": _ms(newest["at"]),
            "failureReason": ((meta.get("reason") or state.lower())
                              if state in ENDED_STATES else None),
            "moved": moved, "booked": state == "COMMITTED"}


def _snapshot(details: dict, reservation_id: str, audit: dict, row, booking, record,
              status: str, bookings=()) -> str:
    """The newest event against the reservation row, the booking rows and Redis."""
    r = _rebuilt(audit)
    if row is None:
        details["reservationRow"] = "absent"
        status = "missing"
    else:
        if row["version"] < r["version"]:
            status = "missing"
        _field(details, "reservationRow", "state", r["state"], row["state"])
        _field(details, "reservationRow", "version", r["version"], row["version"])
        _field(details, "reservationRow", "partnerId", r["partnerId"], row["partner_id"])
        _field(details, "reservationRow", "resourceId", r["resourceId"], row["resource_id"])
        _field(details, "reservationRow", "updatedAt", r["updatedAt"], _ms(row["updated_at"]))
        if r["failureReason"] is not None:
            _field(details, "reservationRow", "failureReason", r["failureReason"],
                   row["failure_reason"])
        if r["moved"]:
            _field(details, "reservationRow", "slotStart", r["moved"].get("slotStart"),
                   _ms(row["slot_start"]))
            _field(details, "reservationRow", "slotEnd", r["moved"].get("slotEnd"),
                   _ms(row["slot_end"]))
        if r["booked"]:
            _field(details, "reservationRow", "bookingId", booking_id_for(reservation_id),
                   row["booking_id"])
    live_booking = booking is not None and booking["cancelled_at"] is None
    items = _row_items(row)
    if r["booked"] and items is not None and len(items) > 1 \
            and _item_bookings(details, reservation_id, items, bookings):
        status = "missing"
    if r["booked"]:
        if not live_booking:
            details["bookingRow"] = "absent" if booking is None else "cancelled"
            status = "missing"
        else:
            _field(details, "bookingRow", "id", booking_id_for(reservation_id), booking["id"])
            _field(details, "bookingRow", "resourceId", r["resourceId"], booking["resource_id"])
            if row is not None:
                _field(details, "bookingRow", "slotStart", _ms(row["slot_start"]),
                       _ms(booking["slot_start"]))
                _field(details, "bookingRow", "slotEnd", _ms(row["slot_end"]),
                       _ms(booking["slot_end"]))
    elif r["state"] not in BOOKING_STATES:
        unexpected = [b["id"] for b in bookings or ([booking] if booking else [])
                      if b["cancelled_at"] is None]
        if unexpected:
            details["bookingRow"] = {"unexpected": unexpected[0], "state": r["state"],
                                     **({"all": unexpected} if len(unexpected) > 1 else {})}
    if record is None:
        if r["state"] not in TERMINAL_STATES:
            details["redisRecord"] = "absent"
            status = "missing"
    else:
        if record.version < r["version"]:
            status = "missing"
        _field(details, "redisRecord", "state", r["state"], str(getattr(record.state, "value",
                                                                       record.state)))
        _field(details, "redisRecord", "version", r["version"], record.version)
        _field(details, "redisRecord", "resourceId", r["resourceId"], record.resource_id)
        _field(details, "redisRecord", "partnerId", r["partnerId"], record.partner_id)
        if items is not None and row["version"] == record.version:
            _field(details, "redisRecord", "items", items, _record_items(record))
    return status


def _item_bookings(details: dict, reservation_id: str, items: list[dict], bookings) -> bool:
    """A booked multi-resource reservation: every item k has its live booking row
    (``bkg_<…>.k``, item 0 ``bkg_<…>``) on the item's resource and slot. True when one
    is missing (absent or cancelled)."""
    by_item = {b["item"]: b for b in bookings}
    missing = False
    for k, item in enumerate(items):
        b = by_item.get(k)
        name = f"item{k}"
        if b is None or b["cancelled_at"] is not None:
            details.setdefault("bookingRows", {})[name] = "absent" if b is None else "cancelled"
            missing = True
            continue
        expected_id = booking_id_for(reservation_id) + (f".{k}" if k else "")
        for field, want, got in (("id", expected_id, b["id"]),
                                 ("resourceId", item["resourceId"], b["resource_id"]),
                                 ("slotStart", item["slotStart"], _ms(b["slot_start"])),
                                 ("slotEnd", item["slotEnd"], _ms(b["slot_end"]))):
            if want != got:
                details.setdefault("bookingRows", {}).setdefault(name, {})[field] = {
                    "audit": want, "found": got}
    extra = sorted(k for k in by_item if k >= len(items))
    if extra:
        details.setdefault("bookingRows", {})["extra"] = [by_item[k]["id"] for k in extra]
    return missing


async def replay(pool, read_record: RedisReader, reservation_id: str) -> dict[str, Any] | None:
    """The report of one reservation; None when no store knows it."""
    async with pool.acquire() as conn:
        rows = await load(conn, reservation_id)
    record = await read_record(reservation_id)
    if not rows["audit"] and not rows["history"] and rows["row"] is None \
            and rows["booking"] is None and record is None:
        return None
    return compare(reservation_id, rows, record)


async def reservation_ids(pool, since_ms: int | None, settle_ms: int,
                          now_ms: int | None = None) -> list[str]:
    """Reservations changed since ``since_ms`` (all when None) and not within the last
    ``settle_ms`` (their events may still be in the commit queue)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    settled = now_ms - settle_ms
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT id FROM (
                   SELECT id, updated_at AS at FROM reservations
                   UNION ALL
                   SELECT reservation_id, max(at) FROM audit_log
                   WHERE reservation_id IS NOT NULL GROUP BY reservation_id) c
               GROUP BY id
               HAVING ($1::bigint IS NULL OR max(at) >= to_timestamp($1::bigint / 1000.0))
                  AND max(at) < to_timestamp($2::bigint / 1000.0)
               ORDER BY id""", since_ms, settled)
    return [r["id"] for r in rows]


async def parity(pool, read_record: RedisReader, *, since_ms: int | None = None,
                 settle_ms: int = 60_000, concurrency: int = 8,
                 now_ms: int | None = None) -> dict[str, Any]:
    """Replay every reservation of the window: counts per status and the drifted ids."""
    ids = await reservation_ids(pool, since_ms, settle_ms, now_ms)
    counts = dict.fromkeys(STATUSES, 0)
    drifted: list[dict[str, Any]] = []
    queue = list(ids)

    async def worker() -> None:
        while queue:
            rid = queue.pop()
            report = await replay(pool, read_record, rid)
            if report is None:
                continue
            for status in STATUSES:
                counts[status] += report["summary"][status]
            if report["summary"]["drift"]:
                drifted.append({"reservationId": rid,
                                **{s: report["summary"][s] for s in STATUSES[1:]}})

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    drifted.sort(key=lambda d: d["reservationId"])
    return {"reservations": len(ids), "drifted": len(drifted), "events": counts,
            "drift": counts["diff"] + counts["missing"] + counts["extra"],
            "since": since_ms, "settleMs": settle_ms, "driftedReservations": drifted[:100]}


def publish(summary: dict[str, Any]) -> None:
    """The drift counts into ``slotguard_parity_drift_events{status}`` (engine/metrics.py)."""
    from engine import metrics

    for status in STATUSES[1:]:
        metrics.PARITY_DRIFT_EVENTS.labels(status=status).set(summary["events"][status])


def textfile(summary: dict[str, Any]) -> str:
    """The drift counts in the Prometheus text format (node_exporter's textfile collector)."""
    lines = ["# HELP slotguard_parity_drift_events Replay events that disagree with the audit "
             "log, by status (diff|missing|extra), in the last parity run.",
             "# TYPE slotguard_parity_drift_events gauge"]
    lines += [f'slotguard_parity_drift_events{{status="{s}"}} {summary["events"][s]}'
              for s in STATUSES[1:]]
    return "\n".join(lines) + "\n"
