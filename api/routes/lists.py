"""Lists with cursors (issue 17): each handler makes one call to engine/list_service.py
(which decides permissions, tenancy and every 4xx) and renders the page."""

from __future__ import annotations

from msgspec import UNSET
from starlette.requests import Request
from starlette.responses import Response

from api import schemas, schemas_lists
from api.context import client_ip, principal, services
from api.routes.admin import vendor_view
from api.validation import format_time
from api.views import JSONResponse


def by_method(**endpoints):
    """One endpoint for a path that lists (GET) and creates (POST), so the path's 405
    answers name every method it has (``Allow``). HEAD is answered as GET."""
    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await endpoints[method](request)

    endpoint.__name__ = "_or_".join(e.__name__ for e in endpoints.values())
    return endpoint


def _ms(moment) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def _time(moment) -> str | None:
    return format_time(_ms(moment))


async def list_reservations(request: Request) -> Response:
    caller = await principal(request)
    rows, cursor = await services(request).lists.reservations(
        caller, request.query_params.multi_items(), client_ip(request))
    return JSONResponse(schemas_lists.ReservationList(data=[schemas_lists.ReservationSummary(
        reservation_id=r.id, state=r.state, partner_id=r.partner_id, vendor_id=r.vendor_id,
        resource_id=r.resource_id, requester_id=r.requester_id,
        slot_start_time=_time(r.slot_start), slot_end_time=_time(r.slot_end),
        created_at=_time(r.created_at), updated_at=_time(r.updated_at),
        expires_at=_time(r.expires_at), version=r.version, booking_id=r.booking_id,
        failure_reason=r.failure_reason, items=_items(r)) for r in rows], next_cursor=cursor))


def _items(r):
    """Every item of a multi-resource reservation (as GET shows them); unset for one."""
    if not r.multi_resource:
        return UNSET
    return [schemas.ReservationItemOut(resource_id=i.resource_id,
                                       slot_start_time=format_time(i.slot_start_ms),
                                       slot_end_time=format_time(i.slot_end_ms))
            for i in r.items]


async def list_bookings(request: Request) -> Response:
    caller = await principal(request)
    rows, cursor = await services(request).lists.bookings(
        caller, request.query_params.multi_items(), client_ip(request))
    return JSONResponse(schemas_lists.BookingList(data=[schemas_lists.Booking(
        booking_id=b.id, reservation_id=b.reservation_id, partner_id=b.partner_id,
        vendor_id=b.vendor_id, resource_id=b.resource_id, requester_id=b.requester_id,
        slot_start_time=_time(b.slot_start), slot_end_time=_time(b.slot_end),
        created_at=_time(b.created_at), cancelled_at=_time(b.cancelled_at))
        for b in rows], next_cursor=cursor))


async def list_vendors(request: Request) -> Response:
    caller = await principal(request)
    rows, cursor = await services(request).lists.vendors(caller,
                                                         request.query_params.multi_items())
    return JSONResponse(schemas_lists.VendorList(data=[vendor_view(v) for v in rows],
                                                 next_cursor=cursor))


async def list_partners(request: Request) -> Response:
    caller = await principal(request)
    rows, cursor = await services(request).lists.partners(caller,
                                                          request.query_params.multi_items())
    return JSONResponse(schemas_lists.PartnerList(
        data=[schemas.Partner(partner_id=p.id, name=p.name, active=p.active) for p in rows],
        next_cursor=cursor))


async def list_keys(request: Request) -> Response:
    caller = await principal(request)
    rows, cursor = await services(request).lists.keys(caller,
                                                      request.query_params.multi_items())
    return JSONResponse(schemas_lists.ApiKeyList(data=[schemas_lists.ApiKeySummary(
        key_id=k.id, prefix=k.prefix, role=k.role, partner_id=k.partner_id,
        vendor_id=k.vendor_id, revoked=k.revoked_at is not None,
        created_at=_time(k.created_at), revoked_at=_time(k.revoked_at)) for k in rows],
        next_cursor=cursor))
