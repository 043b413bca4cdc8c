"""Abuse controls of the partner API: rate limits, live-hold caps, partner reputation.

**Rate limits** (per partner and per client IP) use GCRA in ``lua/rate_limit.lua``: one
key per limiter holding a theoretical arrival time, the server clock, integer microseconds.
A rested limiter lets ``burst`` requests through at once, then one per emission interval
(``60 s / rate per minute``); a refusal says exactly how long to wait.

**Hold caps** keep a sorted set per partner, hold id scored by its expiry, so entries leave
by themselves when holds expire (each script first drops expired entries), and on release
(cancel, commit, compensation). The set also feeds the partner's reputation counters:
``placed`` counts first acquisitions (less those compensated because the hold never
landed), ``committed`` counts releases of committed holds.

The cap lives under the partner's hash tag and the hold under its resource's shard: no
script may touch both. :func:`place_with_cap` is the one place that composes them, as two
calls with compensation (see its docstring).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from engine.access import RedisAccess
from engine.errors import EngineError, Outcome, ValidationError, error_for
from engine.keys import NAME_RE, KeySpace
from engine.lifecycle import SYSTEM_SCOPE
from engine.settings import Settings

log = logging.getLogger("slotguard.limits")
T = TypeVar("T")

# A provisional cap entry (taken before its hold exists) outlives the hold's ttl by this much,
# so a crash between placing the hold and moving the entry to the hold's real expiry cannot
# free the slot while the hold still lives.
PROVISIONAL_MARGIN_MS = 2_000


@dataclass(frozen=True, slots=True)
class Reputation:
    placed: int
    committed: int

    @property
    def ratio(self) -> float | None:
        """Committed per placed hold; ``None`` before the partner placed any."""
        return self.committed / self.placed if self.placed else None

    def as_dict(self) -> dict:
        return {"placed": self.placed, "committed": self.committed, "ratio": self.ratio}


def check_partner_id(partner_id: str) -> str:
    """A partner id, or the system scope (which no partner id can equal)."""
    if partner_id == SYSTEM_SCOPE:
        return partner_id
    if not isinstance(partner_id, str) or not NAME_RE.match(partner_id):
        raise ValidationError("invalid partner id", details={"partnerId": str(partner_id)[:80]})
    return partner_id


def normalize_ip(client_ip: str) -> str:
    """One spelling per address (``::0001`` and ``::1`` share a limiter)."""
    try:
        return ipaddress.ip_address(client_ip).compressed
    except (TypeError, ValueError):
        raise ValidationError("invalid client ip", details={"clientIp": str(client_ip)[:80]}) \
            from None


class Limits:
    def __init__(self, access: RedisAccess, keys: KeySpace, settings: Settings) -> None:
        self.access = access
        self.keys = keys
        self.settings = settings

    # ---- rate limits --------------------------------------------------------------------
    async def check_partner_rate(self, partner_id: str, cost: int = 1) -> int | None:
        """Count one request of the partner; raise RateLimited when over its rate.

        Returns how many more requests could pass right now, or ``None`` when unlimited.
        """
        check_partner_id(partner_id)
        return await self._gcra(self.keys.partner_rate(partner_id),
                                self.settings.partner_rate_per_minute,
                                self.settings.partner_rate_burst, cost,
                                {"partnerId": partner_id})

    async def check_ip_rate(self, client_ip: str, cost: int = 1) -> int | None:
        """Count one request from a client IP; raise RateLimited when over its rate."""
        ip = normalize_ip(client_ip)
        return await self._gcra(self.keys.ip_rate(ip), self.settings.ip_rate_per_minute,
                                self.settings.ip_rate_burst, cost, {"clientIp": ip})

    async def check_auth_failures(self, client_ip: str) -> int | None:
        """Count one failed authentication from a client IP; RateLimited when over."""
        ip = normalize_ip(client_ip)
        return await self._gcra(self.keys.auth_failures(ip),
                                self.settings.auth_failure_rate_per_minute,
                                self.settings.auth_failure_burst, 1, {"clientIp": ip})

    async def _gcra(self, key: str, rate_per_minute: int, burst: int, cost: int,
                    details: dict) -> int | None:
        if rate_per_minute == 0:  # unlimited: no round trip at all
            return None
        # A burst of 0 would refuse everything forever; 1 is the strictest meaningful value.
        burst = max(1, burst)
        if not isinstance(cost, int) or cost < 1 or cost > burst:
            raise ValidationError("cost must be between 1 and the burst", details=details)
        reply = await self.access.call("rate_limit", [key], [rate_per_minute, burst, cost])
        if int(reply[0]) == Outcome.OK:
            return int(reply[1])
        raise error_for(reply, details=details)

    # ---- hold caps ----------------------------------------------------------------------
    async def acquire_cap(self, partner_id: str, hold_id: str, expires_at_ms: int | None = None,
                          *, ttl_ms: int | None = None) -> int:
        """Take a live-hold slot for ``hold_id``; raise CapExceeded when the partner is full.

        Give the hold's expiry (server clock, as the hold scripts report it) or, before the
        hold exists, ``ttl_ms`` from the server's now. Acquiring an id that already holds a
        slot only moves its expiry. With ``partner_max_live_holds = 0`` nothing is refused,
        but the slot is still recorded so reputation counts and live-hold counts stay true.
        Returns the partner's live holds after the call.
        """
        return (await self.acquire_cap_slot(partner_id, hold_id, expires_at_ms,
                                            ttl_ms=ttl_ms))[0]

    async def acquire_cap_slot(self, partner_id: str, hold_id: str,
                               expires_at_ms: int | None = None, *,
                               ttl_ms: int | None = None) -> tuple[int, bool]:
        """:meth:`acquire_cap`, also telling whether this call added the slot (False: the id
        already held one, so compensation must not take it away)."""
        check_partner_id(partner_id)
        if (expires_at_ms is None) == (ttl_ms is None):
            raise ValidationError("give exactly one of expires_at_ms and ttl_ms")
        if expires_at_ms is not None and expires_at_ms <= 0:
            raise ValidationError("expires_at_ms must be positive")
        if ttl_ms is not None and ttl_ms <= 0:
            raise ValidationError("ttl_ms must be positive")
        max_live = self.settings.partner_max_live_holds
        reply = await self.access.call(
            "cap_acquire",
            [self.keys.partner_holds(partner_id), self.keys.partner_reputation(partner_id)],
            [hold_id, expires_at_ms or 0, ttl_ms or 0, max_live],
        )
        code = int(reply[0])
        if code == Outcome.OK:
            return int(reply[1]), int(reply[2]) == 1
        raise error_for(reply, max_live=max_live,
                        details={"partnerId": partner_id, "holdId": hold_id})

    async def release_cap(self, partner_id: str, hold_id: str, committed: bool = False, *,
                          placed: bool = True) -> bool:
        """Free the hold's slot; True when it held one (a repeat is a harmless False).

        ``committed=True`` counts the commit toward the partner's reputation, once.
        ``placed=False`` is compensation for a hold that never landed: its acquisition is
        taken back out of the ``placed`` counter.
        """
        check_partner_id(partner_id)
        if committed and not placed:
            raise ValidationError("a hold that was never placed cannot have been committed")
        why = "committed" if committed else ("released" if placed else "not_placed")
        reply = await self.access.call(
            "cap_release",
            [self.keys.partner_holds(partner_id), self.keys.partner_reputation(partner_id)],
            [hold_id, why],
        )
        if int(reply[0]) != Outcome.OK:
            raise ValidationError(str(reply[1]))
        return int(reply[1]) == 1

    async def touch_cap(self, partner_id: str, hold_id: str, expires_at_ms: int) -> None:
        """Move the hold's slot to its new expiry (after extend); NotFound if it has none."""
        check_partner_id(partner_id)
        if expires_at_ms <= 0:
            raise ValidationError("expires_at_ms must be positive")
        reply = await self.access.call(
            "cap_touch", [self.keys.partner_holds(partner_id)], [hold_id, expires_at_ms])
        if int(reply[0]) != Outcome.OK:
            raise error_for(reply, subject="cap slot",
                            details={"partnerId": partner_id, "holdId": hold_id})

    # ---- cap bookkeeping the caller does not wait for ----------------------------------
    # Queued on the access layer at once (so every later call of this process is ordered
    # after it on the same connection) but not awaited: the response that caused it does not
    # wait a second round trip. A lost call heals by itself (cap entries expire).
    def release_cap_soon(self, partner_id: str, hold_id: str, committed: bool = False, *,
                         placed: bool = True) -> asyncio.Future:
        check_partner_id(partner_id)
        why = "committed" if committed else ("released" if placed else "not_placed")
        return _logged(self.access.call(
            "cap_release",
            [self.keys.partner_holds(partner_id), self.keys.partner_reputation(partner_id)],
            [hold_id, why]))

    def touch_cap_soon(self, partner_id: str, hold_id: str,
                       expires_at_ms: int) -> asyncio.Future:
        check_partner_id(partner_id)
        return _logged(self.access.call(
            "cap_touch", [self.keys.partner_holds(partner_id)], [hold_id, expires_at_ms]))

    async def live_holds(self, partner_id: str) -> int:
        """Cap slots of the partner whose hold has not expired."""
        return (await self._usage(partner_id))[0]

    async def reputation(self, partner_id: str) -> dict:
        """``{"placed", "committed", "ratio"}``; ratio is ``None`` before any placement."""
        _, placed, committed = await self._usage(partner_id)
        return Reputation(placed, committed).as_dict()

    async def _usage(self, partner_id: str) -> tuple[int, int, int]:
        check_partner_id(partner_id)
        reply = await self.access.call(
            "partner_usage",
            [self.keys.partner_holds(partner_id), self.keys.partner_reputation(partner_id)],
            [],
        )
        return int(reply[1]), int(reply[2]), int(reply[3])


