"""GET /v1/vendors/{vendorId}/availability: slots computed from the units in Redis."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.context import client_ip, principal, services
from api.views import JSONResponse, availability_view

async def vendor_availability(request: Request) -> Response:
    caller = await principal(request)
    vendor_id = request.path_params["vendorId"]
    result, include_confidence = await services(request).reservations.availability(
        caller, vendor_id, request.query_params.multi_items(), client_ip(request))
    return JSONResponse(availability_view(vendor_id, result, include_confidence))
