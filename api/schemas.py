"""Request and response shapes, declared once as msgspec Structs.

Decoding (api/validation.py ``parse_body``), the response encoding (api/views.py) and the
OpenAPI components (api/openapi.py) all come from these declarations.

Two kinds of constraint live here:

- *enforced at decode* (``Meta(max_length=..., pattern=...)``, the types, required fields,
  ``forbid_unknown_fields``): the shape rules the route layer owns, answered with
  ``UNKNOWN_FIELD``, ``MISSING_FIELD``, ``INVALID_FIELD_TYPE`` or ``INVALID_FIELD``;
- *documented only* (``extra_json_schema``): the business rules engine/service.py decides
  with its own codes (a vendor id's pattern, a time's format, ``ttlMs`` bounds, the
  ``outcome`` values). The document states them; the service answers them.
"""

import re
import zoneinfo
from typing import Annotated, Any

from msgspec import UNSET, Meta, Struct, UnsetType

from engine.availability import REASONS as AVAILABILITY_REASONS
from engine.keys import NAME_RE
from engine.lifecycle import ACTORS as ACTOR_SET
from engine.lifecycle import RESERVED_PARTNER_IDS, State
from engine.payments.terms import (CURRENCIES, MAX_AMOUNT, MAX_CUTOFF_MINUTES,
                                   REFUND_POLICIES, STRIPE_ACCOUNT_RE)
from engine.permissions import ROLES
from engine.reservations import MAX_METADATA_BYTES, MAX_TEXT
from engine.service import INVISIBLE, MAX_TTL_MS
from engine.times import ISO_PATTERN

MAX_JSON_DEPTH = 32  # every serializer on the path (msgspec, Lua cjson, jsonb) handles more
INT64 = (-(2**63), 2**63 - 1)
NO_NUL = r"^[^\x00]*$"  # query strings: anything Postgres can store
# Every string field: not all blank, no control characters (NUL included: a NUL is
# reported as INVALID_CHARACTER, api/validation.py looks for it before the field rules).
FIELD_PATTERN = r"^(?=.*\S)[^\x00-\x1f\x7f]*$"


def _case_blind(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)


# ---- documented shapes of strings (the service enforces them with its own codes) --------
NAME_DOC = {"pattern": NAME_RE.pattern, "minLength": 1, "maxLength": 64}
TEXT_DOC = {"minLength": 1, "maxLength": MAX_TEXT, "pattern": FIELD_PATTERN,
            "description": "not all blank; no control characters"}
REQUESTER_DOC = {"minLength": 1, "maxLength": MAX_TEXT,
                 "pattern": f"^(?=.*[^{INVISIBLE}])[^\\x00-\\x1f\\x7f]*$",
                 "description": "at least one visible character; no control characters"}
TIME_DOC = {"format": "date-time", "pattern": ISO_PATTERN,
            "description": "ISO 8601 / RFC 3339 timestamp with an offset of at most ±14:00, "
                           "e.g. 2030-01-01T09:00:00Z; no precision below the millisecond"}
METADATA_DOC = {"propertyNames": {"pattern": NO_NUL},
                "additionalProperties": {"$ref": "#/components/schemas/JsonValue"},
                "description": f"Free-form JSON object: at most {MAX_METADATA_BYTES} bytes "
                               "serialized (compact UTF-8, the server's requestId not "
                               f"counted), nesting at most {MAX_JSON_DEPTH} levels counting "
                               "the body, no NUL in any string, numbers within the signed "
                               "64-bit range."}
PARTNER_ID_DOC = {"minLength": 1, "maxLength": 64,
                  "pattern": "^(?!(?:" + "|".join(_case_blind(w) for w in
                                                  sorted(RESERVED_PARTNER_IDS)) + ")$)"
                             + NAME_RE.pattern[1:],
                  "description": "not a role name or reserved word (system, ops, admin, ...)"}
