"""Events out (issue 14): webhook endpoints, their delivery log, and the live event stream.

Routes parse (api/schemas_webhooks.py), make one service call (engine/webhook_service.py,
engine/event_stream.py decide permissions, tenancy and every 4xx) and render here.
"""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from api import schemas_webhooks as s
from api.context import principal, services
from api.validation import format_time, given, parse_body
from api.views import JSONResponse
from engine import event_stream
from engine.webhook_service import Delivery, Endpoint


def _ms(moment) -> str | None:
    return None if moment is None else format_time(int(moment.timestamp() * 1000))


def endpoint_view(e: Endpoint) -> s.WebhookEndpoint:
    return s.WebhookEndpoint(**_endpoint_fields(e))


def _endpoint_fields(e: Endpoint) -> dict:
    return dict(id=e.id, url=e.url, events=list(e.events), description=e.description,
                disabled=e.disabled, disabled_reason=e.disabled_reason,
                flagged=e.flagged_at is not None, flagged_at=_ms(e.flagged_at),
                failing_since=_ms(e.failing_since),
                previous_secret_expires_at=_ms(e.previous_secret_expires_at),
                created_at=_ms(e.created_at), updated_at=_ms(e.updated_at))


def delivery_view(d: Delivery) -> s.WebhookDelivery:
    return s.WebhookDelivery(
        delivery_id=d.id, webhook_id=d.webhook_id, endpoint_id=d.endpoint_id, type=d.type,
        status=d.status, attempts=d.attempts, last_status_code=d.last_status_code,
        last_latency_ms=d.last_latency_ms, last_error=d.last_error,
        last_attempt_at=_ms(d.last_attempt_at),
        next_attempt_at=_ms(d.next_attempt_at) if d.status == "pending" else None,
        delivered_at=_ms(d.delivered_at), created_at=_ms(d.created_at),
        reservation_id=d.reservation_id, version=d.version)


async def _body(request: Request, shape):
    return parse_body(await request.body(), request.headers.get("content-type"), shape)


async def endpoints(request: Request) -> Response:
    """/v1/webhook-endpoints: one route for its methods (405 answers list them all)."""
    if request.method == "POST":
        return await create_endpoint(request)
    return await list_endpoints(request)


async def endpoint(request: Request) -> Response:
    """/v1/webhook-endpoints/{endpointId}: GET, PATCH, DELETE."""
    handler = {"GET": get_endpoint, "PATCH": update_endpoint,
               "DELETE": delete_endpoint}[request.method]
    return await handler(request)


async def create_endpoint(request: Request) -> Response:
    caller = await principal(request)
    body = await _body(request, s.CreateWebhookEndpointRequest)
    endpoint, secret = await services(request).webhooks.create(
        caller, body.url, body.events, given(body.description))
    return JSONResponse(s.CreatedWebhookEndpoint(**_endpoint_fields(endpoint), secret=secret),
                        status_code=201)


async def list_endpoints(request: Request) -> Response:
    caller = await principal(request)
    endpoints = await services(request).webhooks.list(caller)
    return JSONResponse(s.WebhookEndpointList(data=[endpoint_view(e) for e in endpoints]))


async def get_endpoint(request: Request) -> Response:
    caller = await principal(request)
    endpoint = await services(request).webhooks.get(caller, request.path_params["endpointId"])
    return JSONResponse(endpoint_view(endpoint))


async def update_endpoint(request: Request) -> Response:
    caller = await principal(request)
    body = await _body(request, s.UpdateWebhookEndpointRequest)
    endpoint = await services(request).webhooks.update(
        caller, request.path_params["endpointId"], url=given(body.url),
        events=given(body.events), disabled=given(body.disabled),
        description=given(body.description))
    return JSONResponse(endpoint_view(endpoint))


async def delete_endpoint(request: Request) -> Response:
    caller = await principal(request)
    await services(request).webhooks.delete(caller, request.path_params["endpointId"])
    return Response(status_code=204)


async def rotate_secret(request: Request) -> Response:
    caller = await principal(request)
    endpoint, secret = await services(request).webhooks.rotate_secret(
        caller, request.path_params["endpointId"])
    return JSONResponse(s.RotatedWebhookSecret(
        id=endpoint.id, secret=secret,
        previous_secret_expires_at=_ms(endpoint.previous_secret_expires_at)))


async def list_deliveries(request: Request) -> Response:
    caller = await principal(request)
    page, cursor = await services(request).webhooks.deliveries(
        caller, request.path_params["endpointId"], dict(request.query_params))
    return JSONResponse(s.WebhookDeliveryPage(data=[delivery_view(d) for d in page],
                                              next_cursor=cursor))


async def retry_delivery(request: Request) -> Response:
    caller = await principal(request)
    delivery = await services(request).webhooks.retry(
        caller, request.path_params["endpointId"], request.path_params["deliveryId"])
    return JSONResponse(delivery_view(delivery), status_code=202)


async def test_endpoint(request: Request) -> Response:
    caller = await principal(request)
    delivery = await services(request).webhooks.ping(caller,
                                                     request.path_params["endpointId"])
    return JSONResponse(delivery_view(delivery), status_code=202)


async def event_stream_route(request: Request) -> Response:
    caller = await principal(request)
    query = event_stream.stream_query(caller, dict(request.query_params),
                                      request.headers.get("last-event-id"))
    svc = services(request)
    settings = svc.settings
    body = event_stream.messages(
        svc.pool, query, poll_s=settings.events_stream_poll_ms / 1000,
        heartbeat_s=settings.events_stream_heartbeat_ms / 1000, clock=time.monotonic,
        sleep=asyncio.sleep)
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"cache-control": "no-cache",
                                      "x-accel-buffering": "no"})
