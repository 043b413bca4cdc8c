"""The OpenAPI 3.1 document: components generated from the Structs of api/schemas.py
(``msgspec.json.schema_components``), paths written here as a table that references them.

Every route of api/app.py appears here with its body, parameters, responses and errors;
tests/test_api_schema.py holds the running app to this document with schemathesis, and
checks that every route is documented. Business rules JSON Schema cannot state (a slot on
the vendor's unit grid, end after start, a vendor that exists) are answered with the
documented 4xx codes.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec

from api import schemas, schemas_payments, schemas_waitlist, schemas_webhooks
from api.schemas import INT64, NAME_DOC, NO_NUL, TEXT_DOC, TIME_DOC
from engine.permissions import ROLES

NAME = {"type": "string", **NAME_DOC}
TEXT = {"type": "string", **TEXT_DOC}
TIME = {"type": "string", **TIME_DOC}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _json_values() -> dict[str, Any]:
    """JSON values a body may carry: no NUL in strings or keys, numbers within the signed
    64-bit range. The nesting limit (MAX_JSON_DEPTH) is stated in words: a schema that
    counted levels would grow exponentially once its references are inlined."""
    no_nul = {"pattern": NO_NUL}
    return {"JsonValue": {"anyOf": [
        {"type": "string", **no_nul},
        {"type": "number", "minimum": INT64[0], "maximum": INT64[1]},
        {"type": "boolean"}, {"type": "null"},
        {"type": "array", "items": ref("JsonValue")},
        {"type": "object", "propertyNames": no_nul, "additionalProperties": ref("JsonValue")},
    ]}}


# The two bodies whose valid forms JSON Schema states as alternatives (one Struct decodes
# each; the route and the directory decide which form was meant).
ALTERNATIVES: dict[str, Any] = {
    "BulkReleaseRequest": {"oneOf": [
        obj({"reason": TEXT,
             # Bounded so that every valid body fits SLOTGUARD_MAX_BODY_BYTES.
             "reservationIds": {"type": "array", "minItems": 1, "maxItems": 200,
                                "items": {"type": "string", "minLength": 1,
                                          "maxLength": 40, "pattern": "^[A-Za-z0-9_]+$"}}},
            ["reason", "reservationIds"]),
        obj({"reason": TEXT, "resourceId": NAME, "startTime": TIME, "endTime": TIME},
            ["reason", "resourceId", "startTime", "endTime"]),
    ]},
    "CreateKeyRequest": {"oneOf": [
        obj({"role": {"const": "partner"}, "partnerId": NAME}, ["role", "partnerId"]),
        obj({"role": {"const": "vendor"}, "vendorId": NAME}, ["role", "vendorId"]),
        obj({"role": {"type": "string", "enum": [r for r in ROLES
                                                 if r not in ("partner", "vendor")]}},
            ["role"]),
    ]},
}


def _settle(node: Any) -> Any:
    """Closed objects (``forbid_unknown_fields`` and the responses alike), and each
    field's documented rules (``x-doc``) in place of the shape it is decoded with."""
    if isinstance(node, dict):
        if "x-doc" in node:
            node.update(node.pop("x-doc"))
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        node.pop("title", None)
        for value in node.values():
            _settle(value)
    elif isinstance(node, list):
        for value in node:
            _settle(value)
    return node


def components() -> dict[str, Any]:
    from api import schemas_lists  # lists with cursors (issue 17)
    from api import schemas_pool  # resource groups (issue 16, pool)

    _, generated = msgspec.json.schema_components(
        schemas.REQUESTS + schemas.RESPONSES + schemas_lists.RESPONSES
        + schemas_webhooks.STRUCTS
        + schemas_pool.REQUESTS + schemas_pool.RESPONSES
        + schemas_waitlist.STRUCTS
        + schemas_payments.REQUESTS + schemas_payments.RESPONSES,
        ref_template="#/components/schemas/{name}")
    settled = _settle(generated)
    settled["CreateReservationRequest"] = _create_forms(settled["CreateReservationRequest"])
    # Payments (issue 12): a payment method (paying vendor) or an outcome (free vendor),
    # never both (400 INVALID_OUTCOME).
    settled["AuthorizationRequest"]["not"] = {"required": ["paymentMethodId", "outcome"]}
    return {**settled, **ALTERNATIVES, **_json_values()}


