"""Events out (issue 14): which transitions are events, their payloads, and the outbox write.

The commit queue is the one source: when :func:`engine.store.commit.apply_batch` writes a
batch's transitions to Postgres, it calls :func:`emit_transitions` in the SAME transaction
with the transitions written now. That inserts one ``webhook_events`` row per event (keyed
``<event id>:<type>``, so a redelivered entry emits nothing twice) and one
``webhook_deliveries`` row per matching enabled endpoint (a transactional outbox: an event
exists iff its transition is recorded). The worker's delivery loop
(:mod:`engine.webhook_delivery`) sends them; the live stream (:mod:`engine.event_stream`)
reads the same rows by position.

Writers take a transaction-level advisory lock before inserting events, so ``position``
(a bigserial) becomes visible in commit order: a reader that has seen position N never
later finds a smaller one appear (the SSE ``Last-Event-ID`` resume depends on it).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from engine.times import format_time

# Every event type, in the order of the contract. ``ping`` is sent by the test route only.
RESERVATION_TYPES = (
    "reservation.created",
    "reservation.awaiting_vendor_confirmation",
    "reservation.vendor_confirmed",
    "reservation.vendor_authorized",
    "reservation.authorized_both",
    "reservation.committed",
    "reservation.failed",
    "reservation.expired",
    "reservation.cancelled",
    "reservation.extended",
    "booking.cancelled",
)
OPS_TYPES = ("hold.manually_released", "hold.bulk_released")
# Sent to an endpoint's owner when the endpoint is disabled after failing for days (an
# owner's other enabled endpoints receive it).
ENDPOINT_TYPES = ("webhook_endpoint.disabled",)
EVENT_TYPES = RESERVATION_TYPES + OPS_TYPES + ENDPOINT_TYPES
PING = "ping"

# State entered -> event type (the main path's silent steps -- HELD's neighbours
# AWAITING_VENDOR_AUTH, AWAITING_REQUESTER_AUTH, COMMIT_IN_PROGRESS -- are not events).
_BY_STATE = {
    "HELD": "reservation.created",
    "AWAITING_VENDOR_CONFIRMATION": "reservation.awaiting_vendor_confirmation",
    "CONFIRMED_BY_VENDOR": "reservation.vendor_confirmed",
    "VENDOR_AUTHORIZED": "reservation.vendor_authorized",
    "AUTHORIZED_BOTH": "reservation.authorized_both",
    "COMMITTED": "reservation.committed",
    "EXPIRED": "reservation.expired",
    "CANCELLED": "reservation.cancelled",
}
_OPS_ACTORS = ("ops", "admin")
# Events are written under this lock (per schema): positions become visible in order.
EVENTS_LOCK = "SELECT pg_advisory_xact_lock(hashtext(current_schema()), 14)"


def types_of(from_state: str, to_state: str, actor: str, metadata: dict[str, Any] | None,
             moved: bool) -> list[tuple[str, str]]:
    """(type, audience) of the events one transition is: audience 'tenants' (its partner's
    and vendor's endpoints, and ops') or 'ops' (ops endpoints only)."""
    if from_state == to_state:
        # A move ('modified') is no event of the contract; every other same-state entry is
        # an extension (its reason may be the caller's own).
        return [] if moved else [("reservation.extended", "tenants")]
    if to_state.startswith("FAILED_"):
        return [("reservation.failed", "tenants")]
    if to_state == "CANCELLED":
        if from_state == "COMMITTED":  # a booking's cancellation (lua/free_booked.lua)
            return [("booking.cancelled", "tenants")]
        out = [("reservation.cancelled", "tenants")]
        if actor in _OPS_ACTORS and not (metadata or {}).get("bulkReleaseId"):
            out.append(("hold.manually_released", "ops"))
        return out
    kind = _BY_STATE.get(to_state)
    return [(kind, "tenants")] if kind else []


def payload(kind: str, at_ms: int, data: dict[str, Any]) -> bytes:
    return orjson.dumps({"type": kind, "timestamp": format_time(at_ms), "data": data})


# Rows: (event key, type, audience, partner, vendor, reservation, version, payload, at ms)
_EMIT = """
WITH ev AS (
    INSERT INTO webhook_events (event_key, type, audience, partner_id, vendor_id,
                                reservation_id, version, payload, occurred_at)
    SELECT k, t, a, nullif(p, ''), nullif(v, ''), nullif(r, ''), nullif(n, 0), d::jsonb,
           timestamptz 'epoch' + ms * interval '1 millisecond'
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::int[], $8::text[], $9::bigint[]) WITH ORDINALITY
         AS x(k, t, a, p, v, r, n, d, ms, ord)
    ORDER BY ord
    ON CONFLICT (event_key) DO NOTHING
    RETURNING position, type, audience, partner_id, vendor_id, reservation_id, version
)
INSERT INTO webhook_deliveries (id, endpoint_id, event_position, webhook_id, type,
                                reservation_id, version)
