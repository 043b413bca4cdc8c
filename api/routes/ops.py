"""Operations (roles ops/admin): manual and bulk release, audit queries."""

from __future__ import annotations

import re

from msgspec import UNSET
from starlette.requests import Request
from starlette.responses import Response

from api.context import client_ip, principal, services
from api.etag import with_etag
from api.schemas import AuditEntry, AuditPage, BulkReleaseRequest, ReleaseRequest
from api.validation import format_time, given, invalid, parse_body
from api.views import JSONResponse, reservation_view
from engine import metrics
from engine.store import queries

MAX_BULK_IDS = 200  # every valid body fits SLOTGUARD_MAX_BODY_BYTES (the OpenAPI says so)
BULK_ID_RE = re.compile(r"^[A-Za-z0-9_]+$")  # the OpenAPI pattern, with its semantics


async def release(request: Request) -> Response:
    caller = await principal(request)
    body = parse_body(await request.body(), request.headers.get("content-type"),
                      ReleaseRequest)
    released = await services(request).reservations.release(
        caller, request.path_params["reservationId"], body.reason, client_ip(request))
    metrics.HOLDS_RELEASED.inc()
    return with_etag(JSONResponse(reservation_view(released)), released.version)


async def bulk_release(request: Request) -> Response:
    """Either ``reservationIds`` or ``resourceId`` + ``startTime`` + ``endTime``."""
    caller = await principal(request)
    body = parse_body(await request.body(), request.headers.get("content-type"),
                      BulkReleaseRequest)
    ranged = {"resourceId": given(body.resource_id), "startTime": given(body.start_time),
              "endTime": given(body.end_time)}
    by_ids = body.reservation_ids is not UNSET
    by_range = any(v is not None for v in ranged.values())
    if by_ids == by_range:
        raise invalid("INVALID_SELECTION", "give either reservationIds or resourceId, "
                      "startTime and endTime", "reservationIds")
    svc = services(request).reservations
    if by_ids:
        ids = body.reservation_ids
        if not 1 <= len(ids) <= MAX_BULK_IDS or not all(
                isinstance(i, str) and 0 < len(i) <= 40 and BULK_ID_RE.match(i) for i in ids):
            raise invalid("INVALID_FIELD", f"reservationIds must be 1..{MAX_BULK_IDS} ids",
                          "reservationIds")
        result = await svc.bulk_release(caller, body.reason,
                                        reservation_ids=list(dict.fromkeys(ids)),
                                        client_ip=client_ip(request))
    else:
        for name, value in ranged.items():
            if value is None:
                raise invalid("MISSING_FIELD", f"{name} is required", name)
        result = await svc.bulk_release(caller, body.reason,
                                        resource_id=ranged["resourceId"],
                                        start=ranged["startTime"], end=ranged["endTime"],
                                        client_ip=client_ip(request))
    metrics.HOLDS_RELEASED.inc(len(result["released"]))
    return JSONResponse(result)


async def audit_query(request: Request) -> Response:
    caller = await principal(request)
    rows, cursor = await services(request).reservations.audit_page(
        caller, services(request).pool, request.query_params.multi_items(),
        client_ip(request))
    entries = [_audit_view(r) for r in rows]
    return JSONResponse(AuditPage(entries=entries, data=entries, next_cursor=cursor))


def _audit_view(row: queries.AuditEntry) -> AuditEntry:
    return AuditEntry(id=row.id, event_id=row.event_id, tenant_id=row.tenant_id,
                      reservation_id=row.reservation_id, resource_id=row.resource_id,
                      action=row.action, actor=row.actor,
                      at=format_time(int(row.at.timestamp() * 1000)), metadata=row.metadata)