def _create_forms(schema: dict[str, Any]) -> dict[str, Any]:
    """A create is one of three forms (issue 16): a slot of a resource, a pooled slot of a
    resource group, or items. One Struct decodes them all; the document states the forms."""
    props = schema["properties"]
    common = ["vendorId", "requesterId", "metadata", "idempotencyKey"]
    slot = ["slotStartTime", "slotEndTime"]

    def form(names: list[str], required: list[str]) -> dict[str, Any]:
        return obj({n: props[n] for n in names}, ["vendorId", "requesterId", *required])

    return {"description": schema.get("description", ""), "oneOf": [
        form(common + slot + ["resourceId"], slot),
        form(common + slot + ["resourceGroupId", "nearResourceId", "nearZone"],
             [*slot, "resourceGroupId"]),
        form(common + ["items"], ["items"]),
    ]}


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                               "schema": {"type": "string", "pattern": "^[0-9]+$"},
                               "required": True}}
ERROR_TEXT = {
    400: "Invalid input (malformed JSON, unknown or missing field, wrong type, bad or naive "
         "timestamp, end not after start, slot off the unit grid, range too large)",
    401: "Missing, invalid or revoked API key",
    402: "The card was declined (PAYMENT_DECLINED); the reservation failed its authorization",
    403: "The key's role may not perform this operation",
    404: "Not found (another tenant's reservations are not found either)",
    409: "Business rule (slot taken, action not allowed in this state, terminal, "
         "idempotency key in progress, already exists)",
    412: "If-Match names a stale version",
    413: "Body larger than the limit",
    415: "Body is not application/json",
    422: "Idempotency key reused with a different request",
    429: "Rate limit or hold cap reached",
    500: "Internal error (retryable)",
    503: "A backing service is unavailable (retryable)",
}


def error(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": ERROR_TEXT[status],
        "content": {"application/json": {"schema": ref("Error")}},
    }
    if status in (429, 503):
        response["headers"] = RETRY_AFTER
    return response


