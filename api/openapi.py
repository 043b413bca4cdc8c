"""The OpenAPI 3.1 document, built from shared schema pieces.

Every route of api/app.py appears here with its body, parameters, responses and errors;
tests/test_api_schema.py holds the running app to this document with schemathesis, and
checks that every route is documented. Business rules JSON Schema cannot state (a slot on
the vendor's unit grid, end after start, a vendor that exists) are answered with the
documented 4xx codes.
"""

from __future__ import annotations

import re
import zoneinfo
from functools import cache
from typing import Any

from api.validation import INT64, MAX_JSON_DEPTH
from engine.keys import NAME_RE
from engine.lifecycle import ACTORS as ACTOR_SET
from engine.lifecycle import RESERVED_PARTNER_IDS, State
from engine.permissions import ROLES
from engine.reservations import MAX_METADATA_BYTES, MAX_TEXT
from engine.service import INVISIBLE, MAX_TTL_MS
from engine.times import ISO_PATTERN

NAME = {"type": "string", "pattern": NAME_RE.pattern, "minLength": 1, "maxLength": 64}
NO_NUL = r"^[^\x00]*$"  # query strings: anything Postgres can store
TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT,
        "pattern": r"^(?=.*\S)[^\x00-\x1f\x7f]*$",
        "description": "not all blank; no control characters"}
REQUESTER = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT,
             "pattern": f"^(?=.*[^{INVISIBLE}])[^\\x00-\\x1f\\x7f]*$",
             "description": "at least one visible character; no control characters"}
TIME = {"type": "string", "format": "date-time", "pattern": ISO_PATTERN,
        "description": "ISO 8601 / RFC 3339 timestamp with an offset of at most ±14:00, "
                       "e.g. 2030-01-01T09:00:00Z; no precision below the millisecond"}
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
METADATA = {"$ref": "#/components/schemas/Metadata",
            "description": f"Free-form JSON object: at most {MAX_METADATA_BYTES} bytes "
                           "serialized (compact UTF-8, the server's requestId not counted), "
                           f"nesting at most {MAX_JSON_DEPTH} levels counting the body, no NUL "
                           "in any string, numbers within the signed 64-bit range."}
STATE = {"type": "string", "enum": [s.value for s in State]}
ACTORS = sorted(ACTOR_SET)
UNIT_MINUTES = [m for m in range(1, 1441) if 1440 % m == 0]


def _case_blind(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)


# A new partner's id: a name that is not a role or reserved word, in any case.
PARTNER_ID = {"type": "string", "minLength": 1, "maxLength": 64,
              "pattern": "^(?!(?:" + "|".join(_case_blind(w) for w in
                                              sorted(RESERVED_PARTNER_IDS)) + ")$)"
                         + NAME_RE.pattern[1:],
              "description": "not a role name or reserved word (system, ops, admin, ...)"}


def _json_values() -> dict[str, Any]:
    """JSON values a body may carry: no NUL in strings or keys, numbers within the signed
    64-bit range. The nesting limit (MAX_JSON_DEPTH) is stated in words: a schema that
    counted levels would grow exponentially once its references are inlined."""
    no_nul = {"pattern": NO_NUL}
    value = {"anyOf": [
        {"type": "string", **no_nul},
        {"type": "number", "minimum": INT64[0], "maximum": INT64[1]},
        {"type": "boolean"}, {"type": "null"},
        {"type": "array", "items": ref("JsonValue")},
        {"type": "object", "propertyNames": no_nul, "additionalProperties": ref("JsonValue")},
    ]}
    return {"JsonValue": value,
            "Metadata": {"type": "object", "propertyNames": no_nul,
                         "additionalProperties": ref("JsonValue")}}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: dict[str, Any], required: list[str] | None = None,
        additional: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "additionalProperties": additional}
    if required:
        schema["required"] = required
    return schema


