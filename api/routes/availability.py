"""Availability (issue 13): the computed slots of a vendor, and the inputs they come from.

- ``GET /v1/vendors/{vendorId}/availability``: every slot of the grid, with reasons,
  confidence, ``computedVersion`` (also the ``ETag``; ``If-None-Match`` answers 304) and,
  with ``explain=true``, every rule applied to each slot.
- ``PUT|GET /v1/vendors/{vendorId}/schedule``: working hours in an IANA zone.
- ``POST|GET /v1/vendors/{vendorId}/busy-blocks``, ``DELETE …/busy-blocks/{blockId}``.
- ``PUT /v1/vendors/{vendorId}/calendars/{calendarId}``: an ICS calendar (text/calendar)
  replaces that calendar's busy blocks.

Handlers parse, make one service call (engine/availability_service.py) and render.
"""

from __future__ import annotations

import functools

import msgspec
from msgspec import UNSET
from starlette.requests import Request
from starlette.responses import Response

from api import schemas
from api import schemas_availability as sa
from api.context import client_ip, principal, services
from api.validation import format_time, given, parse_body
from api.views import JSONResponse
from engine.availability import Block
from engine.occupancy import CONFIDENCE_THRESHOLD


def _service(request: Request):
    return services(request).availability


async def vendor_availability(request: Request) -> Response:
    caller = await principal(request)
    vendor_id = request.path_params["vendorId"]
    answer = await _service(request).read(caller, vendor_id,
                                          request.query_params.multi_items(),
                                          client_ip(request))
    etag = f'"{answer.computed_version}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return JSONResponse(availability_view(answer), headers=headers)


def _matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags


# Slot boundaries repeat across answers (the same grid is asked again and again): formatting
# them was most of a week's answer (1,344 calls), so they are remembered.
_grid_time = functools.lru_cache(maxsize=65_536)(format_time)


def availability_view(a) -> schemas.Availability:
    computed_at = format_time(a.computed_at_ms)
    slots = []
    for i, s in enumerate(a.slots):
        slots.append(schemas.AvailabilitySlot(
            start_time=_grid_time(s.start_ms), end_time=_grid_time(s.end_ms),
            is_available=s.is_available, status=s.status, reasons=s.reasons,
            computed_at=computed_at, computed_version=a.computed_version,
            confidence=s.confidence if a.include_confidence else UNSET,
            resource_ids=s.resource_ids if a.union else UNSET,
            explain=a.explain[i] if a.explain is not None else UNSET))
    return schemas.Availability(
        vendor_id=a.vendor_id, resource_id=a.resource_id,
        start_time=format_time(a.start_ms), end_time=format_time(a.end_ms),
        computed_at=computed_at, computed_version=a.computed_version, slots=slots,
        metadata=schemas.AvailabilityMetadata(
            confidence_threshold=CONFIDENCE_THRESHOLD,
            computation_time_ms=round(a.computation_ms, 3)),
        resource_ids=a.resource_ids if a.union else UNSET)


# ---- schedule ------------------------------------------------------------------------------
async def put_schedule(request: Request) -> Response:
    caller = await principal(request)
    body = parse_body(await request.body(), request.headers.get("content-type"),
                      sa.ScheduleBody)
    document = {k: v for k, v in msgspec.to_builtins(body).items()}
    saved = await _service(request).put_schedule(caller, request.path_params["vendorId"],
                                                 document)
    return JSONResponse(saved)


async def get_schedule(request: Request) -> Response:
    caller = await principal(request)
    return JSONResponse(await _service(request).get_schedule(
        caller, request.path_params["vendorId"]))


# ---- busy blocks ---------------------------------------------------------------------------
def block_view(vendor_id: str, b: Block) -> sa.BusyBlock:
    return sa.BusyBlock(block_id=b.block_id, vendor_id=vendor_id,
                        start=format_time(b.start_ms), end=format_time(b.end_ms),
                        status=b.status, source=b.source, resource_id=b.resource_id,
                        calendar_id=b.calendar_id)


async def create_busy_block(request: Request) -> Response:
    caller = await principal(request)
    vendor_id = request.path_params["vendorId"]
    body = parse_body(await request.body(), request.headers.get("content-type"),
                      sa.BusyBlockRequest)
    block = await _service(request).add_block(
        caller, vendor_id, start=body.start, end=body.end, status=given(body.status),
        source=given(body.source), resource_id=given(body.resource_id))
    return JSONResponse(block_view(vendor_id, block), status_code=201)


async def list_busy_blocks(request: Request) -> Response:
    caller = await principal(request)
    vendor_id = request.path_params["vendorId"]
    blocks = await _service(request).list_blocks(caller, vendor_id)
    return JSONResponse(sa.BusyBlockList(blocks=[block_view(vendor_id, b) for b in blocks]))


async def delete_busy_block(request: Request) -> Response:
    caller = await principal(request)
    block = await _service(request).delete_block(caller, request.path_params["vendorId"],
                                                 request.path_params["blockId"])
    return JSONResponse(sa.DeletedBusyBlock(block_id=block.block_id, deleted=True))


# ---- calendars -----------------------------------------------------------------------------
async def put_calendar(request: Request) -> Response:
    caller = await principal(request)
    result = await _service(request).import_calendar(
        caller, request.path_params["vendorId"], request.path_params["calendarId"],
        await request.body(), request.headers.get("content-type"))
    return JSONResponse(sa.CalendarImport(
        vendor_id=result["vendorId"], calendar_id=result["calendarId"],
        blocks=result["blocks"], busy=result["busy"], tentative=result["tentative"],
        removed=result["removed"], expanded_until=format_time(result["expandedUntil"])))