def ok(status: int, schema: str, description: str = "OK",
       headers: dict | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": ref(schema)}}}
    if headers:
        response["headers"] = headers
    return response


def body(schema: str, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": ref(schema)}}}


def param(name: str, where: str, schema: dict, required: bool = False,
          description: str = "") -> dict[str, Any]:
    p = {"name": name, "in": where, "required": required or where == "path", "schema": schema}
    if description:
        p["description"] = description
    return p


def operation(op_id: str, summary: str, responses: dict, *, errors: list[int],
              request: dict | None = None, parameters: list | None = None,
              secured: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op_id, "summary": summary}
    if parameters:
        out["parameters"] = parameters
    if request:
        out["requestBody"] = request
    all_errors = sorted(set(errors) | {500} | ({401, 429, 503} if secured else set()))
    if request:
        all_errors = sorted(set(all_errors) | {400, 413, 415})
    out["responses"] = {str(s): r for s, r in responses.items()}
    out["responses"].update({str(s): error(s) for s in all_errors})
    if not secured:
        out["security"] = []
    return out


RESERVATION_ID = param("reservationId", "path", {"type": "string", "minLength": 1,
                                                  "maxLength": 64})
IF_MATCH = param("If-Match", "header", {"type": "string", "pattern": "^\"?[0-9]{1,9}\"?$"},
                 description="the reservation version this action expects (compare-and-set)")
IDEMPOTENCY_KEY = param("Idempotency-Key", "header",
                        {"type": "string", "minLength": 1, "maxLength": 255,
                         "pattern": "^[\\x20-\\x7e]+$"})
REPLAYED = {"Idempotent-Replayed": {"description": "true when this is a stored response "
                                    "replayed for a repeated Idempotency-Key",
                                    "schema": {"type": "string", "enum": ["true"]}}}

ACTION_DOCS = {
    "vendor-confirmation": ("ActionRequest", "The vendor confirms (role vendor)"),
    "vendor-authorization": ("AuthorizationRequest",
                             "The vendor's deposit authorized (role vendor): paymentMethodId "
                             "creates a manual-capture PaymentIntent for a paying vendor (202 "
                             "with nextAction while 3-D Secure waits; 402 PAYMENT_DECLINED); "
                             "outcome for a free one"),
    "requester-authorization": ("AuthorizationRequest",
                                "The requester's price authorized (role partner): as "
                                "vendor-authorization"),
    "commit": ("ActionRequest", "Commit: answered 202 with COMMIT_IN_PROGRESS (role partner)"),
    "cancel": ("ActionRequest", "Cancel (roles partner, vendor)"),
    "extend": ("ExtendRequest", "Extend the hold's deadline (role partner)"),
}


def _action(action: str) -> dict[str, Any]:
    schema, summary = ACTION_DOCS[action]
    status = 202 if action == "commit" else 200
    responses = {status: ok(status, "Reservation", "The reservation after the action")}
    errors = [400, 403, 404, 409, 412]
    if action.endswith("-authorization"):  # payments (issue 12)
        responses[202] = ok(202, "Reservation", "Waiting for 3-D Secure: nextAction")
        errors.append(402)
    return {"post": operation(
        "reservation_" + action.replace("-", "_"), summary, responses,
        errors=errors, request=body(schema, required=False),
        parameters=[RESERVATION_ID, IF_MATCH])}


def _paths() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/health/live": {"get": operation("health_live", "Liveness", {200: ok(200, "Live")},
                                          errors=[], secured=False)},
        "/health/ready": {"get": operation(
            "health_ready", "Readiness: Redis, Postgres and scripts",
            {200: ok(200, "Ready")}, errors=[503], secured=False)},
        "/metrics": {"get": operation(
            "metrics", "Prometheus exposition",
            {200: {"description": "text exposition format",
                   "content": {"text/plain": {"schema": {"type": "string"}}}}},
            errors=[], secured=False)},
        "/openapi.json": {"get": operation(
            "openapi", "This document",
            {200: {"description": "OpenAPI 3.1",
                   "content": {"application/json": {"schema": {"type": "object"}}}}},
            errors=[], secured=False)},
        "/v1/reservations": {"post": operation(
            "create_reservation", "Hold a slot (role partner)",
            {201: ok(201, "CreateReservationResponse", "Created", REPLAYED)},
            errors=[400, 403, 404, 409, 422], request=body("CreateReservationRequest"),
            parameters=[IDEMPOTENCY_KEY])},
        "/v1/reservations/{reservationId}": {"get": operation(
            "get_reservation", "A reservation with its state history",
            {200: ok(200, "Reservation")}, errors=[403, 404], parameters=[RESERVATION_ID])},
        "/v1/ops/reservations/{reservationId}/release": {"post": operation(
            "ops_release", "Manual release (roles ops, admin)",
            {200: ok(200, "Reservation")}, errors=[403, 404, 409],
            request=body("ReleaseRequest"), parameters=[RESERVATION_ID])},
        "/v1/ops/releases": {"post": operation(
            "ops_bulk_release", "Bulk release by ids or resource and range (roles ops, admin)",
            {200: ok(200, "BulkReleaseResult")}, errors=[403, 404],
            request=body("BulkReleaseRequest"))},
        "/v1/ops/audit": {"get": operation(
            "ops_audit", "Audit log entries, oldest first (roles ops, admin)",
            {200: ok(200, "AuditPage")}, errors=[400, 403],
            parameters=[
                param("reservationId", "query", {"type": "string", "minLength": 1,
                                                 "maxLength": 128, "pattern": NO_NUL}),
                param("resourceId", "query", {"type": "string", "minLength": 1,
                                              "maxLength": 128, "pattern": NO_NUL}),
                param("actor", "query", {"type": "string", "minLength": 1, "maxLength": 128,
                                         "pattern": NO_NUL}),
                param("since", "query", TIME),
                param("until", "query", TIME),
                param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000,
                                         "default": 100}),
            ])},
        "/v1/admin/partners": {"post": operation(
            "admin_create_partner", "Create a partner (role admin)",
            {201: ok(201, "Partner", "Created")}, errors=[403, 409],
            request=body("CreatePartnerRequest"))},
        "/v1/admin/vendors": {"post": operation(
            "admin_create_vendor", "Create a vendor and its default resource (role admin)",
            {201: ok(201, "Vendor", "Created")}, errors=[403, 409],
            request=body("CreateVendorRequest"))},
        "/v1/admin/vendors/{vendorId}": {"patch": operation(
            "admin_update_vendor", "Change a vendor's payment terms (role admin; issue 12)",
            {200: ok(200, "Vendor")}, errors=[403, 404],
            request=body("UpdateVendorRequest"), parameters=[param("vendorId", "path", NAME)])},
        "/v1/admin/resources": {"post": operation(
            "admin_create_resource", "Create a resource of a vendor (role admin)",
            {201: ok(201, "Resource", "Created")}, errors=[403, 404, 409],
            request=body("CreateResourceRequest"))},
        "/v1/admin/keys": {"post": operation(
            "admin_create_key", "Issue an API key; the plaintext is returned once (role admin)",
            {201: ok(201, "ApiKey", "Created")}, errors=[403, 404, 409],
            request=body("CreateKeyRequest"))},
        "/v1/admin/keys/{keyId}/revoke": {"post": operation(
            "admin_revoke_key", "Revoke an API key (role admin)", {200: ok(200, "ApiKey")},
            errors=[403, 404], parameters=[param("keyId", "path", NAME)])},
    }
    for action in ACTION_DOCS:
        paths[f"/v1/reservations/{{reservationId}}/{action}"] = _action(action)
    paths["/v1/reservations/{reservationId}/modify"] = _modify()
    paths.update(_pool_paths())
    paths.update(_availability_paths())
    paths.update(_events_out())
    paths.update(_payments())  # issue 12
    from api import openapi_tools  # issue 17: lists with cursors, ETags

    openapi_tools.add_paths(paths)
    openapi_tools.add_etags(paths)
    # Transfer and waitlist (issue 16) beside the other partner routes, before ops and admin.
    ordered: dict[str, Any] = {}
    for path, item in paths.items():
        if path.startswith("/v1/ops/") and "/v1/waitlist" not in ordered:
            ordered.update(_transfer_and_waitlist())
        ordered[path] = item
    return ordered


