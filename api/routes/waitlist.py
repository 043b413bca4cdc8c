"""Hold transfer and waitlist routes (issue 16). Each handler parses the request, makes one
service call (engine/transfer_service.py, engine/waitlist_service.py decide every rule) and
renders."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.context import client_ip, principal, request_id, services
from api.schemas_waitlist import (
    TransferOffer,
    TransferOfferRequest,
    TransferRequest,
    WaitlistEntry,
    WaitlistRequest,
)
from api.validation import format_time, given, parse_body, parse_if_match
from api.views import JSONResponse, reservation_view
from engine import waitlist
from engine.waitlist_service import WaitlistRequest as EntryRequest


def entry_view(e: waitlist.WaitlistEntry) -> WaitlistEntry:
    return WaitlistEntry(
        waitlist_entry_id=e.entry_id, state=e.state, expires_at=format_time(e.expires_at_ms),
        vendor_id=e.vendor_id, resource_id=e.resource_id,
        resource_group_id=e.resource_group_id,
        slot_start_time=format_time(e.slot_start_ms), slot_end_time=format_time(e.slot_end_ms),
        requester_id=e.requester_id, created_at=format_time(e.created_at_ms),
        reservation_id=e.reservation_id)


# ---- hold transfer --------------------------------------------------------------------------
async def transfer_offer(request: Request) -> Response:
    caller = await principal(request)
    body = parse_body(await request.body(), request.headers.get("content-type"),
                      TransferOfferRequest, optional=True)
    offer = await services(request).transfers.offer(
        caller, request.path_params["reservationId"], to_partner_id=given(body.to_partner_id),
        ttl_ms=given(body.ttl_ms),
        expected_version=parse_if_match(request.headers.get("if-match")),
        client_ip=client_ip(request))
    return JSONResponse(TransferOffer(
        reservation_id=offer.reservation_id, acceptance_token=offer.acceptance_token,
        to_partner_id=offer.to_partner_id, expires_at=format_time(offer.expires_at_ms),
        state=offer.state, version=offer.version), status_code=201)


async def transfer(request: Request) -> Response:
    caller = await principal(request)
    body = parse_body(await request.body(), request.headers.get("content-type"),
                      TransferRequest)
    moved = await services(request).transfers.accept(
        caller, request.path_params["reservationId"], body.acceptance_token,
        expected_version=parse_if_match(request.headers.get("if-match")),
        client_ip=client_ip(request), request_id=request_id(request))
    return JSONResponse(reservation_view(moved))


# ---- waitlist ------------------------------------------------------------------------------
async def create_entry(request: Request) -> Response:
    caller = await principal(request)
    body = parse_body(await request.body(), request.headers.get("content-type"),
                      WaitlistRequest)
    added = await services(request).waitlist.create(caller, EntryRequest(
        vendor_id=body.vendor_id, resource_id=given(body.resource_id),
        resource_group_id=given(body.resource_group_id), slot_start=body.slot_start_time,
        slot_end=body.slot_end_time, requester_id=body.requester_id, ttl_ms=body.ttl_ms,
        request_id=request_id(request)), client_ip=client_ip(request))
    return JSONResponse(entry_view(added.entry), status_code=201)


async def entry(request: Request) -> Response:
    """``GET`` reads, ``DELETE`` withdraws (one route, so a 405 lists both methods)."""
    if request.method == "DELETE":
        return await withdraw_entry(request)
    return await get_entry(request)


async def get_entry(request: Request) -> Response:
    caller = await principal(request)
    entry = await services(request).waitlist.read(caller, request.path_params["entryId"],
                                                   client_ip(request))
    return JSONResponse(entry_view(entry))


async def withdraw_entry(request: Request) -> Response:
    caller = await principal(request)
    entry = await services(request).waitlist.withdraw(caller, request.path_params["entryId"],
                                                       client_ip(request))
    return JSONResponse(entry_view(entry))
