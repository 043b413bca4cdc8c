"""Hold transfer (issue 16): the mechanism. engine/transfer_service.py validates.

The holder asks for an offer: a one-time acceptance token, stored only as its SHA-256 digest
with an expiry and (optionally) the partner it is addressed to, under the reservation's hash
tag (``lua/transfer_offer.lua``). The new partner accepts with the token: ONE script checks
token, addressee, live pre-commit state and version, changes the record's partner, spends the
token, bumps the version and emits one event naming both partners (``lua/transfer_accept.lua``).

The partners' live-hold caps live under their own hash tags, so they follow the pattern of
engine/limits.py: (1) the same script in check-only mode refuses every bad request without a
write, (2) the new partner's cap slot is taken (429 when full: nothing else happened), (3) the
transfer; a definite refusal of (3) (a racing acceptance won) gives the slot back, a success
releases the old partner's slot and moves the new one to the hold's deadline (both queued).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass

import orjson

from engine.access import RedisAccess
from engine.errors import EngineError, Outcome, ReservationExpired, error_for
from engine.keys import KeySpace
from engine.limits import PROVISIONAL_MARGIN_MS, Limits
from engine.reservations import Reservation, reservation_from

TOKEN_PREFIX = "xfr_"


def new_token() -> str:
    """An acceptance token: 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Offer:
    reservation_id: str
    acceptance_token: str
    to_partner_id: str | None
    expires_at_ms: int
    state: str
    version: int


@dataclass(frozen=True, slots=True)
class Transferred:
    reservation: Reservation
    from_partner_id: str


class TransferEngine:
    def __init__(self, access: RedisAccess, keys: KeySpace, limits: Limits | None) -> None:
        self.access = access
        self.keys = keys
        self.limits = limits

    async def offer(self, reservation_id: str, *, holder: str, to_partner_id: str | None,
                    ttl_ms: int, expected_version: int | None = None) -> Offer:
        token = new_token()
        reply = await self.access.call(
            "transfer_offer",
            [self.keys.reservation(reservation_id), self.keys.transfer_offer(reservation_id)],
            [reservation_id, holder, digest(token), to_partner_id or "", ttl_ms,
             "" if expected_version is None else expected_version])
        if int(reply[0]) != Outcome.OK:
            raise _refusal(reply, reservation_id, "transfer-offer")
        return Offer(reservation_id, token, to_partner_id, int(reply[1]), str(reply[2]),
                     int(reply[3]))

    def _accept(self, reservation_id: str, token: str, partner_id: str,
                expected_version: int | None, metadata: dict, check_only: bool):
        shard = self.keys.shard_of_id(reservation_id)
        return self.access.call(
            "transfer_accept",
            [self.keys.reservation(reservation_id), self.keys.history(reservation_id),
             self.keys.transfer_offer(reservation_id), self.keys.events(shard)],
            [reservation_id, digest(token), partner_id,
             "" if expected_version is None else expected_version,
             orjson.dumps(metadata).decode(), "1" if check_only else ""])

    async def check(self, reservation_id: str, token: str, partner_id: str,
                    expected_version: int | None = None) -> int:
        """Every check of the acceptance, no write; answers the hold's deadline."""
        reply = await self._accept(reservation_id, token, partner_id, expected_version, {},
                                   True)
        if int(reply[0]) != Outcome.OK:
            raise _refusal(reply, reservation_id, "transfer")
        return int(reply[3])

    async def accept(self, reservation_id: str, token: str, partner_id: str, *,
                     expected_version: int | None = None, metadata: dict | None = None,
                     admission: list | None = None) -> Transferred:
        """Check (no write; in one round trip with ``admission``, the rate limits), take the
        new partner's cap slot, transfer; see the module."""
        checked, *admitted = await asyncio.gather(
            self.check(reservation_id, token, partner_id, expected_version),
            *(admission or []), return_exceptions=True)
        for result in admitted:
            if isinstance(result, BaseException):
                raise result
        if isinstance(checked, BaseException):
            raise checked
        deadline = checked
        added = False
        if self.limits is not None:
            _, added = await self.limits.acquire_cap_slot(
                partner_id, reservation_id, deadline + PROVISIONAL_MARGIN_MS)
        try:
            reply = await self._accept(reservation_id, token, partner_id, expected_version,
                                       metadata or {}, False)
        except EngineError:
            if added:
                self.limits.release_cap_soon(partner_id, reservation_id, placed=False)
            raise
        if int(reply[0]) != Outcome.OK:
            if added:  # a racing acceptance (or a change of the hold) won: give it back
                self.limits.release_cap_soon(partner_id, reservation_id, placed=False)
            raise _refusal(reply, reservation_id, "transfer")
        previous, deadline = str(reply[4]), int(reply[3])
        if self.limits is not None:
            self.limits.release_cap_soon(previous, reservation_id)
            self.limits.touch_cap_soon(partner_id, reservation_id, deadline)
        return Transferred(reservation_from(reservation_id, reply[5], reply[6]), previous)


def _refusal(reply: list, reservation_id: str, op: str) -> EngineError:
    if int(reply[0]) == Outcome.EXPIRED:
        # Overdue, not yet recorded (the reaper records it): nothing was written here.
        return ReservationExpired("the reservation's deadline passed",
                                  details={"reservationId": reservation_id,
                                           "state": str(reply[1])})
    return error_for(reply, op=op, details={"reservationId": reservation_id})