# ---- resource groups (issue 16, pool): self-contained like _modify -----------------------
def _pool_paths() -> dict[str, Any]:
    vendor, group = param("vendorId", "path", NAME), param("groupId", "path", NAME)
    item = "/v1/vendors/{vendorId}/resource-groups/{groupId}"
    return {
        "/v1/vendors/{vendorId}/resource-groups": {"post": operation(
            "create_resource_group", "Create a resource group (room type) of the vendor's "
            "resources with an assignment strategy (roles vendor, admin)",
            {201: ok(201, "ResourceGroup", "Created")}, errors=[403, 404, 409],
            request=body("CreateResourceGroupRequest"), parameters=[vendor])},
        item: {
            "get": operation("get_resource_group", "A resource group",
                             {200: ok(200, "ResourceGroup")}, errors=[403, 404],
                             parameters=[vendor, group]),
            "patch": operation("update_resource_group",
                               "Change a group's members or strategy (roles vendor, admin)",
                               {200: ok(200, "ResourceGroup")}, errors=[403, 404, 409],
                               request=body("UpdateResourceGroupRequest"),
                               parameters=[vendor, group]),
            "delete": operation("delete_resource_group", "Delete a group (roles vendor, admin)",
                                {204: {"description": "Deleted"}}, errors=[403, 404],
                                parameters=[vendor, group]),
        },
        item + "/availability": {"get": operation(
            "resource_group_availability",
            "Free members of a group per slot (a member is free when a hold of the slot, "
            "buffers included, would succeed on it now)",
            {200: ok(200, "GroupAvailability")}, errors=[400, 403, 404],
            parameters=[vendor, group, param("startTime", "query", TIME, required=True),
                        param("endTime", "query", TIME, required=True),
                        param("slotDuration", "query", {"type": "integer", "minimum": 1,
                                                        "maximum": 10080, "default": 60})])},
    }


# ---- availability engine (issue 13): self-contained as well ----------------------------------
VENDOR_ID = param("vendorId", "path", NAME)
ETAG = {"ETag": {"description": "the quoted computedVersion", "schema": {"type": "string"}}}
AVAILABILITY_TEXT = (
    "Every slot of the grid [startTime, endTime), available or not. reasons (empty when "
    "available) come from the fixed vocabulary outside_hours, busy, tentative, held, booked, "
    "minimum_notice, beyond_horizon, in_past, buffer; confidence: 1.0 free in hours, 0.8 "
    "near a buffer, 0.6 notice or horizon not met, 0.4 outside hours, 0.2 tentative, 0.0 "
    "busy, held, booked or in the past. computedVersion hashes every input (schedule, "
    "busy blocks, live holds and bookings of the range) and is the ETag; If-None-Match "
    "answers 304. With no resourceId on a vendor of several resources the slots are the "
    "union (available when any resource is; resourceIds names them). Roles partner, vendor "
    "(its own), ops, admin.")


