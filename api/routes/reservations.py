"""Reservation routes: create, read, and the lifecycle actions. Each handler parses the
request, makes one service call (engine/service.py decides every rule) and renders."""

from __future__ import annotations

import functools

import msgspec
from msgspec import UNSET
from starlette.requests import Request
from starlette.responses import Response

from api.context import client_ip, principal, request_id, services
from api.errors import engine_error_response
from api.etag import not_modified, not_modified_response, with_etag
from api.idempotency import REPLAY_HEADER
from api.schemas import (ActionRequest, AuthorizationRequest, CreateReservationRequest,
                         ExtendRequest, ModifyReservationRequest)
from api.validation import given, invalid, parse_body, parse_if_match
from api.views import JSONResponse, created_view, reservation_view
from engine import metrics
from engine.idempotency import fingerprint
from engine.lifecycle import State
from engine.service import ACTIONS, CreateRequest

ACTION_SHAPES = {"extend": ExtendRequest, "vendor-authorization": AuthorizationRequest,
                 "requester-authorization": AuthorizationRequest}


def _render_created(created) -> tuple[int, bytes]:
    return 201, JSONResponse.encode(created_view(created))


def _render_error(exc) -> tuple[int, bytes]:
    response = engine_error_response(exc)
    return response.status_code, bytes(response.body)


async def create_reservation(request: Request) -> Response:
    svc = services(request)
    caller = await principal(request)
    body = parse_body(await request.body(), request.headers.get("content-type"),
                      CreateReservationRequest)
    header_key = request.headers.get("idempotency-key")
    body_key = given(body.idempotency_key)
    items = given(body.items)
    if items is None:  # the single-slot forms: both times are required
        for name, value in (("slotStartTime", body.slot_start_time),
                            ("slotEndTime", body.slot_end_time)):
            if value is UNSET:
                raise invalid("MISSING_FIELD", f"{name} is required", name)
    req = CreateRequest(
        vendor_id=body.vendor_id, resource_id=given(body.resource_id),
        slot_start=given(body.slot_start_time), slot_end=given(body.slot_end_time),
        items=None if items is None else tuple(
            (i.resource_id, i.slot_start_time, i.slot_end_time) for i in items),
        requester_id=body.requester_id, metadata=given(body.metadata),
        idempotency_key=body_key, idempotency_header=header_key,
        request_id=request_id(request),
        resource_group_id=given(body.resource_group_id),
        near_resource_id=given(body.near_resource_id),
        near_zone=given(body.near_zone),
        # The key itself is not part of what must match; where it was sent from does not.
        fingerprint=None if header_key is None and body_key is None
        else fingerprint("POST", "/v1/reservations",
                         {k: v for k, v in msgspec.to_builtins(body).items()
                          if k != "idempotencyKey"}))
    answer = await svc.reservations.create(caller, req, client_ip=client_ip(request),
                                           render=_render_created,
                                           render_error=_render_error)
    return Response(answer.body, status_code=answer.status, media_type="application/json",
                    headers={REPLAY_HEADER: "true"} if answer.replayed else None)


async def get_reservation(request: Request) -> Response:
    svc = services(request)
    caller = await principal(request)
    found, payment = await svc.extra["payments"].read(
        caller, request.path_params["reservationId"], client_ip(request))
    # A paying reservation's paymentState moves without its version (captures, refunds):
    # it is never answered 304 (its ETag is still the version If-Match compares).
    if payment is None and not_modified(request.headers.get("if-none-match"), found.version):
        return not_modified_response(found.version)
    return with_etag(JSONResponse(reservation_view(found, payment)), found.version)


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
    body = parse_body(await request.body(), request.headers.get("content-type"),
                      ACTION_SHAPES.get(action, ActionRequest), optional=True)
    if action in ("vendor-authorization", "requester-authorization"):
        # Payments (issue 12): with a payment method, a manual-capture PaymentIntent.
        answer = await svc.extra["payments"].authorize(
            caller, request.path_params["reservationId"], action,
            payment_method_id=given(body.payment_method_id), outcome=given(body.outcome),
            expected_version=parse_if_match(request.headers.get("if-match")),
            reason=given(body.reason), metadata=given(body.metadata),
            client_ip=client_ip(request), request_id=request_id(request))
        # Waiting for 3-D Secure: 202 with nextAction, the reservation unchanged.
        return JSONResponse(reservation_view(answer.reservation, answer.payment_state,
                                             answer.next_action),
                            status_code=202 if answer.next_action is not None else 200)
    act = svc.extra["payments"].cancel if action == "cancel" else \
        functools.partial(svc.reservations.act, action=action)
    moved = await act(
        caller, request.path_params["reservationId"],
        outcome=given(getattr(body, "outcome", UNSET)),
        expected_version=parse_if_match(request.headers.get("if-match")),
        reason=given(body.reason), metadata=given(body.metadata),
        ttl_ms=given(getattr(body, "ttl_ms", UNSET)),
        client_ip=client_ip(request), request_id=request_id(request))
    if action == "cancel":
        metrics.HOLDS_RELEASED.inc()
    # The state this action's own transition wrote: a commit is always accepted, never
    # reported as a later state some worker reached meanwhile.
    status = 202 if moved.state == State.COMMIT_IN_PROGRESS and action == "commit" else 200
    return with_etag(JSONResponse(reservation_view(moved), status_code=status), moved.version)


async def modify_reservation(request: Request) -> Response:
    """Move a live hold to a new slot and/or resource (issue 16), ``If-Match`` honoured."""
    svc = services(request)
    caller = await principal(request)
    body = parse_body(await request.body(), request.headers.get("content-type"),
                      ModifyReservationRequest)
    moved = await svc.reservations.modify(
        caller, request.path_params["reservationId"], resource_id=given(body.resource_id),
        slot_start=body.slot_start_time, slot_end=body.slot_end_time,
        expected_version=parse_if_match(request.headers.get("if-match")),
        client_ip=client_ip(request), request_id=request_id(request))
    return with_etag(JSONResponse(reservation_view(moved)), moved.version)
