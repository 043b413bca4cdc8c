"""Reservation routes: create, read, and the lifecycle actions."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from api.context import principal, request_id, services, throttle
from api.idempotency import key_of, run_once
from api.validation import Field, check_fields, invalid, json_object, parse_if_match, parse_range
from api.views import JSONResponse, created_view, reservation_view
from engine import metrics
from engine.errors import CapExceeded, HoldConflict
from engine.lifecycle import State
from engine.permissions import require
from engine.service import ACTIONS, MAX_TTL_MS, SYSTEM_PARTNER, CreateRequest, check_reason

CREATE_FIELDS = [
    Field("vendorId", str, required=True, max_length=64),
    Field("resourceId", str, max_length=64),
    Field("slotStartTime", str, required=True, max_length=64),
    Field("slotEndTime", str, required=True, max_length=64),
    Field("requesterId", str, required=True),
    Field("metadata", dict),
    Field("idempotencyKey", str, max_length=255),
]
ACTION_FIELDS = [Field("reason", str), Field("metadata", dict)]
AUTH_FIELDS = [*ACTION_FIELDS, Field("outcome", str, max_length=16)]
EXTEND_FIELDS = [*ACTION_FIELDS, Field("ttlMs", int)]


async def create_reservation(request: Request) -> Response:
    svc = services(request)
    caller = await principal(request)
    body = check_fields(json_object(await request.body(), request.headers.get("content-type")),
                        CREATE_FIELDS)
    # Who and what first (403, 404), then the finer rules of the request (400).
    require(caller, "reservation.create")
    await svc.catalog.vendor(body["vendorId"])
    start_ms, end_ms = parse_range(body["slotStartTime"], body["slotEndTime"],
                                   "slotStartTime", "slotEndTime")
    key = key_of(request.headers.get("idempotency-key"), body)
    req = CreateRequest(
        vendor_id=body["vendorId"], resource_id=body.get("resourceId"), start_ms=start_ms,
        end_ms=end_ms, requester_id=body["requesterId"],
        metadata=_with_request_id(body.get("metadata"), request), idempotency_key=key)
    await svc.reservations.validate_create(caller, req)  # every 4xx before the first write

    async def produce() -> Response:
        try:
            # The rate limits are asked in the same Redis round trip as the hold cap.
            created = await svc.reservations.create(
                caller, req, admission=lambda: throttle(request, caller))
        except HoldConflict:
            metrics.HOLDS_CONFLICTED.inc()
            raise
        except CapExceeded:
            metrics.CAP_REJECTIONS.labels(scope="partner").inc()
            raise
        metrics.HOLDS_PLACED.inc()
        return JSONResponse(created_view(created), status_code=201)

    partner_id = caller.partner_id or SYSTEM_PARTNER
    return await run_once(svc.idempotency, partner_id, key, "POST", "/v1/reservations", body,
                          produce)


async def get_reservation(request: Request) -> Response:
    svc = services(request)
    caller = await principal(request)
    await throttle(request, caller)
    found = await svc.reservations.read(caller, request.path_params["reservationId"])
    return JSONResponse(reservation_view(found))


def action_endpoint(action: str):
    """The handler of ``POST /v1/reservations/{reservationId}/<action>``."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")

    async def endpoint(request: Request) -> Response:
        return await act_on_reservation(request, action)

    endpoint.__name__ = "reservation_" + action.replace("-", "_")
    return endpoint


async def act_on_reservation(request: Request, action: str) -> Response:
    """One lifecycle step, compare-and-set on ``If-Match`` when given."""
    svc = services(request)
    caller = await principal(request)
    fields = (EXTEND_FIELDS if action == "extend" else
              AUTH_FIELDS if action.endswith("-authorization") else ACTION_FIELDS)
    body = check_fields(json_object(await request.body(), request.headers.get("content-type"),
                                    optional=True), fields)
    expected = parse_if_match(request.headers.get("if-match"))
    reason = check_reason(body.get("reason"))
    ttl_ms = body.get("ttlMs")
    if ttl_ms is not None and not 1_000 <= ttl_ms <= MAX_TTL_MS:
        raise invalid("INVALID_FIELD", f"ttlMs must be between 1000 and {MAX_TTL_MS}",
                      "ttlMs", maximum=MAX_TTL_MS)
    outcome = body.get("outcome")
    if action.endswith("-authorization"):
        outcome = outcome or "authorized"
        if outcome not in ("authorized", "failed"):
            raise invalid("INVALID_OUTCOME", "outcome must be 'authorized' or 'failed'",
                          "outcome")
    await throttle(request, caller)
    moved = await svc.reservations.act(
        caller, request.path_params["reservationId"], action, outcome=outcome,
        expected_version=expected, reason=reason,
        metadata=_with_request_id(body.get("metadata"), request), ttl_ms=ttl_ms)
    if action == "cancel":
        metrics.HOLDS_RELEASED.inc()
    status = 202 if moved.state == State.COMMIT_IN_PROGRESS and action == "commit" else 200
    return JSONResponse(reservation_view(moved), status_code=status)


def _with_request_id(metadata: dict[str, Any] | None, request: Request) -> dict[str, Any]:
    """Transition metadata carries the request id (the client's own fields win)."""
    return {"requestId": request_id(request), **(metadata or {})}