def _availability_paths() -> dict[str, Any]:
    rules_errors = [400, 403, 404]
    return {
        "/v1/vendors/{vendorId}/availability": {"get": operation(
            "vendor_availability", AVAILABILITY_TEXT,
            {200: ok(200, "Availability", headers=ETAG),
             304: {"description": "Not modified: If-None-Match names the current version",
                   "headers": ETAG}},
            errors=[400, 403, 404],
            parameters=[
                VENDOR_ID,
                param("startTime", "query", TIME, required=True),
                param("endTime", "query", TIME, required=True),
                param("slotDuration", "query", {"type": "integer", "minimum": 1,
                                                "maximum": 10080},
                      description="minutes, a multiple of the vendor's unit; default the "
                                  "schedule's slotDurationMinutes, else 60"),
                param("includeConfidence", "query", {"type": "boolean", "default": False}),
                param("resourceId", "query", NAME,
                      description="one resource of the vendor (default: the union of all)"),
                param("explain", "query", {"type": "boolean", "default": False},
                      description="list every rule applied to each slot (at most 96 slots)"),
                param("If-None-Match", "header", {"type": "string", "maxLength": 256}),
            ])},
        "/v1/vendors/{vendorId}/schedule": {
            "put": operation(
                "put_vendor_schedule", "Set the vendor's working hours in an IANA zone "
                "(roles vendor for its own vendor, admin); answers what GET will",
                {200: ok(200, "Schedule")}, errors=rules_errors,
                request=body("ScheduleBody"), parameters=[VENDOR_ID]),
            "get": operation(
                "get_vendor_schedule", "The vendor's schedule as PUT accepted it, defaults "
                "filled (404 NO_SCHEDULE: always open)", {200: ok(200, "Schedule")},
                errors=[403, 404], parameters=[VENDOR_ID])},
        "/v1/vendors/{vendorId}/busy-blocks": {
            "post": operation(
                "create_busy_block", "Block an interval (busy or tentative); "
                "live reservations over it fail FAILED_AVAILABILITY_CHANGED at their next "
                "step", {201: ok(201, "BusyBlock", "Created")}, errors=rules_errors,
                request=body("BusyBlockRequest"), parameters=[VENDOR_ID]),
            "get": operation(
                "list_busy_blocks", "The vendor's busy blocks (manual and imported)",
                {200: ok(200, "BusyBlockList")}, errors=[403, 404], parameters=[VENDOR_ID])},
        "/v1/vendors/{vendorId}/busy-blocks/{blockId}": {"delete": operation(
            "delete_busy_block", "Remove a busy block", {200: ok(200, "DeletedBusyBlock")},
            errors=[403, 404],
            parameters=[VENDOR_ID, param("blockId", "path", {"type": "string",
                                                              "minLength": 1,
                                                              "maxLength": 64})])},
        "/v1/vendors/{vendorId}/calendars/{calendarId}": {"put": operation(
            "put_vendor_calendar", "Replace one calendar's busy blocks with an ICS body "
            "(RRULE, EXDATE, RECURRENCE-ID expanded over the horizon; TRANSPARENT and "
            "CANCELLED ignored; TENTATIVE tentative)",
            {200: ok(200, "CalendarImport")}, errors=[400, 403, 404, 413, 415],
            request={"required": True,
                     "content": {"text/calendar": {"schema": {"type": "string"}}}},
            parameters=[VENDOR_ID, param("calendarId", "path", NAME)])},
    }


# ---- payments (issue 12) ---------------------------------------------------------------
def _payments() -> dict[str, Any]:
    return {
        "/v1/bookings/{bookingId}/cancel": {"post": operation(
            "booking_cancel",
            "Cancel a committed booking (the booking's partner, its vendor, ops, admin): the "
            "requester's price refunded per the vendor's refundPolicy, the vendor's deposit in "
            "full unless the vendor cancels; the slot is free again. A second cancel answers "
            "the same result and refunds nothing more",
            {200: ok(200, "BookingCancellation")}, errors=[403, 404],
            request=body("CancelBookingRequest", required=False),
            parameters=[param("bookingId", "path", {"type": "string", "minLength": 1,
                                                    "maxLength": 128})])},
        "/v1/stripe/webhook": {"post": operation(
            "stripe_webhook",
            "Inbound Stripe events, verified by Stripe-Signature on the raw body; each event "
            "applied once by id; unknown types acknowledged",
            {200: ok(200, "WebhookAck")}, errors=[400],
            request={"required": True, "content": {"application/json": {
                "schema": {"type": "object"}}}},
            parameters=[param("Stripe-Signature", "header", {"type": "string"},
                              required=True)],
            secured=False)},
    }


