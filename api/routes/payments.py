"""Payment routes (issue 12): booking cancellation with refunds, inbound Stripe webhooks.
The authorization actions live with the other reservation actions (api/routes/reservations.py)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.context import client_ip, principal, services
from api.schemas_payments import BookingCancellation, CancelBookingRequest, WebhookAck
from api.validation import format_time, given, parse_body
from api.views import JSONResponse


async def cancel_booking(request: Request) -> Response:
    svc = services(request)
    caller = await principal(request)
    body = parse_body(await request.body(), request.headers.get("content-type"),
                      CancelBookingRequest, optional=True)
    done = await svc.extra["bookings"].cancel(caller, request.path_params["bookingId"],
                                              given(body.reason), client_ip(request))
    return JSONResponse(BookingCancellation(
        booking_id=done.booking_id, reservation_id=done.reservation_id,
        cancelled_by=done.cancelled_by, reason=done.reason,
        requester_refund_amount=done.requester_refund_amount,
        vendor_refund_amount=done.vendor_refund_amount, currency=done.currency,
        cancelled_at=format_time(done.cancelled_at_ms)))


async def stripe_webhook(request: Request) -> Response:
    """The raw body is verified as received (no parsing before the signature check)."""
    result = await services(request).extra["payments"].webhook(
        await request.body(), request.headers.get("stripe-signature"))
    return JSONResponse(WebhookAck(received=True, result=result))
