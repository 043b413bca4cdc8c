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

import orjson

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

    async def cancel(self, principal: Principal, reservation_id: str, **kw):
        """The ``cancel`` action; a paying reservation's authorizations are released at once
        (reconciliation would find them later otherwise). Free reservations cost nothing
        more."""
        moved = await self.reservations.act(principal, reservation_id, "cancel", **kw)
        if moved.payment_required and self.orchestrator is not None:
            live = await self.orchestrator.live_rows([reservation_id])
            for row in live.get(reservation_id, {}).values():
                await self.orchestrator.release(row, reason="reservation cancelled")
        return moved

    # ---- inbound Stripe events -------------------------------------------------------
    async def webhook(self, payload: bytes, signature: str | None) -> str:
        """``POST /v1/stripe/webhook``: the signature verified on the raw body (no API key:
        the signature authenticates), each event applied once by id, unknown types
        acknowledged. The verified payload is authoritative (no re-fetch)."""
        from engine.errors import InvalidWebhook
        from engine.payments.provider import intent_of

        if self.orchestrator is None:
            raise InvalidWebhook("no payment provider is configured")
        try:
            event = self.orchestrator.provider.verify_event(payload, signature)
        except ValueError as exc:
            raise InvalidWebhook("the Stripe-Signature does not verify",
                                 details={"reason": str(exc)[:200]}) from None
        event_id, kind = event.get("id"), event.get("type")
        if not isinstance(event_id, str) or not isinstance(kind, str):
            raise InvalidWebhook("the event has no id or type")
        async with self.pool.acquire() as conn:
            fresh = await conn.fetchval(
                "INSERT INTO stripe_events (id, type) VALUES ($1, $2) ON CONFLICT DO NOTHING "
                "RETURNING id", event_id, kind)
        if fresh is None:
            return "duplicate"
        handlers = {"payment_intent.amount_capturable_updated": True,
                    "payment_intent.payment_failed": False}
        if kind not in handlers:
            return "ignored"
        try:
            obj = (event.get("data") or {}).get("object") or {}
            return await self.orchestrator.intent_event(intent_of(obj), handlers[kind])
        except BaseException:
            async with self.pool.acquire() as conn:  # not applied: Stripe's retry may apply it
                await conn.execute("DELETE FROM stripe_events WHERE id = $1", event_id)
            raise


# ---- booking cancellation (issue 12) ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Cancellation:
    booking_id: str
    reservation_id: str
    cancelled_by: str
    reason: str | None
    requester_refund_amount: int
    vendor_refund_amount: int
    currency: str | None
    cancelled_at_ms: int