# ---- modify / move (issue 16): self-contained, so the document's other parts stay as they are
def _modify() -> dict[str, Any]:
    return {"post": operation(
        "reservation_modify",
        "Move a live pre-commit hold to a new slot and/or resource, all or nothing, version "
        "+ 1 (roles partner, ops, admin); 409 SLOT_UNAVAILABLE leaves the old hold untouched",
        {200: ok(200, "Reservation", "The reservation after the move")},
        errors=[400, 403, 404, 409, 412], request=body("ModifyReservationRequest"),
        parameters=[RESERVATION_ID, IF_MATCH])}


# ---- events out (issue 14): self-contained as well
# One Server-Sent Event as a client parses it (schemathesis checks each one against this).
SSE_EVENT = {"type": "object", "properties": {
    "event": {"type": "string", "description": "the event type (stream.opened, a webhook "
                                                "event type, ...)"},
    "data": {"type": "string", "description": "the event as JSON text"},
    "id": {"type": "string", "description": "the stream position (Last-Event-ID)"},
    "retry": {"type": "integer"}}}
def _events_out() -> dict[str, Any]:
    endpoint_id = param("endpointId", "path", {"type": "string", "minLength": 1,
                                                "maxLength": 64})
    delivery_id = param("deliveryId", "path", {"type": "string", "minLength": 1,
                                                "maxLength": 64})
    tenancy = ("; a partner key manages its partner's endpoints, a vendor key its "
               "vendor's, ops/admin keys the ops endpoints")
    return {
        "/v1/webhook-endpoints": {
            "post": operation(
                "webhook_endpoint_create",
                "Register a webhook endpoint; its secret is answered this once" + tenancy,
                {201: ok(201, "CreatedWebhookEndpoint", "Created")}, errors=[403],
                request=body("CreateWebhookEndpointRequest")),
            "get": operation("webhook_endpoint_list", "The caller's webhook endpoints",
                             {200: ok(200, "WebhookEndpointList")}, errors=[403]),
        },
        "/v1/webhook-endpoints/{endpointId}": {
            "get": operation("webhook_endpoint_get", "One webhook endpoint",
                             {200: ok(200, "WebhookEndpoint")}, errors=[403, 404],
                             parameters=[endpoint_id]),
            "patch": operation(
                "webhook_endpoint_update", "Change url, events, disabled or description",
                {200: ok(200, "WebhookEndpoint")}, errors=[403, 404],
                request=body("UpdateWebhookEndpointRequest"), parameters=[endpoint_id]),
            "delete": operation("webhook_endpoint_delete",
                                "Delete an endpoint and its delivery log",
                                {204: {"description": "Deleted"}}, errors=[403, 404],
                                parameters=[endpoint_id]),
        },
        "/v1/webhook-endpoints/{endpointId}/rotate-secret": {"post": operation(
            "webhook_endpoint_rotate_secret",
            "A new secret; the previous one keeps signing beside it for "
            "SLOTGUARD_WEBHOOK_SECRET_OVERLAP_S (24 h)",
            {200: ok(200, "RotatedWebhookSecret")}, errors=[403, 404],
            parameters=[endpoint_id])},
        "/v1/webhook-endpoints/{endpointId}/test": {"post": operation(
            "webhook_endpoint_test", "Queue a signed ping to this endpoint (the worker sends "
            "it; its delivery is in the log)",
            {202: ok(202, "WebhookDelivery", "Queued")}, errors=[403, 404],
            parameters=[endpoint_id])},
        "/v1/webhook-endpoints/{endpointId}/deliveries": {"get": operation(
            "webhook_delivery_list", "The endpoint's deliveries, newest first",
            {200: ok(200, "WebhookDeliveryPage")}, errors=[400, 403, 404],
            parameters=[endpoint_id,
                        param("cursor", "query", {"type": "string", "minLength": 1,
                                                  "maxLength": 64, "pattern": NO_NUL},
                              description="nextCursor of the previous page"),
                        param("limit", "query", {"type": "integer", "minimum": 1,
                                                 "maximum": 100, "default": 50}),
                        param("status", "query", {"type": "string", "enum": [
                            "pending", "delivered", "failed", "dead"]})])},
        "/v1/webhook-endpoints/{endpointId}/deliveries/{deliveryId}/retry": {"post": operation(
            "webhook_delivery_retry", "Send a delivery again now, with the same webhook-id",
            {202: ok(202, "WebhookDelivery", "Queued")}, errors=[403, 404],
            parameters=[endpoint_id, delivery_id])},
        "/v1/events/stream": {"get": operation(
            "events_stream",
            "Server-Sent Events of the caller's tenancy; each message's id is its stream "
            "position, Last-Event-ID resumes after it; a heartbeat comment every 15 s",
            {200: {"description": "text/event-stream",
                   "content": {"text/event-stream": {"schema": SSE_EVENT}}}},
            errors=[400, 403, 404],
            parameters=[
                param("vendorId", "query", NAME),
                param("types", "query", {"type": "string", "minLength": 1,
                                         "maxLength": 1000, "pattern": NO_NUL},
                      description="comma-separated event types"),
                param("Last-Event-ID", "header", {"type": "string", "pattern": "^[0-9]{1,18}$"},
                      description="resume after this stream position"),
                param("lastEventId", "query", {"type": "string", "pattern": "^[0-9]{1,18}$"},
                      description="the same, for clients that cannot set headers "
                                  "(the header wins)"),
            ])},
    }


