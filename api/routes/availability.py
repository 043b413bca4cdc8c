"""GET /v1/vendors/{vendorId}/availability: slots computed from the units in Redis."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.context import principal, services, throttle
from api.validation import parse_bool, parse_int, parse_time, query_params
from api.views import JSONResponse, availability_view
from engine import occupancy
from engine.errors import ValidationError
from engine.permissions import require, require_vendor_scope

QUERY = {"startTime", "endTime", "slotDuration", "includeConfidence", "resourceId"}
MAX_SLOT_MINUTES = 7 * 24 * 60


async def vendor_availability(request: Request) -> Response:
    svc = services(request)
    caller = await principal(request)
    require(caller, "availability.read")
    vendor_id = request.path_params["vendorId"]
    require_vendor_scope(caller, vendor_id)
    query = query_params(request.query_params, QUERY)
    # What first (404), then the finer rules of the query (400).
    vendor = await svc.catalog.vendor(vendor_id)
    resource = await svc.catalog.resource(query.get("resourceId") or vendor.default_resource_id)
    for name in ("startTime", "endTime"):
        if name not in query:
            raise ValidationError(f"{name} is required", code="MISSING_PARAMETER",
                                  details={"field": name})
    start_ms = parse_time(query["startTime"], "startTime")
    end_ms = parse_time(query["endTime"], "endTime")
    slot_minutes = parse_int(query.get("slotDuration", "60"), "slotDuration", 1,
                             MAX_SLOT_MINUTES)
    include_confidence = parse_bool(query.get("includeConfidence", "false"),
                                    "includeConfidence")
    if resource.vendor_id and resource.vendor_id != vendor.id:
        raise ValidationError("the resource does not belong to the vendor",
                              code="RESOURCE_VENDOR_MISMATCH", details={"field": "resourceId"})
    slot_ms = occupancy.check_query(resource, start_ms, end_ms, slot_minutes,
                                    svc.settings.max_query_range_ms)
    await throttle(request, caller)
    result = await occupancy.availability(svc.access, svc.keyspace, resource, start_ms,
                                          end_ms, slot_ms)
    return JSONResponse(availability_view(vendor_id, result, include_confidence))
