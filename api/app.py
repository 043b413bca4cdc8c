"""The Starlette application: ``create_app(settings)``.

A reader finds every route's handler in :func:`routes`. The lifespan opens Redis (refusing
an evicting Redis, registering every script) and the Postgres pool, fills the catalog from
Postgres, and closes both on shutdown. Errors are answered by handlers keyed by the engine's
error classes (api/errors.py); middleware is pure ASGI (api/middleware.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from api import errors
from api.auth import KeyResolver, issue_key
from api.context import Services
from api.middleware import EdgeMiddleware, install_request_id_logging
from api.openapi import openapi_document
from api.routes import admin, availability, health, lists, ops, reservations, waitlist
from api.routes import payments, webhooks
from api.routes import pool as pool_routes
from api.views import JSONResponse
from engine import metrics
from engine.store import queries
from engine.catalog_cache import CatalogCache
from engine.availability_service import AvailabilityService
from engine.idempotency import IdempotencyStore
from engine.pool import GroupService
from engine.runtime import Runtime
from engine.payments.orchestrator import PaymentOrchestrator
from engine.payments.provider import provider_from_settings
from engine.payments_service import BookingService, PaymentService
from engine.service import ACTIONS, AdminService, ReservationService, from_record
from engine.list_service import ListService
from engine.settings import Settings
from engine.webhook_events import emit_bulk_release
from engine.webhook_service import WebhookService
from engine.transfer import TransferEngine
from engine.transfer_service import TransferService
from engine.waitlist import WaitlistEngine
from engine.waitlist_service import WaitlistService

log = logging.getLogger("slotguard.api")


def routes() -> list[BaseRoute]:
    return one_route_per_path(_routes())


def one_route_per_path(table: list[BaseRoute]) -> list[BaseRoute]:
    """Routes that share a path become one Route dispatching by method.

    Starlette answers a method a path lacks with the ``Allow`` of the first Route matching
    that path, so two Routes for one path (``GET`` and ``PUT …/schedule``) would each hide
    the other's methods from a 405 (and from OPTIONS). Features add their Routes to the table
    one method at a time; this joins them.
    """
    merged: list[BaseRoute] = []
    by_path: dict[str, dict[str, object]] = {}
    for route in table:
        if isinstance(route, Mount):
            merged.append(Mount(route.path, routes=one_route_per_path(list(route.routes))))
        elif isinstance(route, Route) and route.methods:
            handlers = by_path.get(route.path)
            if handlers is None:
                handlers = by_path[route.path] = {}
                merged.append(route)
            for method in route.methods - {"HEAD"}:
                handlers[method] = route.endpoint
        else:
            merged.append(route)
    joined: list[BaseRoute] = []
    for route in merged:
        handlers = by_path.get(route.path) if isinstance(route, Route) else None
        if handlers and set(handlers) != route.methods - {"HEAD"}:
            route = Route(route.path, lists.by_method(**handlers), methods=sorted(handlers))
        joined.append(route)
    return joined


def _routes() -> list[BaseRoute]:
    action_routes = [
        Route(f"/v1/reservations/{{reservationId}}/{action}",
              reservations.action_endpoint(action), methods=["POST"])
        for action in ACTIONS
    ]
    return [
        Route("/health/live", health.live, methods=["GET"]),
        Route("/health/ready", health.ready, methods=["GET"]),
        Route("/metrics", health.prometheus, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/reservations", lists.by_method(  # lists with cursors (issue 17)
            POST=reservations.create_reservation, GET=lists.list_reservations),
            methods=["GET", "POST"]),
        Route("/v1/reservations/{reservationId}", reservations.get_reservation,
              methods=["GET"]),
        *action_routes,
        Route("/v1/reservations/{reservationId}/modify", reservations.modify_reservation,
              methods=["POST"]),
        # Availability engine (issue 13).
        Route("/v1/vendors/{vendorId}/availability", availability.vendor_availability,
              methods=["GET"]),
        # Resource groups and their availability (issue 16, pool).
        Route("/v1/vendors/{vendorId}/resource-groups", pool_routes.create_group,
              methods=["POST"]),
        Route("/v1/vendors/{vendorId}/resource-groups/{groupId}", pool_routes.group,
              methods=["GET", "PATCH", "DELETE"]),
        Route("/v1/vendors/{vendorId}/resource-groups/{groupId}/availability",
              pool_routes.group_availability, methods=["GET"]),
        Route("/v1/vendors/{vendorId}/schedule", availability.put_schedule, methods=["PUT"]),
        Route("/v1/vendors/{vendorId}/schedule", availability.get_schedule, methods=["GET"]),
        Route("/v1/vendors/{vendorId}/busy-blocks", availability.create_busy_block,
              methods=["POST"]),
        Route("/v1/vendors/{vendorId}/busy-blocks", availability.list_busy_blocks,
              methods=["GET"]),
        Route("/v1/vendors/{vendorId}/busy-blocks/{blockId}", availability.delete_busy_block,
              methods=["DELETE"]),
        Route("/v1/vendors/{vendorId}/calendars/{calendarId}", availability.put_calendar,
              methods=["PUT"]),
        Route("/v1/bookings", lists.list_bookings, methods=["GET"]),  # issue 17
        # Hold transfer and waitlist handoff (issue 16).
        Route("/v1/reservations/{reservationId}/transfer-offers", waitlist.transfer_offer,
              methods=["POST"]),
        Route("/v1/reservations/{reservationId}/transfer", waitlist.transfer,
              methods=["POST"]),
        Route("/v1/waitlist", waitlist.create_entry, methods=["POST"]),
        Route("/v1/waitlist/{entryId}", waitlist.entry, methods=["GET", "DELETE"]),
        # Payments (issue 12): booking cancellation with refunds, inbound Stripe events.
        Route("/v1/bookings/{bookingId}/cancel", payments.cancel_booking, methods=["POST"]),
        Route("/v1/stripe/webhook", payments.stripe_webhook, methods=["POST"]),
        Mount("/v1/ops", routes=[
            Route("/reservations/{reservationId}/release", ops.release, methods=["POST"]),
            Route("/releases", ops.bulk_release, methods=["POST"]),
            Route("/audit", ops.audit_query, methods=["GET"]),
        ]),
        Mount("/v1/admin", routes=[
            Route("/partners", lists.by_method(  # GET: issue 17
                POST=admin.create_partner, GET=lists.list_partners), methods=["GET", "POST"]),
            Route("/vendors", lists.by_method(  # GET: issue 17
                POST=admin.create_vendor, GET=lists.list_vendors), methods=["GET", "POST"]),
            # Payments (issue 12): a vendor's payment terms.
            Route("/vendors/{vendorId}", admin.update_vendor, methods=["PATCH"]),
            Route("/resources", admin.create_resource, methods=["POST"]),
            Route("/keys", lists.by_method(  # GET: issue 17
                POST=admin.create_key, GET=lists.list_keys), methods=["GET", "POST"]),
            Route("/keys/{keyId}/revoke", admin.revoke_key, methods=["POST"]),
        ]),
        # Events out (issue 14): webhook endpoints, deliveries, the live stream.
        Route("/v1/webhook-endpoints", webhooks.endpoints, methods=["GET", "POST"]),
        Route("/v1/webhook-endpoints/{endpointId}", webhooks.endpoint,
              methods=["GET", "PATCH", "DELETE"]),
        Route("/v1/webhook-endpoints/{endpointId}/rotate-secret", webhooks.rotate_secret,
              methods=["POST"]),
        Route("/v1/webhook-endpoints/{endpointId}/test", webhooks.test_endpoint,
              methods=["POST"]),
        Route("/v1/webhook-endpoints/{endpointId}/deliveries", webhooks.list_deliveries,
              methods=["GET"]),
        Route("/v1/webhook-endpoints/{endpointId}/deliveries/{deliveryId}/retry",
              webhooks.retry_delivery, methods=["POST"]),
        Route("/v1/events/stream", webhooks.event_stream_route, methods=["GET"]),
    ]


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    install_request_id_logging()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        rt = await Runtime.open(settings, observe=_observe_lua, watch=True)
        try:
            # Booked markers back from Postgres before this process accepts any hold.
            await rt.rehydrate_if_needed()
            catalog = CatalogCache(rt.pool, rt.catalog)
            await catalog.load()
            limits, engine = rt.limits, rt.reservations

            async def rehydrate() -> None:
                await rt.rehydrate_if_needed()

            idempotency = IdempotencyStore(rt.access, rt.keys, settings)
            # Issue 13: the vendors' availability rules, shared with the create path.
            availability_service = AvailabilityService(rt.pool, rt.access, rt.keys, catalog,
                                                       settings)
            reservation_service = ReservationService(
                engine, catalog, limits, load_stored=_stored_loader(rt.pool),
                rehydrate=rehydrate, idempotency=idempotency,
                availability=availability_service,
                on_bulk_release=_bulk_release_event(rt.pool))
            # Resource groups (issue 16, pool): pooled holds resolve their group here.
            groups = GroupService(rt.pool, catalog, rt.keys, settings.pool_max_members,
                                  access=rt.access, throttle=reservation_service.throttle,
                                  max_range_ms=settings.max_query_range_ms)
            reservation_service.groups = groups
            # Payments (issue 12): the provider when a Stripe key is set.
            provider = provider_from_settings(settings)
            orchestrator = None if provider is None else PaymentOrchestrator(
                provider, rt.pool, engine, settings)
            app.state.services = Services(
                settings=settings, redis=rt.redis, pool=rt.pool, access=rt.access,
                catalog=catalog, keyspace=rt.keys,
                api_keys=KeyResolver(rt.pool, settings.api_key_cache_ms,
                                     settings.api_key_negative_cache_ms),
                reservations=reservation_service,
                idempotency=idempotency,
                admin=AdminService(rt.pool, catalog, issue_key),
                availability=availability_service,
                lists=ListService(rt.pool, reservation_service.throttle),
                webhooks=WebhookService(rt.pool, settings),
                extra={"groups": groups,
                       # Payments (issue 12).
                       "payments": PaymentService(reservation_service, rt.pool, orchestrator),
                       "bookings": BookingService(reservation_service, rt.pool, orchestrator),
                       "payment_provider": provider},
                # Hold transfer and waitlist handoff (issue 16).
                transfers=TransferService(
                    reservation_service, TransferEngine(rt.access, rt.keys, limits), rt.pool),
                waitlist=WaitlistService(
                    reservation_service, WaitlistEngine(rt.access, rt.keys, settings)))
            availability_service.reservations = reservation_service
            log.info("slotguard api ready (%d resources known)", len(rt.catalog))
            yield
        finally:
            services = app.state.services
            app.state.services = None
            provider = services.extra.get("payment_provider") if services else None
            if provider is not None:
                await provider.close()
            await rt.close()

    return Starlette(
        routes=routes(),
        middleware=[Middleware(EdgeMiddleware, max_body_bytes=settings.max_body_bytes,
                               max_header_count=settings.max_header_count,
                               max_header_bytes=settings.max_header_bytes,
                               body_read_timeout_ms=settings.body_read_timeout_ms,
                               calendar_body_bytes=settings.max_calendar_bytes)],
        exception_handlers=errors.exception_handlers(),
        lifespan=lifespan,
    )


def _bulk_release_event(pool):
    async def emit(*args) -> None:
        await emit_bulk_release(pool, *args)

    return emit


def _stored_loader(pool):
    async def load(reservation_id: str):
        async with pool.acquire() as conn:
            stored = await queries.load_reservation(conn, reservation_id)
        return None if stored is None else from_record(stored)

    return load


_LUA_SERIES: dict[str, object] = {}


def _observe_lua(script: str, seconds: float, batch_size: int) -> None:
    # labels() takes a lock and validates on every call; the hot path keeps the children.
    series = _LUA_SERIES.get(script)
    if series is None:
        series = _LUA_SERIES[script] = metrics.LUA_CALL_SECONDS.labels(script=script)
    series.observe(seconds)


def app_from_env() -> Starlette:
    """The factory ``uvicorn --factory api.app:app_from_env`` calls in each worker."""
    return create_app(Settings.from_env())