STATE_DOC = {"enum": [s.value for s in State]}
UNIT_MINUTES = [m for m in range(1, 1441) if 1440 % m == 0]


def text(max_length: int = MAX_TEXT, doc: dict | None = None) -> Any:
    """A string field: 1..max_length characters, not all blank, no control characters
    (enforced at decode); ``doc`` adds what the service enforces."""
    # "x-doc" wins over the enforced pattern in the document (api/openapi.py merges it).
    return Annotated[str, Meta(max_length=max_length, pattern=FIELD_PATTERN,
                               extra_json_schema={"x-doc": doc} if doc else {})]


def doc(kind: Any, **schema: Any) -> Any:
    """``kind`` with documentation only (nothing more is enforced at decode)."""
    return Annotated[kind, Meta(extra_json_schema=schema)]


Name = text(64, NAME_DOC)
Time = text(64, TIME_DOC)
Metadata = doc(dict[str, Any], **METADATA_DOC)
OutTime = doc(str, **{k: v for k, v in TIME_DOC.items() if k != "pattern"})
StateName = doc(str, **STATE_DOC)


class Body(Struct, forbid_unknown_fields=True, rename="camel", kw_only=True):
    """A request body: a JSON object of exactly these fields."""


class Out(Struct, rename="camel", kw_only=True):
    """A response body."""


# ---- requests ---------------------------------------------------------------------------
class ReservationItem(Body):
    """One item of a multi-resource reservation (issue 16)."""

    resource_id: Name
    slot_start_time: Time
    slot_end_time: Time


class CreateReservationRequest(Body):
    """One of three forms (the OpenAPI document states them as a ``oneOf``; the route and
    the service decide which was meant): a slot of ``resourceId`` (default: the vendor's
    default resource), a slot of a member of ``resourceGroupId`` (a pooled hold), or
    ``items`` (a multi-resource reservation, 1..20 items, all or nothing)."""

    vendor_id: Name
    requester_id: text(MAX_TEXT, REQUESTER_DOC)
    slot_start_time: Time | UnsetType = UNSET
    slot_end_time: Time | UnsetType = UNSET
    resource_id: Name | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET
    idempotency_key: text(255, {"minLength": 1, "pattern": "^[\\x20-\\x7e]+$"}) | UnsetType \
        = UNSET
    # A pooled hold (issue 16): a member of this resource group is chosen by its strategy
    # (instead of resourceId); nearResourceId anchors an `adjacent` group's choice.
    resource_group_id: Name | UnsetType = UNSET
    near_resource_id: Name | UnsetType = UNSET
    near_zone: Name | UnsetType = UNSET  # an adjacent group's zone to take a member of
    # Documented 1..20; the service answers NO_ITEMS / TOO_MANY_ITEMS (the body size limit
    # refuses 1,000 items first, 413).
    items: doc(list[ReservationItem], minItems=1, maxItems=20) | UnsetType = UNSET


class ActionRequest(Body):
    reason: text(MAX_TEXT, TEXT_DOC) | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET


class AuthorizationRequest(ActionRequest):
    outcome: text(16, {"enum": ["authorized", "failed"]}) | UnsetType = UNSET
    # Payments (issue 12): a paying vendor's reservation is authorized with a payment
    # method (a manual-capture PaymentIntent); outcome is for free vendors.
    payment_method_id: text(203, {"pattern": "^pm_[A-Za-z0-9_]{1,200}$",
                                  "description": "a Stripe PaymentMethod id, e.g. "
                                                 "pm_card_visa"}) | UnsetType = UNSET


class ExtendRequest(ActionRequest):
    ttl_ms: doc(int, minimum=1000, maximum=MAX_TTL_MS,
                description="the new deadline is now + ttlMs (default: the hold TTL). "
                            "When that is not after the current deadline: 409 "
                            "EXTEND_NOT_LATER and no extension is spent; beyond the maximum "
                            "hold time: 409 MAX_HOLD_DURATION") | UnsetType = UNSET


