"""Hold transfer's validation layer (issue 16): who may ask, what exists, every 4xx once,
before the first write; engine/transfer.py executes.

Partners and vendors: the directory (engine/directory.py) binds no partner to a vendor, every
active partner may hold any vendor's slots, so "another partner of the same vendor" is any
other active partner; the reservation keeps its vendor, resource and slot. Should partners
ever be bound to vendors, the check belongs in :meth:`TransferService.offer` and
:meth:`TransferService.accept`, beside the addressee's lookup.
"""

from __future__ import annotations

from typing import Any

from engine import directory
from engine.errors import NotFound, TransferToSelf, ValidationError
from engine.keys import NAME_RE
from engine.lifecycle import PARTNER
from engine.permissions import Principal, require
from engine.reservations import Reservation
from engine.service import MIN_TTL_MS, ReservationService
from engine.transfer import TOKEN_PREFIX, Offer, TransferEngine

MAX_TOKEN_CHARS = 128


class TransferService:
    def __init__(self, reservations: ReservationService, engine: TransferEngine,
                 pool) -> None:
        self.reservations = reservations
        self.engine = engine
        self.pool = pool
        self.settings = reservations.settings

    async def offer(self, principal: Principal, reservation_id: str, *,
                    to_partner_id: str | None = None, ttl_ms: int | None = None,
                    expected_version: int | None = None,
                    client_ip: str | None = None) -> Offer:
        """The holder's one-time acceptance token (addressed to ``to_partner_id``, or to any
        partner when None)."""
        require(principal, "reservation.transfer-offer")
        self.reservations._known_id(reservation_id)  # noqa: SLF001
        if to_partner_id is not None:
            await self._active_partner(to_partner_id)
        ttl = self.settings.transfer_offer_ttl_ms if ttl_ms is None else ttl_ms
        max_ttl = self.settings.transfer_offer_max_ttl_ms
        if not isinstance(ttl, int) or not MIN_TTL_MS <= ttl <= max_ttl:
            raise ValidationError(f"ttlMs must be between {MIN_TTL_MS} and {max_ttl}",
                                  code="INVALID_FIELD",
                                  details={"field": "ttlMs", "minimum": MIN_TTL_MS,
                                           "maximum": max_ttl})
        holder = _partner(principal)
        if to_partner_id == holder:
            raise TransferToSelf("a hold cannot be offered to the partner that holds it",
                                 details={"field": "toPartnerId"})
        await self.reservations.throttle(principal, client_ip)
        try:
            return await self.engine.offer(reservation_id, holder=holder,
                                           to_partner_id=to_partner_id, ttl_ms=ttl,
                                           expected_version=expected_version)
        except NotFound:
            raise _not_found(reservation_id) from None

    async def accept(self, principal: Principal, reservation_id: str, token: Any, *,
                     expected_version: int | None = None, client_ip: str | None = None,
                     request_id: str = "-") -> Reservation:
        """Take over the hold with the token; answers the reservation as the transfer left
        it (version + 1, the caller its partner)."""
        require(principal, "reservation.transfer")
        self.reservations._known_id(reservation_id)  # noqa: SLF001
        if (not isinstance(token, str) or not token.startswith(TOKEN_PREFIX)
                or len(token) > MAX_TOKEN_CHARS):
            raise ValidationError("acceptanceToken is not an acceptance token",
                                  code="INVALID_FIELD", details={"field": "acceptanceToken"})
        done = await self.engine.accept(
            reservation_id, token, _partner(principal), expected_version=expected_version,
            metadata={"requestId": request_id},
            admission=self.reservations._rate_checks(principal, client_ip))  # noqa: SLF001
        return done.reservation

    async def _active_partner(self, partner_id: str) -> None:
        if not isinstance(partner_id, str) or not NAME_RE.match(partner_id):
            raise ValidationError("toPartnerId is not a valid id", code="INVALID_FIELD",
                                  details={"field": "toPartnerId"})
        async with self.pool.acquire() as conn:
            found = await directory.get_partner(conn, partner_id)
        if not found.active:
            raise directory.UnknownPartner(f"partner {partner_id!r} is not active",
                                           details={"partnerId": partner_id})


def _partner(principal: Principal) -> str:
    if principal.role != PARTNER or not principal.partner_id:  # the permission table says so
        raise ValidationError("only a partner key holds reservations")
    return principal.partner_id


def _not_found(reservation_id: str) -> NotFound:
    return NotFound("reservation not found", details={"reservationId": reservation_id})