class BookingService:
    """``POST /v1/bookings/{bookingId}/cancel``: the partner of the booking, its vendor, ops,
    admin or system. The requester's price is refunded per the vendor's refundPolicy, the
    vendor's deposit in full unless the vendor cancels. Written first (what is refunded),
    then the refunds (each recorded before its call), then the booking's ``cancelled_at``
    (the exclusion constraint then allows the slot again), an audit row, and the units freed
    in Redis. Idempotent: a second cancel answers the first one's result, refunds nothing."""

    def __init__(self, reservations: ReservationService, pool, orchestrator=None) -> None:
        self.reservations = reservations
        self.pool = pool
        self.orchestrator = orchestrator
        self.engine = reservations.engine

    async def cancel(self, principal: Principal, booking_id: str, reason: Any,
                     client_ip=None) -> Cancellation:
        from engine.errors import NotFound
        from engine.permissions import can_see
        from engine.service import check_reason

        require(principal, "booking.cancel")
        reason = check_reason(reason) or None
        if not isinstance(booking_id, str) or not 0 < len(booking_id) <= 128:
            raise NotFound("booking not found", details={"bookingId": booking_id})
        await self.reservations.throttle(principal, client_ip)
        async with self.pool.acquire() as conn:
            booking = await conn.fetchrow(
                """SELECT b.id, b.reservation_id, b.partner_id, b.vendor_id, b.resource_id,
                          b.slot_start, b.block_start, b.block_end, b.cancelled_at
                   FROM bookings b WHERE b.id = $1""", booking_id)
        if booking is None or not can_see(principal, booking["partner_id"],
                                          booking["vendor_id"]):
            raise NotFound("booking not found", details={"bookingId": booking_id})
        rid = booking["reservation_id"]
        async with self.pool.acquire() as conn:
            existing = await conn.fetchrow(
                "SELECT * FROM booking_cancellations WHERE booking_id = $1", booking_id)
        if existing is None:
            existing = await self._record(principal, booking, reason)
        if existing["completed_at"] is None:
            existing = await self._complete(booking, existing)
        return Cancellation(booking_id, rid, existing["cancelled_by"], existing["reason"],
                            existing["requester_refund_amount"],
                            existing["vendor_refund_amount"], existing["currency"],
                            int(existing["completed_at"].timestamp() * 1000))

    async def _record(self, principal: Principal, booking, reason: str | None):
        from engine import clock

        rid = booking["reservation_id"]
        rows = {r.role: r for r in (await self.orchestrator.rows(rid)
                                    if self.orchestrator is not None else [])
                if r.status == "succeeded"}
        async with self.pool.acquire() as conn:
            vendor = await directory.get_vendor(conn, booking["vendor_id"])
        requester_refund = vendor_refund = 0
        if "requester" in rows:
            price = rows["requester"].amount
            if vendor.refund_policy == "full":
                requester_refund = price
            elif vendor.refund_policy == "full_before":
                cutoff_ms = (booking["slot_start"].timestamp() * 1000
                             - (vendor.refund_cutoff_minutes or 0) * 60_000)
                requester_refund = price if clock.now_ms() < cutoff_ms else 0
        if "vendor" in rows and principal.role != "vendor":
            vendor_refund = rows["vendor"].amount
        currency = next((r.currency for r in rows.values()), None)
        async with self.pool.acquire() as conn:
            await conn.execute(
                """INSERT INTO booking_cancellations (booking_id, reservation_id, cancelled_by,
                       reason, requester_refund_amount, vendor_refund_amount, currency)
                   VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (booking_id) DO NOTHING""",
                booking["id"], rid, principal.actor, reason, requester_refund, vendor_refund,
                currency)
            return await conn.fetchrow(
                "SELECT * FROM booking_cancellations WHERE booking_id = $1", booking["id"])

    async def _complete(self, booking, cancellation):
        from engine.payments.orchestrator import _audit

        rid = booking["reservation_id"]
        if self.orchestrator is not None:
            for row in await self.orchestrator.rows(rid):
                if row.status != "succeeded":
                    continue
                want = (cancellation["requester_refund_amount"] if row.role == "requester"
                        else cancellation["vendor_refund_amount"])
                if want:
                    try:
                        await self.orchestrator.refund_to(row, want, "booking_cancelled")
                    except Exception as exc:
                        from engine.errors import PaymentProviderError

                        raise PaymentProviderError(
                            "the refund could not be made yet; cancel again to finish",
                            details={"bookingId": booking["id"]},
                            retry_after_ms=1000) from exc
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("UPDATE bookings SET cancelled_at = coalesce(cancelled_at, "
                                   "now()) WHERE id = $1", booking["id"])
                await _audit(conn, f"{booking['id']}:cancelled", rid, "booking.cancelled", {
                    "bookingId": booking["id"], "cancelledBy": cancellation["cancelled_by"],
                    "reason": cancellation["reason"],
                    "requesterRefundAmount": cancellation["requester_refund_amount"],
                    "vendorRefundAmount": cancellation["vendor_refund_amount"]})
                done = await conn.fetchrow(
                    "UPDATE booking_cancellations SET completed_at = now() WHERE booking_id = $1"
                    " RETURNING *", booking["id"])
        await self._free_units(booking, done)
        return done

    async def _free_units(self, booking, cancellation) -> None:
        """Free the booking's units and record the reservation's COMMITTED -> CANCELLED in
        the same script (lua/free_booked.lua): the commit queue writes it to Postgres and
        the outbox (``booking.cancelled``, issue 14), once: a repeated call finds the record
        cancelled, or (record gone) repeats the same event id."""
        keys, catalog = self.engine.keys, self.engine.catalog
        resource_id, rid = booking["resource_id"], booking["reservation_id"]
        shard = keys.shard_of_id(rid)  # the reservation's units live on its shard
        if resource_id in catalog:
            unit_ms = catalog.get(resource_id).unit_ms
            start = int(booking["block_start"].timestamp() * 1000)
            end = int(booking["block_end"].timestamp() * 1000)
            first, last = start // unit_ms, end // unit_ms - 1
        else:  # markers expire by themselves; rehydration skips cancelled bookings
            first = last = 0
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT state, version FROM reservations WHERE id = $1",
                                      rid)
        fallback = 0 if row is None or row["state"] == "CANCELLED" else row["version"] + 1
        metadata = {"bookingCancellation": {
            "bookingId": booking["id"], "cancelledBy": cancellation["cancelled_by"],
            "requesterRefundAmount": cancellation["requester_refund_amount"],
            "vendorRefundAmount": cancellation["vendor_refund_amount"],
            "currency": cancellation["currency"]}}
        await self.engine.access.call(
            "free_booked", [keys.unit_root(shard), keys.reservation(rid), keys.history(rid),
                            keys.events(shard)],
            [resource_id, first, last, rid, fallback, cancellation["cancelled_by"],
             cancellation["reason"] or "", orjson.dumps(metadata).decode()])