class ModifyReservationRequest(Body):
    """A move (issue 16): a new slot and/or another resource of the reservation's vendor
    under the same shard hash tag (else 409 MODIFY_CROSS_SHARD); default: the one it is on."""

    slot_start_time: Time
    slot_end_time: Time
    resource_id: Name | UnsetType = UNSET


class ReleaseRequest(Body):
    reason: text(MAX_TEXT, TEXT_DOC)


class BulkReleaseRequest(Body):
    """Either ``reservationIds`` or ``resourceId`` + ``startTime`` + ``endTime`` (the route
    checks the choice and the ids; the document states it as a ``oneOf``)."""

    reason: text(MAX_TEXT, TEXT_DOC)
    reservation_ids: list[Any] | UnsetType = UNSET
    resource_id: Name | UnsetType = UNSET
    start_time: Time | UnsetType = UNSET
    end_time: Time | UnsetType = UNSET


class CreatePartnerRequest(Body):
    partner_id: text(64, PARTNER_ID_DOC)
    name: text(MAX_TEXT, TEXT_DOC) | UnsetType = UNSET


class CreateVendorRequest(Body):
    vendor_id: Name
    unit_minutes: doc(int, enum=UNIT_MINUTES) | UnsetType = UNSET
    buffer_before_minutes: doc(int, minimum=0, maximum=1440,
                               description="a multiple of unitMinutes") | UnsetType = UNSET
    buffer_after_minutes: doc(int, minimum=0, maximum=1440,
                              description="a multiple of unitMinutes") | UnsetType = UNSET
    confirmation_required: bool | UnsetType = UNSET
    payment_required: doc(bool, description="default false: a free vendor") | UnsetType \
        = UNSET
    timezone: text(64, {"enum": sorted(zoneinfo.available_timezones()),
                        "description": "an IANA time zone name"}) | UnsetType = UNSET
    # Payment terms (issue 12).
    price_amount: doc(int, minimum=1, maximum=MAX_AMOUNT,
                      description="the requester's price, minor units") | UnsetType = UNSET
    deposit_amount: doc(int, minimum=1, maximum=MAX_AMOUNT,
                        description="the vendor's deposit, minor units") | UnsetType = UNSET
    currency: text(3, {"enum": sorted(CURRENCIES), "description": "ISO 4217"}) | UnsetType \
        = UNSET
    stripe_account_id: text(70, {"pattern": STRIPE_ACCOUNT_RE.pattern,
                                 "description": "connected account: the requester's price "
                                                "is a direct charge on it"}) | UnsetType = UNSET
    refund_policy: text(16, {"enum": list(REFUND_POLICIES)}) | UnsetType = UNSET
    refund_cutoff_minutes: doc(int, minimum=0, maximum=MAX_CUTOFF_MINUTES,
                               description="with refundPolicy full_before") | UnsetType = UNSET


class UpdateVendorRequest(Body):
    """PATCH /v1/admin/vendors/{vendorId} (issue 12): the payment terms given change, the
    others stay; a refundPolicy other than full_before clears refundCutoffMinutes."""

    payment_required: bool | UnsetType = UNSET
    price_amount: doc(int, minimum=1, maximum=MAX_AMOUNT) | UnsetType = UNSET
    deposit_amount: doc(int, minimum=1, maximum=MAX_AMOUNT) | UnsetType = UNSET
    currency: text(3, {"enum": sorted(CURRENCIES)}) | UnsetType = UNSET
    stripe_account_id: text(70, {"pattern": STRIPE_ACCOUNT_RE.pattern}) | UnsetType = UNSET
    refund_policy: text(16, {"enum": list(REFUND_POLICIES)}) | UnsetType = UNSET
    refund_cutoff_minutes: doc(int, minimum=0, maximum=MAX_CUTOFF_MINUTES) | UnsetType \
        = UNSET


