"""Request and response shapes of hold transfer and the waitlist (issue 16), as msgspec
Structs (see api/schemas.py for the two kinds of constraint). Listed in :data:`STRUCTS` so
api/openapi.py documents them beside the core's."""

from msgspec import UNSET, UnsetType

from api.schemas import (
    MAX_TEXT,
    PARTNER_ID_DOC,
    REQUESTER_DOC,
    Body,
    Name,
    Out,
    OutTime,
    StateName,
    Time,
    doc,
    text,
)
from engine.waitlist import STATES


# ---- hold transfer --------------------------------------------------------------------------
class TransferOfferRequest(Body):
    """Optional: without ``toPartnerId`` any partner holding the token may accept."""

    to_partner_id: text(64, {**PARTNER_ID_DOC,
                             "description": "the only partner that may accept (default: any "
                                            "partner with the token)"}) | UnsetType = UNSET
    ttl_ms: doc(int, minimum=1000, maximum=86_400_000,
                description="how long the token is good for (default 900000 ms, "
                            "SLOTGUARD_TRANSFER_OFFER_TTL_MS)") | UnsetType = UNSET


class TransferRequest(Body):
    acceptance_token: text(128, {"pattern": "^xfr_[A-Za-z0-9_-]+$", "maxLength": 128,
                                 "description": "the token of POST .../transfer-offers"})


class TransferOffer(Out):
    reservation_id: str
    acceptance_token: doc(str, description="shown once; stored only as its SHA-256 digest")
    to_partner_id: str | None
    expires_at: OutTime
    state: StateName
    version: int


# ---- waitlist ------------------------------------------------------------------------------
class WaitlistRequest(Body):
    """Exactly one of ``resourceId`` and ``resourceGroupId`` (400 MISSING_FIELD for neither,
    INVALID_FIELD for both): an entry on a group gets the member the group's strategy
    picks."""

    vendor_id: Name
    slot_start_time: Time
    slot_end_time: Time
    requester_id: text(MAX_TEXT, REQUESTER_DOC)
    ttl_ms: doc(int, minimum=1000, maximum=7 * 86_400_000,
                description="the entry waits at most this long, and never past the slot's "
                            "start (SLOTGUARD_WAITLIST_MAX_TTL_MS bounds it)")
    resource_id: Name | UnsetType = UNSET
    resource_group_id: Name | UnsetType = UNSET


class WaitlistEntry(Out):
    waitlist_entry_id: str
    state: doc(str, enum=list(STATES))
    expires_at: OutTime
    vendor_id: str
    resource_id: doc(str, description="the resource waited for; for an entry on a resource "
                                      "group, the member it got once fulfilled") | None
    resource_group_id: doc(str, description="the resource group waited for (issue 16)") | None
    slot_start_time: OutTime
    slot_end_time: OutTime
    requester_id: str
    created_at: OutTime
    reservation_id: doc(str, description="the hold the entry became, once fulfilled") | None


STRUCTS = (TransferOfferRequest, TransferRequest, TransferOffer, WaitlistRequest,
           WaitlistEntry)