def _logged(future: asyncio.Future) -> asyncio.Future:
    def done(f: asyncio.Future) -> None:
        if f.cancelled():
            return
        exc = f.exception()
        if exc is not None:
            log.warning("cap bookkeeping failed (the entry expires by itself): %r", exc)
    future.add_done_callback(done)
    return future


async def with_cap_slot(acquire: Awaitable[T], admission: Sequence[Awaitable],
                        give_back: Callable[[T], object]) -> T:
    """Take a cap slot (``acquire``) and pass ``admission`` (rate limits, an idempotency
    claim: whatever must pass before a hold or a waitlist entry is written) in ONE round
    trip: one gather queues every call in the same event-loop turn, so one batch. When an
    admission refuses, a slot that was taken is given back (``give_back(acquired)``, queued)
    and the refusal raised; a refused slot raises its own error (429)."""
    took, *admitted = await asyncio.gather(acquire, *admission, return_exceptions=True)
    refused = next((a for a in admitted if isinstance(a, BaseException)), None)
    if refused is not None:
        if not isinstance(took, BaseException):
            give_back(took)
        raise refused
    if isinstance(took, BaseException):
        raise took
    return took


async def place_with_cap(limits: Limits, holds, partner_id: str, resource_id: str,
                         start_ms: int, end_ms: int, *, ttl_ms: int | None = None,
                         provisional_margin_ms: int = PROVISIONAL_MARGIN_MS):
    """Place a hold under the partner's cap: two scripts in two hash slots, compensated.

    1. Take a provisional cap slot for a fresh hold id (expiring a little after the hold
       would), so that at no instant is a live hold missing from the cap.
    2. Place the hold. If it fails with a definite answer (an :class:`EngineError` such as
       HoldConflict: nothing was written), give the slot back and re-raise.
       If the outcome is unknown (connection lost, cancelled), the hold may have landed, so
       the slot is kept; being provisional, it leaves by itself when such a hold would expire.
    3. Move the slot to the hold's real expiry.

    A crash between any two steps leaves at worst a provisional slot that expires with the
    hold's ttl: the cap never leaks, and never undercounts a live hold.
    ``holds`` is a :class:`benchmarks.holds.HoldEngine` (or anything with its ``place``).
    """
    hold_id = holds.keys.new_hold_id(resource_id)
    ttl = holds.settings.hold_ttl_ms if ttl_ms is None else ttl_ms
    await limits.acquire_cap(partner_id, hold_id, ttl_ms=ttl + provisional_margin_ms)
    try:
        hold = await holds.place(resource_id, start_ms, end_ms, owner=partner_id,
                                 ttl_ms=ttl_ms, hold_id=hold_id)
    except EngineError:
        try:
            await limits.release_cap(partner_id, hold_id, placed=False)
        except Exception:  # the provisional slot expires by itself; report the real failure
            pass
        raise
    await limits.touch_cap(partner_id, hold_id, hold.expires_at_ms)
    return hold
