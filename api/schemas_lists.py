"""Response shapes of the lists with cursors (issue 17): ``{"data": [...], "nextCursor"}``.

A list's rows are summaries (a reservation's history is on ``GET /v1/reservations/{id}``);
``nextCursor`` is opaque, passed back as ``startingAfter``, and null on the last page.
"""

from msgspec import UNSET, UnsetType

from api.schemas import (ApiKey, OutTime, Out, Partner, ReservationItemOut, StateName, Vendor,
                         doc)

Cursor = doc(str | None, description="opaque; pass it as startingAfter for the next page; "
                                      "null on the last page")


class ReservationSummary(Out):
    reservation_id: str
    state: StateName
    partner_id: str
    vendor_id: str
    resource_id: str
    requester_id: str
    slot_start_time: OutTime
    slot_end_time: OutTime
    created_at: OutTime
    updated_at: OutTime
    expires_at: OutTime | None
    version: doc(int, minimum=0)
    booking_id: str | None
    failure_reason: str | None
    items: list[ReservationItemOut] | UnsetType = UNSET  # a multi-resource reservation


class ReservationList(Out):
    data: list[ReservationSummary]
    next_cursor: Cursor


class Booking(Out):
    booking_id: str
    reservation_id: str
    partner_id: str
    vendor_id: str
    resource_id: str
    requester_id: str
    slot_start_time: OutTime
    slot_end_time: OutTime
    created_at: OutTime
    cancelled_at: OutTime | None


class BookingList(Out):
    data: list[Booking]
    next_cursor: Cursor


class VendorList(Out):
    data: list[Vendor]
    next_cursor: Cursor


class PartnerList(Out):
    data: list[Partner]
    next_cursor: Cursor


class ApiKeySummary(Out):
    """A key's record; the secret is never listed (only its public prefix)."""

    key_id: str
    prefix: str
    role: str
    partner_id: str | None
    vendor_id: str | None
    revoked: bool
    created_at: OutTime
    revoked_at: OutTime | None


class ApiKeyList(Out):
    data: list[ApiKeySummary]
    next_cursor: Cursor


RESPONSES = (ReservationList, BookingList, VendorList, PartnerList, ApiKeyList)