SELECT 'dlv_' || replace(gen_random_uuid()::text, '-', ''), e.id, ev.position,
       'msg_' || ev.position, ev.type, ev.reservation_id, ev.version
FROM ev JOIN webhook_endpoints e
  ON NOT e.disabled
 AND (ev.type = ANY(e.events) OR '*' = ANY(e.events))
 AND (e.owner_kind = 'ops'
      OR (ev.audience = 'tenants' AND e.owner_kind = 'partner' AND e.owner_id = ev.partner_id)
      OR (ev.audience = 'tenants' AND e.owner_kind = 'vendor' AND e.owner_id = ev.vendor_id))
"""


async def emit(conn: asyncpg.Connection, rows: list[tuple]) -> None:
    """Write events and their deliveries (inside the caller's transaction). Idempotent."""
    if not rows:
        return
    await conn.execute(EVENTS_LOCK)
    await conn.execute(_EMIT, *(list(column) for column in zip(*rows)))


def transition_rows(batch, written_rows: list[int]) -> list[tuple]:
    """The event rows of a batch's transitions written now (rows of
    :class:`engine.store.events.Batch`), in batch order (version order per reservation)."""
    out = []
    for row in written_rows:
        from_state, to_state = batch.from_state[row], batch.to_state[row]
        metadata_text = batch.metadata[row]
        metadata = orjson.loads(metadata_text) if metadata_text != "{}" else None
        moved = '"modification":' in batch.audit[row]
        kinds = types_of(from_state, to_state, batch.triggered_by[row], metadata, moved)
        if not kinds:
            continue
        at = batch.at_ms[row]
        reservation_id, version = batch.reservation_id[row], batch.version[row]
        partner, vendor = batch.partner_id[row], batch.vendor_id[row]
        data = {
            "reservationId": reservation_id, "state": to_state, "version": version,
            "fromState": from_state or None, "vendorId": vendor, "partnerId": partner,
            "resourceId": batch.resource_id[row], "requesterId": batch.requester_id[row],
            "slotStartTime": format_time(batch.slot_start[row]),
            "slotEndTime": format_time(batch.slot_end[row]),
            "expiresAt": format_time(batch.expires_at[row]),
            "triggeredBy": batch.triggered_by[row], "reason": batch.reason[row] or None,
            "occurredAt": format_time(at),
        }
        if metadata:
            data["metadata"] = metadata
        for kind, audience in kinds:
            body = data
            if kind == "booking.cancelled":
                # the booking and its refunds (lua/free_booked.lua), at the top of data
                body = {**data, **((metadata or {}).get("bookingCancellation") or {})}
            if kind == "hold.manually_released":
                body = {**data, "releasedBy": {"actor": batch.triggered_by[row],
                                               "keyId": (metadata or {}).get("releasedBy")},
                        "reservationIds": [reservation_id]}
            out.append((f"{batch.event_id[row]}:{kind}", kind, audience, partner, vendor,
                        reservation_id, version, payload(kind, at, body).decode(), at))
    return out


async def emit_bulk_release(pool: asyncpg.Pool, bulk_id: str, at_ms: int, actor: str,
                            key_id: str, reason: str, released: list[dict],
                            failed: list[dict]) -> None:
    """The ops event of one bulk release (who, why, which holds): one event per request,
    written by the ops service once the releases are done (each release is also a
    ``reservation.cancelled`` of its own, through the commit queue)."""
    data = {"bulkReleaseId": bulk_id, "releasedBy": {"actor": actor, "keyId": key_id},
            "reason": reason or None,
            "reservationIds": [r["reservationId"] for r in released], "failed": failed,
            "occurredAt": format_time(at_ms)}
    row = (f"{bulk_id}:hold.bulk_released", "hold.bulk_released", "ops", "", "", "", 0,
           payload("hold.bulk_released", at_ms, data).decode(), at_ms)
    async with pool.acquire() as conn:
        async with conn.transaction():
            await emit(conn, [row])


async def emit_owner_event(conn: asyncpg.Connection, kind: str, key: str, owner_kind: str,
                           owner_id: str, at_ms: int, data: dict[str, Any]) -> None:
    """An event about an endpoint, to its owner's (other) enabled endpoints: a partner's or
    vendor's endpoints by tenancy; ops endpoints for an ops owner."""
    partner = owner_id if owner_kind == "partner" else ""
    vendor = owner_id if owner_kind == "vendor" else ""
    audience = "ops" if owner_kind == "ops" else "tenants"
    await emit(conn, [(key, kind, audience, partner, vendor, "", 0,
                       payload(kind, at_ms, data).decode(), at_ms)])
