"""The waitlist's validation layer (issue 16): who may ask, what exists, and every 4xx,
once, before the first write; engine/waitlist.py executes.

Order of refusals, as engine/service.py: who (403), what (404: vendor, resource, entry), the
finer rules (400: times, grid, not in the past, requester, ttlMs), business rules (409:
payment), then the rate limits and the partner's cap (429), asked in one round trip
before the entry is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from engine import clock
from engine.errors import NotFound, ValidationError
from engine.lifecycle import PARTNER
from engine.permissions import Principal, can_see, require
from engine.service import (
    MIN_TTL_MS,
    ReservationService,
    check_requester,
    check_vendor_resource,
)
from engine.times import parse_range
from engine.waitlist import CAP_MARGIN_MS, Added, EntryPlacement, WaitlistEngine, WaitlistEntry


@dataclass(frozen=True, slots=True)
class WaitlistRequest:
    """A parsed ``POST /v1/waitlist`` body (types checked by the route)."""

    vendor_id: str
    resource_id: str | None
    resource_group_id: str | None
    slot_start: str
    slot_end: str
    requester_id: str
    ttl_ms: int
    request_id: str = "-"


class WaitlistService:
    def __init__(self, reservations: ReservationService, engine: WaitlistEngine) -> None:
        self.reservations = reservations
        self.engine = engine
        self.catalog = reservations.catalog
        self.keys = reservations.keys
        self.settings = reservations.settings

    async def create(self, principal: Principal, req: WaitlistRequest, *,
                     client_ip: str | None = None, now_ms: int | None = None) -> Added:
        """Validate, then (1) the rate limits and the partner's cap slot in one round trip,
        (2) the entry, whose script serves the slot's waitlist at once (the entry may come
        back already fulfilled when the slot was free)."""
        require(principal, "waitlist.create")
        svc = self.reservations
        vendor = await self.catalog.vendor(req.vendor_id)
        group, members = await self._place_of(vendor, req)
        start_ms, end_ms = parse_range(req.slot_start, req.slot_end, "slotStartTime",
                                       "slotEndTime")
        for member in members:  # the one grid rule, on each resource the entry may get
            svc._check_slot(member, start_ms, end_ms)  # noqa: SLF001
        resource = members[0]
        now = clock.now_ms() if now_ms is None else now_ms
        if start_ms <= now:
            raise ValidationError("slotStartTime is in the past", code="SLOT_IN_PAST",
                                  details={"field": "slotStartTime"})
        check_requester(req.requester_id)
        max_ttl = self.settings.waitlist_max_ttl_ms
        if not isinstance(req.ttl_ms, int) or not MIN_TTL_MS <= req.ttl_ms <= max_ttl:
            raise ValidationError(f"ttlMs must be between {MIN_TTL_MS} and {max_ttl}",
                                  code="INVALID_FIELD",
                                  details={"field": "ttlMs", "minimum": MIN_TTL_MS,
                                           "maximum": max_ttl})
        svc.check_payments(vendor)
        scope = svc.scope_of(principal)
        entry_id = self.keys.new_waitlist_entry_id(resource.shard_name)  # every member's
        units = []
        for member in members:
            first, last = member.units(start_ms, end_ms, self.settings.max_hold_units)
            units.append((member, first, last, *member.unit_span_ms(first, last)))
        _, first, last, block_start, block_end = units[0]
        metadata = {"requestId": req.request_id, "origin": "waitlist",
                    "waitlistEntryId": entry_id}
        placement = EntryPlacement(
            entry_id=entry_id, partner_id=scope, vendor=vendor, resource=resource,
            start_ms=start_ms, end_ms=end_ms, first_unit=first, last_unit=last,
            block_start_ms=block_start, block_end_ms=block_end,
            requester_id=req.requester_id, ttl_ms=req.ttl_ms,
            metadata_text=orjson.dumps(metadata).decode(),
            group_id=group.group_id if group else "",
            choice="tightest" if group and group.strategy == "best_fit" else "first",
            members=tuple(units) if group else ())
        # The cap slot expires with the entry (the script clamps it to the slot's start),
        # plus the margin between the two scripts' clocks.
        cap_expires = min(now + req.ttl_ms, start_ms) + CAP_MARGIN_MS
        return await self.engine.add(placement, cap_expires_at_ms=cap_expires,
                                     admission=svc._rate_checks(principal, client_ip))  # noqa: SLF001

    async def _place_of(self, vendor, req: WaitlistRequest):
        """What the entry waits for: ``(None, [resource])``, or ``(group, members in the
        strategy's order)`` for an entry on a resource group (issue 16). Exactly one of
        resourceId and resourceGroupId (400); another vendor's resource is 400
        RESOURCE_VENDOR_MISMATCH, another vendor's group is unknown (404), a group whose
        members live under different hash tags cannot be served atomically (409)."""
        if req.resource_group_id is not None and req.resource_id is not None:
            raise ValidationError("give resourceId or resourceGroupId, not both",
                                  code="INVALID_FIELD", details={"field": "resourceGroupId"})
        if req.resource_group_id is None and req.resource_id is None:
            raise ValidationError("name the resourceId or the resourceGroupId to wait for",
                                  code="MISSING_FIELD", details={"field": "resourceId"})
        if req.resource_group_id is not None:
            groups = self.reservations.groups
            if groups is None:
                raise ValidationError("resource groups are not enabled", code="INVALID_FIELD",
                                      details={"field": "resourceGroupId"})
            group, members = await groups.resolve(vendor, req.resource_group_id)
            by_id = {m.id: m for m in members}
            return group, [by_id[r] for r in group.candidate_order()]
        resource = await self.catalog.resource(req.resource_id)
        check_vendor_resource(vendor, resource)
        return None, [resource]

    async def read(self, principal: Principal, entry_id: str,
                   client_ip: str | None = None) -> WaitlistEntry:
        require(principal, "waitlist.read")
        self._known_id(entry_id)
        await self.reservations.throttle(principal, client_ip)
        entry = await self.engine.read(entry_id)
        if entry is None or not can_see(principal, entry.partner_id, entry.vendor_id):
            raise _not_found(entry_id)
        return entry

    async def withdraw(self, principal: Principal, entry_id: str,
                       client_ip: str | None = None) -> WaitlistEntry:
        require(principal, "waitlist.withdraw")
        self._known_id(entry_id)
        await self.reservations.throttle(principal, client_ip)
        scope = principal.partner_id or "\x00" if principal.role == PARTNER else ""
        try:
            return await self.engine.withdraw(entry_id, partner_scope=scope)
        except NotFound:
            raise _not_found(entry_id) from None

    def _known_id(self, entry_id: Any) -> None:
        try:
            self.keys.shard_of_waitlist_id(entry_id)
        except (ValueError, TypeError):  # not one of our ids: no lookup anywhere
            raise _not_found(entry_id) from None


def _not_found(entry_id: str) -> NotFound:
    return NotFound("waitlist entry not found", code="WAITLIST_ENTRY_NOT_FOUND",
                    details={"waitlistEntryId": entry_id})