class CreateResourceRequest(Body):
    resource_id: Name
    vendor_id: Name
    unit_minutes: doc(int, enum=UNIT_MINUTES) | UnsetType = UNSET
    buffer_before_minutes: doc(int, minimum=0, maximum=1440) | UnsetType = UNSET
    buffer_after_minutes: doc(int, minimum=0, maximum=1440) | UnsetType = UNSET


class CreateKeyRequest(Body):
    """``partnerId`` with role partner, ``vendorId`` with role vendor (the document states
    it as a ``oneOf``; the directory decides)."""

    role: text(16, {"enum": list(ROLES)})
    partner_id: Name | UnsetType = UNSET
    vendor_id: Name | UnsetType = UNSET


REQUESTS: tuple[type[Body], ...] = (
    CreateReservationRequest, ActionRequest, AuthorizationRequest, ExtendRequest,
    ModifyReservationRequest, ReleaseRequest, BulkReleaseRequest, CreatePartnerRequest, CreateVendorRequest, UpdateVendorRequest,
    CreateResourceRequest, CreateKeyRequest)


# ---- responses --------------------------------------------------------------------------
class ErrorDetail(Out):
    code: str
    message: str
    details: dict[str, Any]
    retryable: bool
    retry_after: doc(int, minimum=1, description="seconds; null when not applicable") | None


class Error(Out):
    error: ErrorDetail


class ReservationItemOut(Out):
    resource_id: str
    slot_start_time: OutTime
    slot_end_time: OutTime


class CreateReservationResponse(Out):
    reservation_id: str
    state: StateName
    expires_at: OutTime
    vendor_confirmation_required: bool
    estimated_confirmation_time: OutTime
    resource_id: str | UnsetType = UNSET  # the resource held (a pooled hold's chosen member)
    items: list[ReservationItemOut] | UnsetType = UNSET  # a multi-resource reservation


class StateTransition(Out):
    id: str
    reservation_id: str
    from_state: str | None
    to_state: StateName
    triggered_by: doc(str, enum=sorted(ACTOR_SET))
    reason: str | None
    metadata: dict[str, Any] | None
    timestamp: OutTime
    idempotency_key: str | None
    version: int


# ---- Payments (issue 12) ------------------------------------------------------------------
INTENT_STATUS = ["requires_payment_method", "requires_confirmation", "requires_action",
                 "processing", "requires_capture", "succeeded", "canceled"]


class PaymentState(Out):
    """The seed's PaymentState; amounts in minor units of ``currency``."""

    vendor_payment_intent_id: str | None = None
    vendor_payment_intent_status: doc(str, enum=INTENT_STATUS) | None = None
    vendor_authorized_at: OutTime | None = None
    vendor_capture_id: str | None = None
    vendor_next_action: dict[str, Any] | None = None
    vendor_amount: int | None = None
    vendor_refunded_amount: int = 0
    requester_payment_intent_id: str | None = None
    requester_payment_intent_status: doc(str, enum=INTENT_STATUS) | None = None
    requester_authorized_at: OutTime | None = None
    requester_capture_id: str | None = None
    requester_next_action: dict[str, Any] | None = None
    requester_amount: int | None = None
    requester_refunded_amount: int = 0
    vendor_capture_attempts: int = 0
    requester_capture_attempts: int = 0
    last_capture_error: str | None = None
    currency: str | None = None



class Reservation(Out):
    reservation_id: str
    state: StateName
    vendor_id: str
    resource_id: str
    slot_start_time: OutTime
    slot_end_time: OutTime
    requester_id: str
    created_at: OutTime
    expires_at: OutTime
    version: doc(int, minimum=0)
    metadata: dict[str, Any]
    state_history: list[StateTransition]
    booking_id: str | None
    failure_reason: str | None
    # Payments (issue 12): present for reservations of paying vendors.
    payment_state: PaymentState | UnsetType = UNSET
    next_action: dict[str, Any] | UnsetType = UNSET
    items: list[ReservationItemOut] | UnsetType = UNSET  # a multi-resource reservation


