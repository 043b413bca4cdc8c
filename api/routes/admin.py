"""Management (role admin): partners, vendors, resources, API keys.

These routes are not rate-limited: only admin and system keys reach them, and a limiter
consulted after the write could hide a created key, while one consulted before it would
write limiter state for requests the directory then refuses.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.context import principal, services
from api.validation import Field, check_fields, json_object
from api.views import JSONResponse
from engine import directory

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


async def _body(request: Request, fields: list[Field]) -> dict:
    return check_fields(json_object(await request.body(), request.headers.get("content-type")),
                        fields)


async def create_partner(request: Request) -> Response:
    caller = await principal(request)
    body = await _body(request, PARTNER_FIELDS)
    partner = await services(request).admin.create_partner(caller, body["partnerId"],
                                                           body.get("name"))
    return JSONResponse({"partnerId": partner.id, "name": partner.name,
                         "active": partner.active}, status_code=201)


async def create_vendor(request: Request) -> Response:
    caller = await principal(request)
    body = await _body(request, VENDOR_FIELDS)
    vendor = await services(request).admin.create_vendor(
        caller, body["vendorId"], unit_minutes=body.get("unitMinutes"),
        buffer_before_minutes=body.get("bufferBeforeMinutes"),
        buffer_after_minutes=body.get("bufferAfterMinutes"),
        confirmation_required=body.get("confirmationRequired"),
        payment_required=body.get("paymentRequired"), timezone=body.get("timezone"))
    return JSONResponse(vendor_view(vendor), status_code=201)


async def create_resource(request: Request) -> Response:
    caller = await principal(request)
    body = await _body(request, RESOURCE_FIELDS)
    stored = await services(request).admin.create_resource(
        caller, body["resourceId"], body["vendorId"], unit_minutes=body.get("unitMinutes"),
        buffer_before_minutes=body.get("bufferBeforeMinutes"),
        buffer_after_minutes=body.get("bufferAfterMinutes"))
    return JSONResponse(resource_view(stored), status_code=201)


async def create_key(request: Request) -> Response:
    caller = await principal(request)
    body = await _body(request, KEY_FIELDS)
    issued, stored = await services(request).admin.create_key(
        caller, body["role"], body.get("partnerId"), body.get("vendorId"))
    return JSONResponse({**key_view(stored), "key": issued.key}, status_code=201)


async def revoke_key(request: Request) -> Response:
    caller = await principal(request)
    stored = await services(request).admin.revoke_key(caller, request.path_params["keyId"])
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
