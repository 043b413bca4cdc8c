"""Engine objects as the partner contract's JSON (camelCase, ISO 8601 times with ``Z``)."""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET
from starlette.responses import Response

from api import schemas
from api.validation import format_time
from engine import clock
from engine.reservations import Reservation
from engine.service import Created


class JSONResponse(Response):
    """msgspec-rendered JSON of a response Struct of api/schemas.py (or plain JSON values);
    Starlette's own uses the slower stdlib encoder."""

    media_type = "application/json"
    encode = staticmethod(msgspec.json.Encoder().encode)

    def render(self, content: Any) -> bytes:
        return self.encode(content)


def created_view(created: Created) -> schemas.CreateReservationResponse:
    moved, vendor = created.moved, created.vendor
    expires_at = format_time(moved.deadline_ms)
    return schemas.CreateReservationResponse(
        reservation_id=moved.reservation_id,
        state=moved.state.value,
        expires_at=expires_at,
        vendor_confirmation_required=vendor.confirmation_required,
        # The vendor has until the hold's deadline; an instant-book vendor has confirmed.
        estimated_confirmation_time=(expires_at if vendor.confirmation_required
                                     else format_time(clock.now_ms())),
        resource_id=created.resource_id or UNSET,
        items=UNSET if not created.items else [
            schemas.ReservationItemOut(resource_id=r, slot_start_time=format_time(s),
                                       slot_end_time=format_time(e))
            for r, s, e in created.items])


def reservation_view(r: Reservation, payment: dict[str, Any] | None = None,
                     next_action: dict[str, Any] | None = None) -> schemas.Reservation:
    """``payment``: the seed's PaymentState (issue 12), for a paying vendor's reservation;
    ``next_action``: what the payer must do (3-D Secure) when an authorization waits."""
    return schemas.Reservation(
        reservation_id=r.reservation_id,
        state=r.state.value,
        vendor_id=r.vendor_id,
        resource_id=r.resource_id,
        slot_start_time=format_time(r.slot_start_ms),
        slot_end_time=format_time(r.slot_end_ms),
        requester_id=r.requester_id,
        created_at=format_time(r.created_at_ms),
        expires_at=format_time(r.deadline_ms),
        version=r.version,
        metadata=r.metadata or {},
        state_history=[history_view(h) for h in r.history],
        booking_id=r.booking_id,
        failure_reason=r.failure_reason,
        payment_state=msgspec.UNSET if payment is None
        else msgspec.convert(payment, schemas.PaymentState, from_attributes=False,
                             str_keys=True),
        next_action=msgspec.UNSET if next_action is None else next_action,
        items=UNSET if not getattr(r, "items", None) else [
            schemas.ReservationItemOut(resource_id=i[0], slot_start_time=format_time(i[1]),
                                       slot_end_time=format_time(i[2])) for i in r.items])


def history_view(h: dict[str, Any]) -> schemas.StateTransition:
    return schemas.StateTransition(
        id=h["id"],
        reservation_id=h["reservationId"],
        from_state=h["fromState"],
        to_state=h["toState"],
        triggered_by=h["triggeredBy"],
        reason=h.get("reason"),
        metadata=h.get("metadata"),
        timestamp=format_time(h["timestamp_ms"]),
        idempotency_key=h.get("idempotencyKey"),
        version=h["version"])
