"""Engine objects as the partner contract's JSON (camelCase, ISO 8601 times with ``Z``)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from api.validation import format_time
from engine import clock
from engine.occupancy import CONFIDENCE_THRESHOLD, Availability
from engine.reservations import Reservation
from engine.service import Created


class JSONResponse(Response):
    """orjson-rendered JSON (Starlette's own uses the slower stdlib encoder)."""

    media_type = "application/json"
    encode = staticmethod(orjson.dumps)

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def created_view(created: Created) -> dict[str, Any]:
    moved, vendor = created.moved, created.vendor
    expires_at = format_time(moved.deadline_ms)
    return {
        "reservationId": moved.reservation_id,
        "state": moved.state.value,
        "expiresAt": expires_at,
        "vendorConfirmationRequired": vendor.confirmation_required,
        # The vendor has until the hold's deadline; an instant-book vendor has confirmed.
        "estimatedConfirmationTime": (expires_at if vendor.confirmation_required
                                      else format_time(clock.now_ms())),
    }


def reservation_view(r: Reservation) -> dict[str, Any]:
    return {
        "reservationId": r.reservation_id,
        "state": r.state.value,
        "vendorId": r.vendor_id,
        "resourceId": r.resource_id,
        "slotStartTime": format_time(r.slot_start_ms),
        "slotEndTime": format_time(r.slot_end_ms),
        "requesterId": r.requester_id,
        "createdAt": format_time(r.created_at_ms),
        "expiresAt": format_time(r.deadline_ms),
        "version": r.version,
        "metadata": r.metadata or {},
        "stateHistory": [history_view(h) for h in r.history],
        "bookingId": r.booking_id,
        "failureReason": r.failure_reason,
    }


def history_view(h: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": h["id"],
        "reservationId": h["reservationId"],
        "fromState": h["fromState"],
        "toState": h["toState"],
        "triggeredBy": h["triggeredBy"],
        "reason": h.get("reason"),
        "metadata": h.get("metadata"),
        "timestamp": format_time(h["timestamp_ms"]),
        "idempotencyKey": h.get("idempotencyKey"),
        "version": h["version"],
    }


def availability_view(vendor_id: str, a: Availability, include_confidence: bool) -> dict:
    computed_at = format_time(a.computed_at_ms)
    slots = []
    for s in a.slots:
        slot: dict[str, Any] = {
            "startTime": format_time(s.start_ms),
            "endTime": format_time(s.end_ms),
            "isAvailable": s.is_available,
            "status": s.status,
            "reasons": s.reasons,
            "computedAt": computed_at,
            "computedVersion": a.computed_version,
        }
        if include_confidence:
            slot["confidence"] = s.confidence
        slots.append(slot)
    return {
        "vendorId": vendor_id,
        "resourceId": a.resource_id,
        "startTime": format_time(a.start_ms),
        "endTime": format_time(a.end_ms),
        "computedAt": computed_at,
        "computedVersion": a.computed_version,
        "slots": slots,
        "metadata": {"confidenceThreshold": CONFIDENCE_THRESHOLD,
                     "computationTimeMs": round(a.computation_ms, 3)},
    }
