"""Operations (roles ops/admin): manual and bulk release, audit queries."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response

from api.context import client_ip, principal, services
from api.validation import Field, check_fields, format_time, invalid, json_object
from api.views import JSONResponse, reservation_view
from engine import metrics, records

RELEASE_FIELDS = [Field("reason", str, required=True)]
BULK_FIELDS = [
    Field("reason", str, required=True),
    Field("reservationIds", list),
    Field("resourceId", str, max_length=64),
    Field("startTime", str, max_length=64),
    Field("endTime", str, max_length=64),
]
MAX_BULK_IDS = 200  # every valid body fits SLOTGUARD_MAX_BODY_BYTES (the OpenAPI says so)
BULK_ID_RE = re.compile(r"^[A-Za-z0-9_]+$")  # the OpenAPI pattern, with its semantics


async def release(request: Request) -> Response:
    caller = await principal(request)
    body = check_fields(json_object(await request.body(), request.headers.get("content-type")),
                        RELEASE_FIELDS)
    released = await services(request).reservations.release(
        caller, request.path_params["reservationId"], body["reason"], client_ip(request))
    metrics.HOLDS_RELEASED.inc()
    return JSONResponse(reservation_view(released))


async def bulk_release(request: Request) -> Response:
    """Either ``reservationIds`` or ``resourceId`` + ``startTime`` + ``endTime``."""
    caller = await principal(request)
    body = check_fields(json_object(await request.body(), request.headers.get("content-type")),
                        BULK_FIELDS)
    by_ids = "reservationIds" in body
    by_range = any(k in body for k in ("resourceId", "startTime", "endTime"))
    if by_ids == by_range:
        raise invalid("INVALID_SELECTION", "give either reservationIds or resourceId, "
                      "startTime and endTime", "reservationIds")
    svc = services(request).reservations
    if by_ids:
        ids = body["reservationIds"]
        if not 1 <= len(ids) <= MAX_BULK_IDS or not all(
                isinstance(i, str) and 0 < len(i) <= 40 and BULK_ID_RE.match(i) for i in ids):
            raise invalid("INVALID_FIELD", f"reservationIds must be 1..{MAX_BULK_IDS} ids",
                          "reservationIds")
        result = await svc.bulk_release(caller, body["reason"],
                                        reservation_ids=list(dict.fromkeys(ids)),
                                        client_ip=client_ip(request))
    else:
        for name in ("resourceId", "startTime", "endTime"):
            if name not in body:
                raise invalid("MISSING_FIELD", f"{name} is required", name)
        result = await svc.bulk_release(caller, body["reason"],
                                        resource_id=body["resourceId"],
                                        start=body["startTime"], end=body["endTime"],
                                        client_ip=client_ip(request))
    metrics.HOLDS_RELEASED.inc(len(result["released"]))
    return JSONResponse(result)


async def audit_query(request: Request) -> Response:
    caller = await principal(request)
    rows = await services(request).reservations.audit(
        caller, services(request).pool, request.query_params.multi_items(),
        client_ip(request))
    return JSONResponse({"entries": [_audit_view(r) for r in rows]})


def _audit_view(row: records.AuditEntry) -> dict:
    return {"id": row.id, "eventId": row.event_id, "tenantId": row.tenant_id,
            "reservationId": row.reservation_id, "resourceId": row.resource_id,
            "action": row.action, "actor": row.actor,
            "at": format_time(int(row.at.timestamp() * 1000)), "metadata": row.metadata}
