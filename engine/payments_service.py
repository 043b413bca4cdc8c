"""What the API may ask of the payment orchestrator, and who may ask it (issue 12).

The same order of refusals as engine/service.py, once, before any write or provider call:
who (403, the permission table), the request's own rules (400: the payment method id's
form), what (404: the reservation, tenancy included), business rules (409: a free vendor,
incomplete terms, no provider, the wrong state). Authorization of a paying vendor's
reservation needs a payment method; ``outcome`` stays for free vendors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine import directory
from engine.errors import (
    InvalidTransition,
    PaymentNotRequired,
    PaymentRequired,
    PaymentTermsIncomplete,
    TerminalState,
    ValidationError,
)
from engine.lifecycle import TERMINAL, State
from engine.permissions import Principal, require
from engine.service import ACTIONS, ReservationService

PAYMENT_METHOD_RE = re.compile(r"^pm_[A-Za-z0-9_]{1,200}$")
ROLE_OF_ACTION = {"vendor-authorization": "vendor", "requester-authorization": "requester"}
WAITING = {"vendor": State.AWAITING_VENDOR_AUTH, "requester": State.AWAITING_REQUESTER_AUTH}


@dataclass(frozen=True, slots=True)
class AuthorizationAnswer:
    reservation: Any  # engine Reservation
    payment_state: dict[str, Any] | None
    next_action: dict[str, Any] | None = None


class PaymentService:
    def __init__(self, reservations: ReservationService, pool, orchestrator=None) -> None:
        self.reservations = reservations
        self.pool = pool
        self.orchestrator = orchestrator  # None: no provider configured

    async def _vendor(self, vendor_id: str) -> directory.Vendor:
        async with self.pool.acquire() as conn:
            return await directory.get_vendor(conn, vendor_id)

    async def payment_state(self, reservation_id: str) -> dict[str, Any] | None:
        if self.orchestrator is None:
            from engine.payments.orchestrator import PaymentRow, _COLUMNS, payment_state

            async with self.pool.acquire() as conn:
                rows = [PaymentRow.of(r) for r in await conn.fetch(
                    f"SELECT {_COLUMNS} FROM payment_intents WHERE reservation_id = $1",
                    reservation_id)]
            return payment_state(rows)
        from engine.payments.orchestrator import payment_state

        return payment_state(await self.orchestrator.rows(reservation_id))

    async def read(self, principal: Principal, reservation_id: str, client_ip=None):
        """GET /v1/reservations/{id}: the reservation, with its paymentState when its vendor
        requires payment (free reservations cost no extra query)."""
        found = await self.reservations.read(principal, reservation_id, client_ip)
        state = await self.payment_state(reservation_id) if found.payment_required else None
        return found, state

    async def authorize(self, principal: Principal, reservation_id: str, action: str, *,
                        payment_method_id: str | None, outcome: str | None,
                        expected_version: int | None, reason: str | None,
                        metadata: dict[str, Any] | None, client_ip=None,
                        request_id: str = "-") -> AuthorizationAnswer:
        role = ROLE_OF_ACTION[action]
        permission, _ = ACTIONS[action]
        require(principal, permission)
        if payment_method_id is None and self.orchestrator is None:
            # No provider: paying vendors cannot hold at all, so the plain outcome path is
            # the only one (one round trip, as before).
            moved = await self.reservations.act(
                principal, reservation_id, action, outcome=outcome,
                expected_version=expected_version, reason=reason, metadata=metadata,
                client_ip=client_ip, request_id=request_id)
            return AuthorizationAnswer(moved, None)
        if payment_method_id is not None:
            if not PAYMENT_METHOD_RE.match(payment_method_id):
                raise ValidationError("paymentMethodId must be a payment method id (pm_...)",
                                      code="INVALID_PAYMENT_METHOD",
                                      details={"field": "paymentMethodId"})
            if outcome is not None:
                raise ValidationError("give paymentMethodId or outcome, not both",
                                      code="INVALID_OUTCOME", details={"field": "outcome"})
        current = await self.reservations.read(principal, reservation_id, client_ip)
        if payment_method_id is None:
            if current.payment_required:
                raise ValidationError("this vendor requires payment: authorize with "
                                      "paymentMethodId", code="PAYMENT_METHOD_REQUIRED",
                                      details={"field": "paymentMethodId"})
            moved = await self.reservations.act(
                principal, reservation_id, action, outcome=outcome,
                expected_version=expected_version, reason=reason, metadata=metadata,
                client_ip=client_ip, request_id=request_id)
            return AuthorizationAnswer(moved, None)
        vendor = await self._vendor(current.vendor_id)
        if not (current.payment_required and vendor.payment_required):
            raise PaymentNotRequired("this reservation's vendor requires no payment",
                                     details={"reservationId": reservation_id,
                                              "vendorId": vendor.id})
        if self.orchestrator is None:
            raise PaymentRequired("no payment provider is configured",
                                  details={"vendorId": vendor.id})
        if None in (vendor.price_amount, vendor.deposit_amount, vendor.currency):
            raise PaymentTermsIncomplete("the vendor states no price, deposit or currency",
                                         details={"vendorId": vendor.id})
        if current.state in TERMINAL:
            raise TerminalState(f"the reservation is {current.state}, a terminal state",
                                details={"reservationId": reservation_id,
                                         "state": current.state.value})
        if current.state != WAITING[role]:
            raise InvalidTransition(f"{action} is not allowed in state {current.state}",
                                    details={"reservationId": reservation_id,
                                             "state": current.state.value, "action": action})
        if expected_version is not None and expected_version != current.version:
            from engine.errors import VersionMismatch

            raise VersionMismatch("the reservation changed since that version",
                                  details={"reservationId": reservation_id,
                                           "currentVersion": current.version})
        done = await self.orchestrator.authorize(current, vendor, role, payment_method_id)
        reservation = done.reservation or current
        state = await self.payment_state(reservation_id)
        return AuthorizationAnswer(reservation, state,
                                   done.row.next_action if done.row.status == "requires_action"
                                   else None)