SCHEMAS: dict[str, Any] = {
    "Error": obj({"error": obj({
        "code": {"type": "string"},
        "message": {"type": "string"},
        "details": {"type": "object"},
        "retryable": {"type": "boolean"},
        "retryAfter": {"type": ["integer", "null"], "minimum": 1,
                       "description": "seconds; null when not applicable"},
    }, ["code", "message", "details", "retryable", "retryAfter"])}, ["error"]),
    "CreateReservationRequest": obj({
        "vendorId": NAME,
        "resourceId": NAME,
        "slotStartTime": TIME,
        "slotEndTime": TIME,
        "requesterId": REQUESTER,
        "metadata": METADATA,
        "idempotencyKey": {"type": "string", "minLength": 1, "maxLength": 255,
                           "pattern": "^[\\x20-\\x7e]+$"},
    }, ["vendorId", "slotStartTime", "slotEndTime", "requesterId"]),
    "CreateReservationResponse": obj({
        "reservationId": {"type": "string"},
        "state": STATE,
        "expiresAt": TIME,
        "vendorConfirmationRequired": {"type": "boolean"},
        "estimatedConfirmationTime": TIME,
    }, ["reservationId", "state", "expiresAt", "vendorConfirmationRequired",
        "estimatedConfirmationTime"]),
    "StateTransition": obj({
        "id": {"type": "string"},
        "reservationId": {"type": "string"},
        "fromState": {"type": ["string", "null"]},
        "toState": STATE,
        "triggeredBy": {"type": "string", "enum": ACTORS},
        "reason": {"type": ["string", "null"]},
        "metadata": {"type": ["object", "null"]},
        "timestamp": TIME,
        "idempotencyKey": {"type": ["string", "null"]},
        "version": {"type": "integer"},
    }, ["id", "reservationId", "fromState", "toState", "triggeredBy", "timestamp", "version"]),
    "Reservation": obj({
        "reservationId": {"type": "string"},
        "state": STATE,
        "vendorId": {"type": "string"},
        "resourceId": {"type": "string"},
        "slotStartTime": TIME,
        "slotEndTime": TIME,
        "requesterId": {"type": "string"},
        "createdAt": TIME,
        "expiresAt": TIME,
        "version": {"type": "integer", "minimum": 0},
        "metadata": {"type": "object"},
        "stateHistory": {"type": "array", "items": ref("StateTransition")},
        "bookingId": {"type": ["string", "null"]},
        "failureReason": {"type": ["string", "null"]},
    }, ["reservationId", "state", "vendorId", "resourceId", "slotStartTime", "slotEndTime",
        "requesterId", "createdAt", "expiresAt", "version", "stateHistory"]),
    "ActionRequest": obj({"reason": TEXT, "metadata": METADATA}),
    "AuthorizationRequest": obj({"reason": TEXT, "metadata": METADATA,
                                 "outcome": {"type": "string",
                                             "enum": ["authorized", "failed"]}}),
    "ExtendRequest": obj({"reason": TEXT,
                          "metadata": {**METADATA, "description": METADATA["description"]
                                       + " Stored on the extension's stateHistory entry and "
                                         "audit row."},
                          "ttlMs": {"type": "integer", "minimum": 1000,
                                    "maximum": MAX_TTL_MS,
                                    "description": "beyond the maximum hold time: 409"}}),
    "AvailabilitySlot": obj({
        "startTime": TIME,
        "endTime": TIME,
        "isAvailable": {"type": "boolean"},
        "status": {"type": "string", "enum": ["free", "held", "booked"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "reasons": {"type": "array", "items": {"type": "string"}},
        "computedAt": TIME,
        "computedVersion": {"type": "string"},
    }, ["startTime", "endTime", "isAvailable", "status", "reasons", "computedAt",
        "computedVersion"]),
    "Availability": obj({
        "vendorId": {"type": "string"},
        "resourceId": {"type": "string"},
        "startTime": TIME,
        "endTime": TIME,
        "computedAt": TIME,
        "computedVersion": {"type": "string"},
        "slots": {"type": "array", "items": ref("AvailabilitySlot")},
        "metadata": obj({"confidenceThreshold": {"type": "number"},
                         "computationTimeMs": {"type": "number", "minimum": 0}},
                        ["confidenceThreshold", "computationTimeMs"]),
    }, ["vendorId", "startTime", "endTime", "computedAt", "computedVersion", "slots",
        "metadata"]),
    "ReleaseRequest": obj({"reason": TEXT}, ["reason"]),
    "BulkReleaseRequest": {
        "oneOf": [
            obj({"reason": TEXT,
                 # Bounded so that every valid body fits SLOTGUARD_MAX_BODY_BYTES.
                 "reservationIds": {"type": "array", "minItems": 1, "maxItems": 200,
                                    "items": {"type": "string", "minLength": 1,
                                              "maxLength": 40,
                                              "pattern": "^[A-Za-z0-9_]+$"}}},
                ["reason", "reservationIds"]),
            obj({"reason": TEXT, "resourceId": NAME, "startTime": TIME, "endTime": TIME},
                ["reason", "resourceId", "startTime", "endTime"]),
        ],
    },
    "BulkReleaseResult": obj({
        "released": {"type": "array", "items": obj(
            {"reservationId": {"type": "string"}, "state": STATE},
            ["reservationId", "state"])},
        "failed": {"type": "array", "items": obj(
            {"reservationId": {"type": "string"}, "code": {"type": "string"},
             "message": {"type": "string"}}, ["reservationId", "code", "message"])},
    }, ["released", "failed"]),
    "AuditEntry": obj({
        "id": {"type": "integer"},
        "eventId": {"type": "string"},
        "tenantId": {"type": ["string", "null"]},
        "reservationId": {"type": ["string", "null"]},
        "resourceId": {"type": ["string", "null"]},
        "action": {"type": "string"},
        "actor": {"type": "string"},
        "at": TIME,
        "metadata": {"type": "object"},
    }, ["id", "eventId", "action", "actor", "at", "metadata"]),
    "AuditPage": obj({"entries": {"type": "array", "items": ref("AuditEntry")}}, ["entries"]),
    "CreatePartnerRequest": obj({"partnerId": PARTNER_ID, "name": TEXT}, ["partnerId"]),
    "Partner": obj({"partnerId": {"type": "string"}, "name": {"type": "string"},
                    "active": {"type": "boolean"}}, ["partnerId", "name", "active"]),
    "CreateVendorRequest": obj({
        "vendorId": NAME,
        "unitMinutes": {"type": "integer", "enum": UNIT_MINUTES},
        "bufferBeforeMinutes": {"type": "integer", "minimum": 0, "maximum": 1440,
                                "description": "a multiple of unitMinutes"},
        "bufferAfterMinutes": {"type": "integer", "minimum": 0, "maximum": 1440,
                               "description": "a multiple of unitMinutes"},
        "confirmationRequired": {"type": "boolean"},
        "paymentRequired": {"type": "boolean"},
        "timezone": {"type": "string", "enum": sorted(zoneinfo.available_timezones()),
                     "description": "an IANA time zone name"},
    }, ["vendorId"]),
    "Vendor": obj({
        "vendorId": {"type": "string"},
        "unitMinutes": {"type": "integer"},
        "bufferBeforeMinutes": {"type": "integer"},
        "bufferAfterMinutes": {"type": "integer"},
        "confirmationRequired": {"type": "boolean"},
        "paymentRequired": {"type": "boolean"},
        "timezone": {"type": "string"},
        "defaultResourceId": {"type": "string"},
    }, ["vendorId", "unitMinutes", "bufferBeforeMinutes", "bufferAfterMinutes",
        "confirmationRequired", "paymentRequired", "timezone", "defaultResourceId"]),
    "CreateResourceRequest": obj({
        "resourceId": NAME,
        "vendorId": NAME,
        "unitMinutes": {"type": "integer", "enum": UNIT_MINUTES},
        "bufferBeforeMinutes": {"type": "integer", "minimum": 0, "maximum": 1440},
        "bufferAfterMinutes": {"type": "integer", "minimum": 0, "maximum": 1440},
    }, ["resourceId", "vendorId"]),
    "Resource": obj({
        "resourceId": {"type": "string"},
        "vendorId": {"type": "string"},
        "unitMinutes": {"type": "integer"},
        "bufferBeforeMinutes": {"type": "integer"},
        "bufferAfterMinutes": {"type": "integer"},
    }, ["resourceId", "vendorId", "unitMinutes", "bufferBeforeMinutes", "bufferAfterMinutes"]),
    "CreateKeyRequest": {"oneOf": [
        obj({"role": {"const": "partner"}, "partnerId": NAME}, ["role", "partnerId"]),
        obj({"role": {"const": "vendor"}, "vendorId": NAME}, ["role", "vendorId"]),
        obj({"role": {"type": "string", "enum": [r for r in ROLES
                                                 if r not in ("partner", "vendor")]}},
            ["role"]),
    ]},
    "ApiKey": obj({
        "keyId": {"type": "string"},
        "prefix": {"type": "string"},
        "role": {"type": "string", "enum": list(ROLES)},
        "partnerId": {"type": ["string", "null"]},
        "vendorId": {"type": ["string", "null"]},
        "revoked": {"type": "boolean"},
        "key": {"type": "string", "description": "the plaintext key, shown once"},
    }, ["keyId", "prefix", "role", "partnerId", "vendorId", "revoked"]),
    "Live": obj({"status": {"type": "string", "enum": ["live"]}}, ["status"]),
    "Ready": obj({"status": {"type": "string", "enum": ["ready"]},
                  "checks": {"type": "object",
                             "additionalProperties": {"type": "boolean"}},
                  "holdsReady": {"type": "boolean"}}, ["status", "checks"]),
}

RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                               "schema": {"type": "string", "pattern": "^[0-9]+$"},
                               "required": True}}
