"""Request and response shapes of events out (issue 14): webhook endpoints, deliveries.

Kept beside api/schemas.py (fewer merge conflicts); api/openapi.py adds :data:`STRUCTS` to
the components. The URL's and events' rules are the service's (engine/webhook_service.py),
documented here only.
"""

from typing import Any

from msgspec import UNSET, UnsetType

from api.schemas import Body, Out, OutTime, doc, text
from engine.webhook_events import EVENT_TYPES
from engine.webhook_service import DELIVERY_STATUSES, MAX_DESCRIPTION, MAX_URL

URL_DOC = {"format": "uri", "description": "an absolute http(s) URL; private, loopback and "
                                           "link-local targets are refused (400 "
                                           "WEBHOOK_URL_PRIVATE) unless "
                                           "SLOTGUARD_WEBHOOK_ALLOW_PRIVATE=true"}
EVENTS_DOC = {"description": 'event types to receive, or ["*"] (or "*") for all of them',
              "anyOf": [{"type": "array", "minItems": 1, "uniqueItems": True,
                         "items": {"type": "string", "enum": list(EVENT_TYPES)}},
                        {"type": "array", "const": ["*"]},
                        {"type": "string", "const": "*"}]}
Url = text(MAX_URL, URL_DOC)
Events = doc(list[str] | str, **EVENTS_DOC)
Description = doc(str, maxLength=MAX_DESCRIPTION, pattern="^[^\\x00-\\x08\\x0a-\\x1f]*$",
                  description="free text, no control characters (tabs allowed)")


class CreateWebhookEndpointRequest(Body):
    url: Url
    events: Events
    description: Description | UnsetType = UNSET


class UpdateWebhookEndpointRequest(Body):
    """Only the fields given change; ``disabled: false`` re-enables (and clears the failure
    record of) an endpoint the worker disabled."""

    url: Url | UnsetType = UNSET
    events: Events | UnsetType = UNSET
    disabled: bool | UnsetType = UNSET
    description: Description | UnsetType = UNSET


class WebhookEndpoint(Out):
    id: str
    url: str
    events: list[str]
    description: str
    disabled: bool
    disabled_reason: str | None
    flagged: bool  # a delivery went dead since the endpoint was last (re-)enabled
    flagged_at: OutTime | None
    failing_since: OutTime | None
    previous_secret_expires_at: OutTime | None  # the rotated-out secret signs until then
    created_at: OutTime
    updated_at: OutTime


class CreatedWebhookEndpoint(WebhookEndpoint):
    secret: doc(str, pattern="^whsec_[A-Za-z0-9+/=]+$",
                description="Standard Webhooks secret; answered this once")


class RotatedWebhookSecret(Out):
    id: str
    secret: doc(str, pattern="^whsec_[A-Za-z0-9+/=]+$", description="the new secret")
    previous_secret_expires_at: OutTime


class WebhookEndpointList(Out):
    data: list[WebhookEndpoint]


class WebhookDelivery(Out):
    delivery_id: str
    webhook_id: str  # the webhook-id header: the same on every attempt
    endpoint_id: str
    type: str
    status: doc(str, enum=list(DELIVERY_STATUSES))
    attempts: int
    last_status_code: int | None
    last_latency_ms: int | None
    last_error: str | None
    last_attempt_at: OutTime | None
    next_attempt_at: OutTime | None  # while pending
    delivered_at: OutTime | None
    created_at: OutTime
    reservation_id: str | None
    version: int | None


class WebhookDeliveryPage(Out):
    data: list[WebhookDelivery]
    next_cursor: str | None


STRUCTS: tuple[type[Any], ...] = (
    CreateWebhookEndpointRequest, UpdateWebhookEndpointRequest, WebhookEndpoint,
    CreatedWebhookEndpoint, RotatedWebhookSecret, WebhookEndpointList, WebhookDelivery,
    WebhookDeliveryPage)
