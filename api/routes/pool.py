"""Resource groups and their availability (issue 16, pool). Each handler parses, makes one
call to engine/pool.py's GroupService (which decides every rule) and renders."""

from __future__ import annotations

from msgspec import UNSET
from starlette.requests import Request
from starlette.responses import Response

from api import schemas_pool as shapes
from api.context import client_ip, principal, services
from api.validation import format_time, given, parse_body
from api.views import JSONResponse
from engine.pool import ResourceGroup


def _groups(request: Request):
    return services(request).extra["groups"]


def group_view(g: ResourceGroup) -> shapes.ResourceGroup:
    return shapes.ResourceGroup(
        vendor_id=g.vendor_id, group_id=g.group_id, resource_ids=list(g.resource_ids),
        strategy=g.strategy,
        preferred_order=list(g.preferred_order) if g.preferred_order else UNSET,
        anchor_resource_id=g.anchor_resource_id or UNSET,
        zones={n: list(m) for n, m in g.zones} if g.zones else UNSET)


async def create_group(request: Request) -> Response:
    caller = await principal(request)
    body = parse_body(await request.body(), request.headers.get("content-type"),
                      shapes.CreateResourceGroupRequest)
    group = await _groups(request).create(
        caller, request.path_params["vendorId"], body.group_id, body.resource_ids,
        body.strategy, given(body.preferred_order), given(body.anchor_resource_id),
        given(body.zones))
    return JSONResponse(group_view(group), status_code=201)


async def group(request: Request) -> Response:
    """GET, PATCH and DELETE of one group (one route, so 405 lists every method)."""
    handler = {"GET": get_group, "HEAD": get_group, "PATCH": update_group,
               "DELETE": delete_group}
    return await handler[request.method](request)


async def get_group(request: Request) -> Response:
    caller = await principal(request)
    group = await _groups(request).get(caller, request.path_params["vendorId"],
                                       request.path_params["groupId"])
    return JSONResponse(group_view(group))


async def update_group(request: Request) -> Response:
    caller = await principal(request)
    body = parse_body(await request.body(), request.headers.get("content-type"),
                      shapes.UpdateResourceGroupRequest)
    group = await _groups(request).update(
        caller, request.path_params["vendorId"], request.path_params["groupId"],
        resource_ids=given(body.resource_ids), strategy=given(body.strategy),
        preferred_order=given(body.preferred_order),
        anchor_resource_id=given(body.anchor_resource_id), zones=given(body.zones))
    return JSONResponse(group_view(group))


async def delete_group(request: Request) -> Response:
    caller = await principal(request)
    await _groups(request).delete(caller, request.path_params["vendorId"],
                                  request.path_params["groupId"])
    return Response(status_code=204)


async def group_availability(request: Request) -> Response:
    caller = await principal(request)
    vendor, group_id, members, slots = await _groups(request).availability(
        caller, request.path_params["vendorId"], request.path_params["groupId"],
        list(request.query_params.multi_items()), client_ip(request))
    return JSONResponse(shapes.GroupAvailability(
        vendor_id=vendor.id, group_id=group_id,
        slots=[shapes.GroupSlot(start_time=format_time(s), end_time=format_time(e),
                                free_members=free, members=members)
               for s, e, free in slots]))
