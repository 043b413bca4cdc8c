"""The reservation service: what the API may ask of the engine, and who may ask it.

Every operation checks the permission table (engine/permissions.py) first, then tenancy,
then validates its input completely, and only then writes. Creation composes the partner's
hold cap (partner hash slot) with the reservation (resource shard) as two script calls with
compensation (in the engine): take the cap, create, give the cap back if the creation
definitely failed.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from ulid import ULID

from engine.catalog_cache import CatalogCache
from engine.errors import (
    EngineError,
    HoldConflict,
    NotFound,
    NotReady,
    PaymentRequired,
    TerminalState,
    ValidationError,
)
from engine.idempotency import check_key
from engine.lifecycle import TERMINAL, State
from engine.limits import Limits
from engine.permissions import (
    OPS,
    PARTNER,
    Principal,
    require,
    require_tenant,
)
from engine.reservations import (
    MAX_METADATA_BYTES,
    MAX_TEXT,
    Moved,
    Reservation,
    ReservationEngine,
)
from engine.resources import MINUTE_MS, Resource, Vendor

MAX_TTL_MS = 86_400_000  # the largest extension asked for; the hold's own limit is lower
SYSTEM_PARTNER = "system"  # the partner id recorded when a system key creates a reservation

# Route action -> (permission, engine action per outcome). Authorization endpoints take an
# outcome; the others have one engine action.
ACTIONS: dict[str, tuple[str, dict[str | None, str]]] = {
    "vendor-confirmation": ("reservation.vendor-confirmation",
                            {None: "vendor-confirmation"}),
    "vendor-authorization": ("reservation.vendor-authorization",
                             {"authorized": "vendor-authorization",
                              "failed": "vendor-authorization-failed"}),
    "requester-authorization": ("reservation.requester-authorization",
                                {"authorized": "requester-authorization",
                                 "failed": "requester-authorization-failed"}),
    "commit": ("reservation.commit", {None: "commit"}),
    "cancel": ("reservation.cancel", {None: "cancel"}),
    "extend": ("reservation.extend", {None: "extend"}),
}


@dataclass(frozen=True, slots=True)
class CreateRequest:
    vendor_id: str
    resource_id: str | None
    start_ms: int
    end_ms: int
    requester_id: str
    metadata: dict[str, Any] | None
    idempotency_key: str | None


@dataclass(frozen=True, slots=True)
class Created:
    moved: Moved
    vendor: Vendor


class ReservationService:
    def __init__(self, engine: ReservationEngine, catalog: CatalogCache, limits: Limits,
                 *, load_stored=None, rehydrate=None) -> None:
        self.engine = engine
        self.catalog = catalog
        self.limits = limits
        self.keys = engine.keys
        self.settings = engine.settings
        # async (reservation_id) -> Reservation | None: the Postgres record of a reservation
        # whose Redis record is gone (terminal and past retention).
        self._load_stored = load_stored
        # async () -> None: restore booked markers when Redis reports it lost them.
        self._rehydrate = rehydrate

    # ---- abuse controls ---------------------------------------------------------------
    async def throttle(self, principal: Principal, client_ip: str | None) -> None:
        """Count the request against its client IP and its key (partner); 429 when over.
        Both limiters are asked in the same Redis round trip."""
        checks = []
        if client_ip:
            checks.append(self.limits.check_ip_rate(client_ip))
        if principal.role != "system":
            checks.append(self.limits.check_partner_rate(principal.partner_id
                                                         or principal.key_id))
        for result in await asyncio.gather(*checks, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    # ---- creation ---------------------------------------------------------------------
    async def validate_create(self, principal: Principal,
                              req: CreateRequest) -> tuple[Vendor, Resource]:
        """Everything creation checks before its first write."""
        require(principal, "reservation.create")
        vendor = await self.catalog.vendor(req.vendor_id)
        resource = await self.catalog.resource(req.resource_id or vendor.default_resource_id)
        if resource.vendor_id and resource.vendor_id != vendor.id:
            raise ValidationError("the resource does not belong to the vendor",
                                  code="RESOURCE_VENDOR_MISMATCH",
                                  details={"field": "resourceId", "resourceId": resource.id,
                                           "vendorId": vendor.id})
        if req.start_ms % resource.unit_ms or req.end_ms % resource.unit_ms:
            raise ValidationError("slotStartTime and slotEndTime must sit on the vendor's "
                                  "unit grid", code="SLOT_NOT_ALIGNED",
                                  details={"field": "slotStartTime",
                                           "unitMinutes": resource.unit_ms / MINUTE_MS})
        units = ((req.end_ms + resource.buffer_after_ms)
                 - (req.start_ms - resource.buffer_before_ms)) // resource.unit_ms
        if units > self.settings.max_hold_units:
            raise ValidationError("the slot is longer than one hold may be",
                                  code="SLOT_TOO_LONG",
                                  details={"field": "slotEndTime", "units": units,
                                           "maxUnits": self.settings.max_hold_units})
        if len(req.requester_id) > MAX_TEXT or not req.requester_id.strip():
            raise ValidationError("requesterId must be 1..256 characters",
                                  details={"field": "requesterId"})
        if req.metadata is not None:
            size = len(orjson.dumps(req.metadata))
            if size > MAX_METADATA_BYTES:
                raise ValidationError("metadata is too large", code="METADATA_TOO_LARGE",
                                      details={"field": "metadata",
                                               "maxBytes": MAX_METADATA_BYTES})
        if req.idempotency_key is not None:
            check_key(req.idempotency_key)
        if vendor.payment_required and not self.engine.payments_enabled:
            raise PaymentRequired("this vendor requires payment and no payment provider is "
                                  "configured yet", details={"vendorId": vendor.id})
        return vendor, resource

    async def create(self, principal: Principal, req: CreateRequest,
                     admission: Callable[[], Awaitable[None]] | None = None) -> Created:
        """Hold the slot. The engine takes the partner's cap slot first and gives it back
        when the hold definitely did not land (engine/reservations.py). ``admission`` (the
        rate limits) is asked in the same round trip as the cap."""
        vendor, resource = await self.validate_create(principal, req)
        partner_id = principal.partner_id if principal.role == PARTNER else SYSTEM_PARTNER
        reservation_id = self._reservation_id(partner_id, resource.id, req.idempotency_key)
        for attempt in (1, 2):
            try:
                moved = await self.engine.create(
                    partner_id=partner_id, vendor_id=vendor.id, resource_id=resource.id,
                    start_ms=req.start_ms, end_ms=req.end_ms, requester_id=req.requester_id,
                    metadata=req.metadata, idempotency_key=req.idempotency_key or "",
                    triggered_by=principal.actor, reservation_id=reservation_id,
                    admission=admission() if admission is not None and attempt == 1 else None)
                return Created(moved, vendor)
            except HoldConflict as exc:
                raise self._conflict_for(principal, exc) from None
            except NotReady:
                # Redis lost its data (restart): restore the booked markers, then retry once.
                if attempt == 2 or self._rehydrate is None:
                    raise
                await self._rehydrate()
        raise AssertionError("unreachable")

    def _reservation_id(self, partner_id: str, resource_id: str, key: str | None) -> str:
        """With an idempotency key the id is derived from it, so a retry after a crash
        between the hold and the stored response lands on the same reservation."""
        if key is None:
            return self.keys.new_reservation_id(resource_id)
        raw = hashlib.sha256(f"{partner_id}\n{key}".encode()).digest()[:16]
        return f"rsv_{self.keys.shard_of(resource_id)}_{ULID.from_bytes(raw)}"

    @staticmethod
    def _conflict_for(principal: Principal, exc: HoldConflict) -> HoldConflict:
        """Partners and vendors learn what collides, not another tenant's reservation id."""
        if principal.role in (OPS, "admin", "system"):
            return exc
        details = {k: v for k, v in exc.details.items() if k != "conflictingReservationId"}
        return HoldConflict(exc.message, holder=exc.holder, unit=exc.unit, booked=exc.booked,
                            details=details)

    # ---- reads ------------------------------------------------------------------------
    async def read(self, principal: Principal, reservation_id: str) -> Reservation:
        require(principal, "reservation.read")
        current = await self._find(reservation_id)
        require_tenant(principal, current.partner_id, current.vendor_id, reservation_id)
        return current

    async def _find(self, reservation_id: str) -> Reservation:
        try:
            self.keys.shard_of_id(reservation_id)
        except ValueError:  # not one of our ids: no lookup anywhere
            raise NotFound("reservation not found",
                           details={"reservationId": reservation_id}) from None
        current = await self.engine.get(reservation_id)
        if current is None and self._load_stored is not None:
            current = await self._load_stored(reservation_id)
        if current is None:
            raise NotFound("reservation not found", details={"reservationId": reservation_id})
        return current

    # ---- transitions ------------------------------------------------------------------
    async def act(self, principal: Principal, reservation_id: str, action: str, *,
                  outcome: str | None = None, expected_version: int | None = None,
                  reason: str = "", metadata: dict[str, Any] | None = None,
                  ttl_ms: int | None = None) -> Reservation:
        permission, engine_actions = ACTIONS[action]
        require(principal, permission)
        if outcome not in engine_actions:
            raise ValidationError("outcome must be 'authorized' or 'failed'"
                                  if outcome is not None or None not in engine_actions
                                  else "this action takes no outcome",
                                  code="INVALID_OUTCOME", details={"field": "outcome"})
        current = await self._find(reservation_id)
        require_tenant(principal, current.partner_id, current.vendor_id, reservation_id)
        return await self._apply(principal.actor, current, engine_actions[outcome],
                                 expected_version, reason, metadata, ttl_ms)

    async def _apply(self, actor: str, current: Reservation, engine_action: str,
                     expected_version: int | None, reason: str,
                     metadata: dict[str, Any] | None, ttl_ms: int | None) -> Reservation:
        rid = current.reservation_id
        if current.state in TERMINAL and await self.engine.get(rid) is None:
            # Only the Postgres record is left: nothing can move it any more.
            raise TerminalState(f"the reservation is {current.state}, a terminal state",
                                details={"reservationId": rid, "state": current.state})
        if engine_action == "extend":
            await self.engine.extend(rid, actor=actor, ttl_ms=ttl_ms,
                                     expected_version=expected_version, reason=reason)
        else:
            await self.engine.act(rid, engine_action, actor=actor,
                                  expected_version=expected_version, reason=reason,
                                  metadata=metadata)
        return await self._find(rid)

    # ---- operations -------------------------------------------------------------------
    async def release(self, principal: Principal, reservation_id: str,
                      reason: str) -> Reservation:
        """Manual release: cancel as ops/admin with a reason, through the normal event path."""
        require(principal, "ops.release")
        current = await self._find(reservation_id)
        return await self._apply(principal.actor, current, "cancel", None, reason, None, None)

    async def bulk_release(self, principal: Principal, reason: str, *,
                           reservation_ids: list[str] | None = None,
                           resource_id: str | None = None,
                           range_ms: tuple[int, int] | None = None) -> dict[str, Any]:
        require(principal, "ops.bulk-release")
        if reservation_ids is None:
            from engine.occupancy import held_by

            resource = await self.catalog.resource(resource_id or "")
            start, end = range_ms or (0, 0)
            if end - start > self.settings.max_query_range_ms:
                raise ValidationError("the range is too long", code="RANGE_TOO_LARGE",
                                      details={"field": "endTime",
                                               "maxRangeMs": self.settings.max_query_range_ms})
            reservation_ids = [h for h in await held_by(self.engine.access, self.keys,
                                                        resource, start, end)
                               if h.startswith("rsv_")]
        released, failed = [], []
        for rid in reservation_ids:
            try:
                moved = await self.release(principal, rid, reason)
                released.append({"reservationId": rid, "state": moved.state.value})
            except EngineError as exc:
                failed.append({"reservationId": rid, "code": exc.code, "message": exc.message})
        return {"released": released, "failed": failed}


