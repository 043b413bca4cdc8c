"""Management (role admin): partners, vendors, resources, API keys.

These routes are not rate-limited: only admin and system keys reach them, and a limiter
consulted after the write could hide a created key, while one consulted before it would
write limiter state for requests the directory then refuses.
"""

from __future__ import annotations

from msgspec import UNSET
from starlette.requests import Request
from starlette.responses import Response

from api.context import principal, services
from api import schemas
from api.validation import given, parse_body
from api.views import JSONResponse
from engine import directory

async def _body(request: Request, shape):
    return parse_body(await request.body(), request.headers.get("content-type"), shape)


async def create_partner(request: Request) -> Response:
    caller = await principal(request)
    body = await _body(request, schemas.CreatePartnerRequest)
    partner = await services(request).admin.create_partner(caller, body.partner_id,
                                                           given(body.name))
    return JSONResponse(schemas.Partner(partner_id=partner.id, name=partner.name,
                                        active=partner.active), status_code=201)


async def create_vendor(request: Request) -> Response:
    caller = await principal(request)
    body = await _body(request, schemas.CreateVendorRequest)
    vendor = await services(request).admin.create_vendor(
        caller, body.vendor_id, unit_minutes=given(body.unit_minutes),
        buffer_before_minutes=given(body.buffer_before_minutes),
        buffer_after_minutes=given(body.buffer_after_minutes),
        confirmation_required=given(body.confirmation_required),
        payment_required=given(body.payment_required), timezone=given(body.timezone),
        terms={name: getattr(body, name) for name in TERM_FIELDS
               if getattr(body, name) is not UNSET})
    return JSONResponse(vendor_view(vendor), status_code=201)


TERM_FIELDS = ("price_amount", "deposit_amount", "currency", "stripe_account_id",
               "refund_policy", "refund_cutoff_minutes")


async def update_vendor(request: Request) -> Response:
    """PATCH /v1/admin/vendors/{vendorId}: payment terms (issue 12)."""
    caller = await principal(request)
    body = await _body(request, schemas.UpdateVendorRequest)
    changes = {name: getattr(body, name) for name in ("payment_required", *TERM_FIELDS)
               if getattr(body, name) is not UNSET}
    vendor = await services(request).admin.update_vendor(
        caller, request.path_params["vendorId"], changes)
    return JSONResponse(vendor_view(vendor))


async def create_resource(request: Request) -> Response:
    caller = await principal(request)
    body = await _body(request, schemas.CreateResourceRequest)
    stored = await services(request).admin.create_resource(
        caller, body.resource_id, body.vendor_id, unit_minutes=given(body.unit_minutes),
        buffer_before_minutes=given(body.buffer_before_minutes),
        buffer_after_minutes=given(body.buffer_after_minutes))
    return JSONResponse(resource_view(stored), status_code=201)


async def create_key(request: Request) -> Response:
    caller = await principal(request)
    body = await _body(request, schemas.CreateKeyRequest)
    issued, stored = await services(request).admin.create_key(
        caller, body.role, given(body.partner_id), given(body.vendor_id))
    return JSONResponse(key_view(stored, issued.key), status_code=201)


async def revoke_key(request: Request) -> Response:
    caller = await principal(request)
    stored = await services(request).admin.revoke_key(caller, request.path_params["keyId"])
    return JSONResponse(key_view(stored))


def vendor_view(v: directory.Vendor) -> schemas.Vendor:
    return schemas.Vendor(vendor_id=v.id, unit_minutes=v.unit_minutes,
                          buffer_before_minutes=v.buffer_before_minutes,
                          buffer_after_minutes=v.buffer_after_minutes,
                          confirmation_required=v.confirmation_required,
                          payment_required=v.payment_required, timezone=v.timezone,
                          default_resource_id=v.default_resource_id,
                          price_amount=v.price_amount, deposit_amount=v.deposit_amount,
                          currency=v.currency, stripe_account_id=v.stripe_account_id,
                          refund_policy=v.refund_policy,
                          refund_cutoff_minutes=v.refund_cutoff_minutes)


def resource_view(r: directory.StoredResource) -> schemas.Resource:
    return schemas.Resource(resource_id=r.id, vendor_id=r.vendor_id,
                            unit_minutes=r.unit_minutes,
                            buffer_before_minutes=r.buffer_before_minutes,
                            buffer_after_minutes=r.buffer_after_minutes)


def key_view(k: directory.ApiKey, plaintext: str | None = None) -> schemas.ApiKey:
    """A key's record; ``plaintext`` only in the answer that issues it."""
    return schemas.ApiKey(key_id=k.id, prefix=k.prefix, role=k.role, partner_id=k.partner_id,
                          vendor_id=k.vendor_id, revoked=k.revoked,
                          key=UNSET if plaintext is None else plaintext)
