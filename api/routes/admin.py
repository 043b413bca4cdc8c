"""Management (role admin): partners, vendors, resources, API keys.

These routes are not rate-limited: only admin and system keys reach them, and a limiter
consulted after the write could hide a created key, while one consulted before it would
write limiter state for requests the directory then refuses.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.auth import issue_key
from api.context import principal, services
from api.validation import Field, check_fields, invalid, json_object
from api.views import JSONResponse
from engine import directory
from engine.permissions import require

PARTNER_FIELDS = [Field("partnerId", str, required=True, max_length=64), Field("name", str)]
VENDOR_FIELDS = [
    Field("vendorId", str, required=True, max_length=64),
    Field("unitMinutes", int),
    Field("bufferBeforeMinutes", int),
    Field("bufferAfterMinutes", int),
    Field("confirmationRequired", bool),
    Field("paymentRequired", bool),
    Field("timezone", str, max_length=64),
]
RESOURCE_FIELDS = [
    Field("resourceId", str, required=True, max_length=64),
    Field("vendorId", str, required=True, max_length=64),
    Field("unitMinutes", int),
    Field("bufferBeforeMinutes", int),
    Field("bufferAfterMinutes", int),
]
KEY_FIELDS = [
    Field("role", str, required=True, max_length=16),
    Field("partnerId", str, max_length=64),
    Field("vendorId", str, max_length=64),
]
MAX_MINUTES = 1440


async def _body(request: Request, fields: list[Field]) -> dict:
    body = check_fields(json_object(await request.body(), request.headers.get("content-type")),
                        fields)
    for name, value in body.items():
        if name.endswith("Minutes") and not 0 <= value <= MAX_MINUTES:
            raise invalid("INVALID_FIELD", f"{name} must be between 0 and {MAX_MINUTES}",
                          name)
    return body


async def create_partner(request: Request) -> Response:
    caller = await principal(request)
    require(caller, "admin.partners.create")
    body = await _body(request, PARTNER_FIELDS)
    async with services(request).pool.acquire() as conn:
        partner = await directory.create_partner(conn, body["partnerId"],
                                                 body.get("name") or body["partnerId"])
    return JSONResponse({"partnerId": partner.id, "name": partner.name,
                         "active": partner.active}, status_code=201)


async def create_vendor(request: Request) -> Response:
    caller = await principal(request)
    require(caller, "admin.vendors.create")
    body = await _body(request, VENDOR_FIELDS)
    svc = services(request)
    async with svc.pool.acquire() as conn:
        vendor = await directory.create_vendor(
            conn, body["vendorId"], unit_minutes=body.get("unitMinutes", 15),
            buffer_before_minutes=body.get("bufferBeforeMinutes", 0),
            buffer_after_minutes=body.get("bufferAfterMinutes", 0),
            confirmation_required=body.get("confirmationRequired", True),
            payment_required=body.get("paymentRequired", False),
            timezone=body.get("timezone", "UTC"))
    svc.catalog.forget_miss("vendor", vendor.id)
    svc.catalog.forget_miss("resource", vendor.default_resource_id)
    return JSONResponse(vendor_view(vendor), status_code=201)


async def create_resource(request: Request) -> Response:
    caller = await principal(request)
    require(caller, "admin.resources.create")
    body = await _body(request, RESOURCE_FIELDS)
    svc = services(request)
    async with svc.pool.acquire() as conn:
        stored = await directory.create_resource(
            conn, body["resourceId"], body["vendorId"], unit_minutes=body.get("unitMinutes"),
            buffer_before_minutes=body.get("bufferBeforeMinutes"),
            buffer_after_minutes=body.get("bufferAfterMinutes"))
    svc.catalog.forget_miss("resource", stored.id)
    return JSONResponse(resource_view(stored), status_code=201)


async def create_key(request: Request) -> Response:
    caller = await principal(request)
    require(caller, "admin.keys.create")
    body = await _body(request, KEY_FIELDS)
    async with services(request).pool.acquire() as conn:
        issued, stored = await issue_key(conn, body["role"], partner_id=body.get("partnerId"),
                                         vendor_id=body.get("vendorId"))
    return JSONResponse({**key_view(stored), "key": issued.key}, status_code=201)


async def revoke_key(request: Request) -> Response:
    caller = await principal(request)
    require(caller, "admin.keys.revoke")
    async with services(request).pool.acquire() as conn:
        stored = await directory.revoke_api_key(conn, request.path_params["keyId"])
    return JSONResponse(key_view(stored))


def vendor_view(v: directory.Vendor) -> dict:
    return {"vendorId": v.id, "unitMinutes": v.unit_minutes,
            "bufferBeforeMinutes": v.buffer_before_minutes,
            "bufferAfterMinutes": v.buffer_after_minutes,
            "confirmationRequired": v.confirmation_required,
            "paymentRequired": v.payment_required, "timezone": v.timezone,
            "defaultResourceId": v.default_resource_id}


def resource_view(r: directory.StoredResource) -> dict:
    return {"resourceId": r.id, "vendorId": r.vendor_id, "unitMinutes": r.unit_minutes,
            "bufferBeforeMinutes": r.buffer_before_minutes,
            "bufferAfterMinutes": r.buffer_after_minutes}


def key_view(k: directory.ApiKey) -> dict:
    return {"keyId": k.id, "prefix": k.prefix, "role": k.role, "partnerId": k.partner_id,
            "vendorId": k.vendor_id, "revoked": k.revoked}
