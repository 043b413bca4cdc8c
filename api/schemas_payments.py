"""Payment shapes (issue 12): the seed's PaymentState (camelCase), the booking
cancellation's body and answer. Included in the OpenAPI components by api/openapi.py."""

from __future__ import annotations

from msgspec import UNSET, UnsetType

from api.schemas import INTENT_STATUS, Body, Out, OutTime, PaymentState, TEXT_DOC, text
from engine.reservations import MAX_TEXT

PAYMENT_METHOD_DOC = {"pattern": "^pm_[A-Za-z0-9_]{1,200}$",
                      "description": "a Stripe PaymentMethod id, e.g. pm_card_visa"}


class CancelBookingRequest(Body):
    reason: text(MAX_TEXT, TEXT_DOC) | UnsetType = UNSET


class BookingCancellation(Out):
    booking_id: str
    reservation_id: str
    cancelled_by: str
    reason: str | None
    requester_refund_amount: int
    vendor_refund_amount: int
    currency: str | None
    cancelled_at: OutTime


class WebhookAck(Out):
    received: bool
    result: str


REQUESTS = (CancelBookingRequest,)
RESPONSES = (BookingCancellation, WebhookAck)