ERROR_TEXT = {
    400: "Invalid input (malformed JSON, unknown or missing field, wrong type, bad or naive "
         "timestamp, end not after start, slot off the unit grid, range too large)",
    401: "Missing, invalid or revoked API key",
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
                             "The vendor's payment authorization outcome (role vendor)"),
    "requester-authorization": ("AuthorizationRequest",
                                "The requester's payment authorization outcome (role partner)"),
    "commit": ("ActionRequest", "Commit: answered 202 with COMMIT_IN_PROGRESS (role partner)"),
    "cancel": ("ActionRequest", "Cancel (roles partner, vendor)"),
    "extend": ("ExtendRequest", "Extend the hold's deadline (role partner)"),
}


def _action(action: str) -> dict[str, Any]:
    schema, summary = ACTION_DOCS[action]
    status = 202 if action == "commit" else 200
    responses = {status: ok(status, "Reservation", "The reservation after the action")}
    return {"post": operation(
        "reservation_" + action.replace("-", "_"), summary, responses,
        errors=[400, 403, 404, 409, 412], request=body(schema, required=False),
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
        "/v1/vendors/{vendorId}/availability": {"get": operation(
            "vendor_availability", "Free, held and booked slots of a vendor",
            {200: ok(200, "Availability")}, errors=[400, 403, 404],
            parameters=[
                param("vendorId", "path", NAME),
                param("startTime", "query", TIME, required=True),
                param("endTime", "query", TIME, required=True),
                param("slotDuration", "query", {"type": "integer", "minimum": 1,
                                                "maximum": 10080, "default": 60},
                      description="minutes; a multiple of the vendor's unit"),
                param("includeConfidence", "query", {"type": "boolean", "default": False}),
                param("resourceId", "query", NAME,
                      description="a resource of the vendor (default: its default resource)"),
            ])},
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
    return paths


# ---- modify / move (issue 16): self-contained, so the document's other parts stay as they are
SCHEMAS["ModifyReservationRequest"] = obj({
    "resourceId": {**NAME, "description": "another resource of the reservation's vendor under "
                                          "the same shard hash tag (else 409 "
                                          "MODIFY_CROSS_SHARD); default: the one it is on"},
    "slotStartTime": TIME,
    "slotEndTime": TIME,
}, ["slotStartTime", "slotEndTime"])


def _modify() -> dict[str, Any]:
    return {"post": operation(
        "reservation_modify",
        "Move a live pre-commit hold to a new slot and/or resource, all or nothing, version "
        "+ 1 (roles partner, ops, admin); 409 SLOT_UNAVAILABLE leaves the old hold untouched",
        {200: ok(200, "Reservation", "The reservation after the move")},
        errors=[400, 403, 404, 409, 412], request=body("ModifyReservationRequest"),
        parameters=[RESERVATION_ID, IF_MATCH])}


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
            "schemas": {**SCHEMAS, **_json_values()},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "sg_live_<prefix>_<secret>"}},
        },
    }