# ---- hold transfer and waitlist (issue 16): self-contained, as modify is
ENTRY_ID = param("entryId", "path", {"type": "string", "minLength": 1, "maxLength": 64})


def _transfer_and_waitlist() -> dict[str, Any]:
    return {
        "/v1/reservations/{reservationId}/transfer-offers": {"post": operation(
            "reservation_transfer_offer",
            "The holder's one-time acceptance token for a live pre-commit hold (role "
            "partner); addressed to toPartnerId or to any partner; a new offer replaces the "
            "previous one",
            {201: ok(201, "TransferOffer", "Created: the token is shown once")},
            errors=[400, 403, 404, 409, 412], request=body("TransferOfferRequest", False),
            parameters=[RESERVATION_ID, IF_MATCH])},
        "/v1/reservations/{reservationId}/transfer": {"post": operation(
            "reservation_transfer",
            "Take over a hold with its acceptance token (role partner), atomically: version "
            "+ 1, the caller holds it. 404 TRANSFER_TOKEN_INVALID (unknown, expired or "
            "superseded token), 409 TRANSFER_TOKEN_USED, 403 TRANSFER_WRONG_PARTNER, 409 "
            "TRANSFER_TO_SELF, 409 for a terminal or committing reservation, 429 when the "
            "caller's hold cap is full",
            {200: ok(200, "Reservation", "The reservation after the transfer")},
            errors=[400, 403, 404, 409, 412], request=body("TransferRequest"),
            parameters=[RESERVATION_ID, IF_MATCH])},
        "/v1/waitlist": {"post": operation(
            "waitlist_create",
            "Wait for a slot (roles partner, system): when a hold covering it expires or is "
            "cancelled, the script that frees it places the hold for the oldest live entry "
            "whose whole slot is free (origin: waitlist); the entry counts against the "
            "partner's hold cap. A slot free right now is handed over at once (state "
            "fulfilled). Name resourceId or resourceGroupId (exactly one): an entry on a "
            "group is queued on every member beside the members' own entries (FIFO across "
            "both) and gets the member the group's strategy picks",
            {201: ok(201, "WaitlistEntry", "Created")},
            errors=[400, 403, 404, 409], request=body("WaitlistRequest"))},
        "/v1/waitlist/{entryId}": {
            "get": operation(
                "waitlist_get", "A waitlist entry: waiting, fulfilled (with reservationId), "
                "expired or withdrawn", {200: ok(200, "WaitlistEntry")},
                errors=[403, 404], parameters=[ENTRY_ID]),
            "delete": operation(
                "waitlist_withdraw", "Withdraw a waiting entry (roles partner, ops, admin); "
                "409 WAITLIST_ENTRY_NOT_WAITING once fulfilled, expired or withdrawn",
                {200: ok(200, "WaitlistEntry", "The entry, withdrawn")},
                errors=[403, 404, 409], parameters=[ENTRY_ID]),
        },
    }


@cache
def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "slotguard partner API", "version": "1.0.0",
                 "description": "Soft holds on vendors' slots, their lifecycle to a booking, "
                                "and the operations around them."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "sg_live_<prefix>_<secret>"}},
        },
    }