def check_reason(reason: Any) -> str:
    if reason is None:
        return ""
    if not isinstance(reason, str) or len(reason) > MAX_TEXT:
        raise ValidationError(f"reason must be at most {MAX_TEXT} characters",
                              details={"field": "reason"})
    return reason


def _ms(moment) -> int:
    return int(moment.timestamp() * 1000)


def from_record(stored) -> Reservation:
    """A Postgres record (engine.records.StoredReservation) as the engine's Reservation."""
    history = [{
        "id": t.event_id,
        "reservationId": stored.id,
        "fromState": t.from_state,
        "toState": t.to_state,
        "triggeredBy": t.triggered_by,
        "reason": t.reason,
        "metadata": t.metadata or None,
        "timestamp_ms": _ms(t.at),
        "idempotencyKey": t.idempotency_key,
        "version": t.version,
    } for t in stored.history]
    start, end = _ms(stored.slot_start), _ms(stored.slot_end)
    return Reservation(
        reservation_id=stored.id, state=State(stored.state), version=stored.version,
        partner_id=stored.partner_id, vendor_id=stored.vendor_id,
        resource_id=stored.resource_id, requester_id=stored.requester_id,
        slot_start_ms=start, slot_end_ms=end, block_start_ms=start, block_end_ms=end,
        created_at_ms=_ms(stored.created_at),
        deadline_ms=_ms(stored.expires_at or stored.updated_at),
        confirmation_required=False, payment_required=False,
        booking_id=stored.booking_id, failure_reason=stored.failure_reason,
        metadata=stored.metadata or {}, history=history)