class AvailabilitySlot(Out):
    start_time: OutTime
    end_time: OutTime
    is_available: bool
    status: doc(str, enum=["free", "held", "booked"])
    reasons: doc(list[str], items={"enum": list(AVAILABILITY_REASONS)},
                 description="why the slot is unavailable (empty when available)")
    computed_at: OutTime
    computed_version: str
    confidence: doc(float, minimum=0, maximum=1) | UnsetType = UNSET  # includeConfidence
    # Issue 13: with no resourceId on a vendor of several resources, the ones it is free on;
    # with explain=true, every rule applied to the slot.
    resource_ids: list[str] | UnsetType = UNSET
    explain: list[dict[str, Any]] | UnsetType = UNSET


class AvailabilityMetadata(Out):
    confidence_threshold: float
    computation_time_ms: doc(float, minimum=0)


class Availability(Out):
    vendor_id: str
    resource_id: doc(str, description="the resource asked for; with no resourceId on a "
                     "vendor of several resources, its default resource (the slots are the "
                     "union over resourceIds)")
    start_time: OutTime
    end_time: OutTime
    computed_at: OutTime
    computed_version: str
    slots: list[AvailabilitySlot]
    metadata: AvailabilityMetadata
    resource_ids: list[str] | UnsetType = UNSET  # issue 13: the resources the union covers


class Released(Out):
    reservation_id: str
    state: StateName


class ReleaseFailure(Out):
    reservation_id: str
    code: str
    message: str


class BulkReleaseResult(Out):
    released: list[Released]
    failed: list[ReleaseFailure]


class AuditEntry(Out):
    id: int
    event_id: str
    tenant_id: str | None
    reservation_id: str | None
    resource_id: str | None
    action: str
    actor: str
    at: OutTime
    metadata: dict[str, Any]


class AuditPage(Out):
    entries: doc(list[AuditEntry], description="deprecated: the same rows as data")
    # Issue 17: a cursor, and the rows under the name every list uses.
    data: list[AuditEntry]
    next_cursor: doc(str | None, description="opaque; pass it as startingAfter for the "
                                             "next page; null on the last page")


class Partner(Out):
    partner_id: str
    name: str
    active: bool


class Vendor(Out):
    vendor_id: str
    unit_minutes: int
    buffer_before_minutes: int
    buffer_after_minutes: int
    confirmation_required: bool
    payment_required: bool
    timezone: str
    default_resource_id: str
    price_amount: int | None = None
    deposit_amount: int | None = None
    currency: str | None = None
    stripe_account_id: str | None = None
    refund_policy: doc(str, enum=list(REFUND_POLICIES)) = "full"
    refund_cutoff_minutes: int | None = None


class Resource(Out):
    resource_id: str
    vendor_id: str
    unit_minutes: int
    buffer_before_minutes: int
    buffer_after_minutes: int


class ApiKey(Out):
    key_id: str
    prefix: str
    role: doc(str, enum=list(ROLES))
    partner_id: str | None
    vendor_id: str | None
    revoked: bool
    key: doc(str, description="the plaintext key, shown once") | UnsetType = UNSET


class Live(Out):
    status: doc(str, enum=["live"])


class Ready(Out):
    status: doc(str, enum=["ready"])
    checks: dict[str, bool]
    holds_ready: bool | UnsetType = UNSET


RESPONSES: tuple[type[Out], ...] = (
    Error, CreateReservationResponse, Reservation, Availability, BulkReleaseResult, AuditPage,
    Partner, Vendor, Resource, ApiKey, Live, Ready)


# Availability engine (issue 13): its bodies live in api/schemas_availability.py.
from api.schemas_availability import (  # noqa: E402  (needs the base classes above)
    AVAILABILITY_REQUESTS,
    AVAILABILITY_RESPONSES,
)

REQUESTS = REQUESTS + AVAILABILITY_REQUESTS
RESPONSES = RESPONSES + AVAILABILITY_RESPONSES
