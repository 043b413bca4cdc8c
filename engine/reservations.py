"""ReservationEngine: holds that move through the lifecycle, atomically in Lua.

Creation holds every unit and walks the reservation as far as its vendor's policy allows;
each later step is one ``transition`` script call (compare-and-set on the version, mandatory
revalidation, staged TTLs, the event appended to the shard's commit-queue stream). Only the
commit-queue worker sets COMMITTED (``finalize_commit``), after the booking row is committed
in Postgres.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import orjson

from engine import clock
from engine.access import RedisAccess
from engine.errors import EngineError, NotDue, NotFound, Outcome, ValidationError, error_for
from engine.holds import call_with_retry
from engine.keys import NAME_RE, KeySpace
from engine.lifecycle import (
    ACTIONS,
    ACTORS,
    MAIN_PATH,
    SYSTEM_SCOPE,
    TERMINAL,
    State,
    creation_stage,
)
from engine.limits import PROVISIONAL_MARGIN_MS, Limits, with_cap_slot
from engine.resources import Resource, ResourceCatalog, Vendor
from engine.settings import Settings

MAX_METADATA_BYTES = 4096
MAX_TEXT = 256


@dataclass(frozen=True, slots=True)
class Moved:
    """The outcome of a transition: where the reservation stopped. ``reservation`` is the
    record as the same script left it, when the caller asked for it."""

    reservation_id: str
    state: State
    version: int
    deadline_ms: int
    reservation: Reservation | None = None
    resource_id: str | None = None  # the member a pooled hold chose (issue 16)
    # Holds the same script placed for waitlist entries on the units it freed (issue 16).
    handoffs: tuple = ()


@dataclass(frozen=True, slots=True)
class Reaped:
    """One reaper call on one shard: what it expired, the Redis time it ran at, the next
    deadline in the shard's index after that (None when there is none), and whether the
    call's limit left due reservations for another call."""

    moved: list[Moved]
    now_ms: int
    next_deadline_ms: int | None
    more: bool


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    state: State
    version: int
    partner_id: str
    vendor_id: str
    resource_id: str
    requester_id: str
    slot_start_ms: int
    slot_end_ms: int
    block_start_ms: int
    block_end_ms: int
    created_at_ms: int
    deadline_ms: int
    confirmation_required: bool
    payment_required: bool
    extensions: int = 0
    booking_id: str | None = None
    failure_reason: str | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    # A multi-resource reservation's items (issue 16): (resource, slot start ms, slot end
    # ms, first unit, last unit, block start ms, block end ms); None for one resource.
    items: list[tuple] | None = None


@dataclass(frozen=True, slots=True)
class Placement:
    """A creation already validated (by the service, or by :meth:`ReservationEngine.create`):
    the engine only executes it."""

    reservation_id: str
    partner_id: str
    vendor: Vendor
    resource: Resource
    start_ms: int
    end_ms: int
    first_unit: int
    last_unit: int
    block_start_ms: int
    block_end_ms: int
    requester_id: str
    metadata_text: str
    idempotency_key: str
    triggered_by: str
    # The availability rules revision the slot was checked against (issue 13); '' when the
    # caller checked none. The hold script refuses it as RULES_STALE once a newer one is
    # published beside the resource's units.
    rules_revision: str = ""
    pool: Any = None  # engine.pool.PoolChoice: a pooled hold picks among these (issue 16)
    # A multi-resource reservation (issue 16): every item as (resource, slot start ms, slot
    # end ms, first unit, last unit, block start ms, block end ms), held all or nothing.
    items: tuple | None = None


class ReservationEngine:
    def __init__(self, access: RedisAccess, keys: KeySpace, catalog: ResourceCatalog,
                 settings: Settings, *, payments_enabled: bool = False,
                 limits: Limits | None = None) -> None:
        self.access = access
        # With limits, every reservation holds a slot of its partner's live-hold cap from
        # creation to its terminal state (two hash slots: compensated, never leaked).
        self.limits = limits
        self.keys = keys
        self.catalog = catalog
        self.settings = settings
        # True once a payment provider drives the authorization actions (Stripe is a later
        # issue). Until then payment-required vendors are refused at creation.
        self.payments_enabled = payments_enabled

    # ---- creation ---------------------------------------------------------------------
    async def create(self, *, partner_id: str, vendor_id: str, resource_id: str | None,
                     start_ms: int, end_ms: int, requester_id: str,
                     metadata: dict[str, Any] | None = None, idempotency_key: str = "",
                     triggered_by: str = "partner", reservation_id: str | None = None,
                     admission: Awaitable | None = None) -> Moved:
        """Hold the slot and walk the new reservation as far as the vendor allows: the
        engine's own entry point (workers, tests, benchmarks), which validates its input and
        then places it (:meth:`place`). The API goes through engine/service.py, which validates
        once and calls :meth:`place` directly.

        Raises HoldConflict when a unit (buffers included) is held or booked. Idempotent per
        reservation id: a retried call that already landed answers as the first one did.
        ``admission`` (e.g. the caller's rate limits) runs in the same Redis round trip as
        the cap acquisition; if it refuses, the cap slot is given back and nothing is held.
        """
        vendor = self.catalog.vendor(vendor_id)
        resource = self.catalog.get(resource_id or vendor.default_resource_id)
        if resource.vendor_id and resource.vendor_id != vendor.id:
            raise ValidationError("resource does not belong to vendor",
                                  details={"resourceId": resource.id, "vendorId": vendor.id})
        if vendor.payment_required and not self.payments_enabled:
            raise _payment_required(vendor.id)
        _check_name("partnerId", partner_id)
        _check_text("requesterId", requester_id)
        placement = self.placement(
            partner_id=partner_id, vendor=vendor, resource=resource, start_ms=start_ms,
            end_ms=end_ms, requester_id=requester_id, metadata_text=metadata_text(metadata),
            idempotency_key=idempotency_key, triggered_by=triggered_by,
            reservation_id=reservation_id)
        return await self.place(placement, [admission] if admission is not None else [])

    def placement(self, *, partner_id: str, vendor: Vendor, resource: Resource,
                  start_ms: int, end_ms: int, requester_id: str, metadata_text: str,
                  idempotency_key: str, triggered_by: str,
                  reservation_id: str | None = None) -> Placement:
        """The unit arithmetic of a creation (ValidationError when the slot is off the grid
        or too long)."""
        _check_actor(triggered_by)
        first, last = resource.units(start_ms, end_ms, self.settings.max_hold_units)
        block_start, block_end = resource.unit_span_ms(first, last)
        return Placement(
            reservation_id=reservation_id or self.keys.new_reservation_id(resource.shard_name),
            partner_id=partner_id, vendor=vendor, resource=resource, start_ms=start_ms,
            end_ms=end_ms, first_unit=first, last_unit=last, block_start_ms=block_start,
            block_end_ms=block_end, requester_id=requester_id, metadata_text=metadata_text,
            idempotency_key=idempotency_key, triggered_by=triggered_by)

    async def place(self, p: Placement, admission: list[Awaitable] | None = None) -> Moved:
        """Execute a validated creation in at most two Redis round trips: (1) the partner's
        cap slot together with ``admission`` (rate limits, the idempotency claim: anything
        that must pass before the hold), (2) the hold. A refusal in (1) gives the cap slot
        back; a definite failure of (2) gives it back without the caller waiting for it."""
        admission = admission or []
        s = self.settings
        vendor, resource = p.vendor, p.resource
        argv = [p.reservation_id, p.partner_id, vendor.id, resource.id, p.requester_id,
                p.start_ms, p.end_ms, p.first_unit, p.last_unit, p.block_start_ms,
                p.block_end_ms, int(vendor.confirmation_required), int(vendor.payment_required),
                p.metadata_text, p.idempotency_key, p.triggered_by, s.hold_ttl_ms,
                s.confirmed_ttl_ms, s.authorized_ttl_ms, s.max_hold_units,
                s.record_retention_ms, p.rules_revision]
        if self.limits is None:
            for result in await asyncio.gather(*admission, return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result
            return await self._hold(p.reservation_id, resource, argv, p.pool, p.items)
        # The cap entry expires with the deadline the new reservation will stop under (the
        # vendor's policy decides it), plus a margin for the clock between the two scripts:
        # no third call is needed to move it.
        stage = creation_stage(vendor.confirmation_required, vendor.payment_required)
        ttl = {"hold": s.hold_ttl_ms, "confirmed": s.confirmed_ttl_ms,
               "authorized": s.authorized_ttl_ms}[stage]
        took = await with_cap_slot(
            self.limits.acquire_cap_slot(p.partner_id, p.reservation_id,
                                         ttl_ms=ttl + PROVISIONAL_MARGIN_MS),
            admission,
            lambda took: took[1] and self.limits.release_cap_soon(
                p.partner_id, p.reservation_id, placed=False))
        return await self._hold_or_give_back(p, took[1], argv)

    async def _hold_or_give_back(self, p: Placement, cap_added: bool, argv: list) -> Moved:
        try:
            return await self._hold(p.reservation_id, p.resource, argv, p.pool, p.items)
        except EngineError:  # a definite answer: nothing was held, give the slot back
            if cap_added:
                self.limits.release_cap_soon(p.partner_id, p.reservation_id, placed=False)
            raise

    async def _hold(self, reservation_id: str, resource: Resource, argv: list,
                    pool: Any = None, items: tuple | None = None) -> Moved:
        if items is not None:
            return await self._hold_items(reservation_id, resource, argv, items)
        if pool is not None:
            return await self._hold_pooled(reservation_id, resource, argv, pool)
        resource_id = resource.id
        shard = self.keys.shard_of(resource.shard_name)
        reply = await call_with_retry(
            self.access,
            "create_reservation",
            [self.keys.unit_root(shard), self.keys.reservation(reservation_id),
             self.keys.history(reservation_id),
             self.keys.fence(resource_id, resource.shard_name),
             self.keys.events(shard), self.keys.deadlines(shard), self.keys.ready(shard),
             self.keys.availability_revision(resource_id, resource.shard_name)],
            argv,
        )
        if int(reply[0]) == Outcome.OK:
            return Moved(reservation_id, State(reply[1]), int(reply[2]), int(reply[3]))
        if int(reply[0]) == Outcome.CONFLICT and len(reply) > 3:
            self._handed_off(reply[3])  # the slot's waitlist came first (issue 16)
        raise error_for(reply, resource_id=resource_id,
                        details={"reservationId": reservation_id, "shard": shard})

    async def _hold_pooled(self, reservation_id: str, resource: Resource, argv: list,
                           pool: Any) -> Moved:
        """A pooled hold (lua/create_pooled_reservation.lua): ``argv`` is the single-resource
        creation's, re-laid for the pooled script with the candidates in strategy order."""
        shard = self.keys.shard_of(resource.shard_name)
        s = self.settings
        candidates: list = []
        for member, first, last, block_start, block_end in pool.candidates:
            candidates += [member.id, first, last, block_start, block_end]
        pooled_argv = [argv[0], argv[1], argv[2], pool.group_id, argv[4], argv[5], argv[6],
                       "tightest" if pool.tightest else "first", s.pool_fit_window_units,
                       argv[11], argv[12], argv[13], argv[14], argv[15], argv[16], argv[17],
                       argv[18], argv[19], argv[20], len(pool.candidates), *candidates,
                       argv[21]]
        reply = await call_with_retry(
            self.access, "create_pooled_reservation",
            [self.keys.unit_root(shard), self.keys.reservation(reservation_id),
             self.keys.history(reservation_id), self.keys.fence_root(shard),
             self.keys.events(shard), self.keys.deadlines(shard), self.keys.ready(shard)],
            pooled_argv)
        if int(reply[0]) == Outcome.OK:
            if len(reply) > 7:
                self._handed_off(reply[7])  # other members' waiting entries came first
            return Moved(reservation_id, State(reply[1]), int(reply[2]), int(reply[3]),
                         resource_id=str(reply[6]))
        if int(reply[0]) == Outcome.POOL_FULL and len(reply) > 2:
            self._handed_off(reply[2])  # the members' waitlists came first (issue 16)
        raise error_for(reply, resource_id=None,
                        details={"reservationId": reservation_id,
                                 "resourceGroupId": pool.group_id})

    async def _hold_items(self, reservation_id: str, resource: Resource, argv: list,
                          items: tuple) -> Moved:
        """A multi-resource hold (lua/create_multi_reservation.lua): every item or none."""
        shard = self.keys.shard_of(resource.shard_name)
        items_text = orjson.dumps([list(i) for i in items]).decode()
        multi_argv = [argv[0], argv[1], argv[2], argv[4], argv[11], argv[12], argv[13],
                      argv[14], argv[15], argv[16], argv[17], argv[18], argv[19], argv[20],
                      items_text, argv[21]]
        reply = await call_with_retry(
            self.access, "create_multi_reservation",
            [self.keys.unit_root(shard), self.keys.reservation(reservation_id),
             self.keys.history(reservation_id), self.keys.fence_root(shard),
             self.keys.events(shard), self.keys.deadlines(shard), self.keys.ready(shard)],
            multi_argv)
        if int(reply[0]) == Outcome.OK:
            return Moved(reservation_id, State(reply[1]), int(reply[2]), int(reply[3]),
                         resource_id=resource.id)
        conflicting = None
        if int(reply[0]) == Outcome.CONFLICT:
            conflicting = items[int(reply[3]) - 1][0]
            if len(reply) > 4:
                self._handed_off(reply[4])  # the items' waitlists came first (issue 16)
        raise error_for(reply, resource_id=conflicting,
                        details={"reservationId": reservation_id})

    def _handed_off(self, flat) -> tuple:
        """Holds a script placed for waitlist entries (issue 16): their cap slots pass from
        the entries to the holds, queued (engine/waitlist.py)."""
        from engine.waitlist import handoffs_from, pass_caps

        handoffs = handoffs_from(flat)
        if handoffs and self.limits is not None:
            pass_caps(self.access, self.keys, handoffs)
        return handoffs

    async def mark_ready(self, shards: list[int] | None = None) -> None:
        """Open shards for new holds (after their booked markers are rehydrated)."""
        pipe = self.access.redis.pipeline(transaction=False)
        for shard in range(self.keys.shards) if shards is None else shards:
            pipe.set(self.keys.ready(shard), "1")
        await pipe.execute()

    async def is_ready(self) -> bool:
        flags = await self.access.redis.exists(*(self.keys.ready(s)
                                                 for s in range(self.keys.shards)))
        return flags == self.keys.shards

    # ---- reads ------------------------------------------------------------------------
    async def get(self, reservation_id: str) -> Reservation | None:
        """The live (or recently terminal) reservation from Redis, or None."""
        try:
            record_keys = [self.keys.reservation(reservation_id),
                           self.keys.history(reservation_id)]
        except ValueError:
            return None
        reply = await self.access.call("read_reservation", record_keys, [])
        if int(reply[0]) != Outcome.OK:
            return None
        return reservation_from(reservation_id, reply[1], reply[2])

    # ---- transitions ------------------------------------------------------------------
    async def act(self, reservation_id: str, action: str, *, actor: str,
                  expected_version: int | None = None, reason: str = "",
                  metadata: dict[str, Any] | None = None, idempotency_key: str = "",
                  booking_id: str = "", scope: tuple[str, str] = ("", ""),
                  with_record: bool = False, wait_cap: bool = True) -> Moved:
        """Apply a named action of the lifecycle table (see engine/lifecycle.py ACTIONS).

        ``scope`` (partner, vendor; '' = any) makes another tenant's reservation NOT_FOUND
        inside the script; ``with_record`` returns the record as the script left it (one
        round trip answers the caller); ``wait_cap=False`` queues the cap bookkeeping
        without waiting for it."""
        if action not in ACTIONS:
            raise ValidationError(f"unknown action {action!r}")
        return await self._transition(reservation_id, action, actor, expected_version, reason,
                                      metadata_text(metadata), idempotency_key,
                                      booking_id=booking_id, scope=scope,
                                      with_record=with_record, wait_cap=wait_cap)

    async def extend(self, reservation_id: str, *, actor: str, ttl_ms: int | None = None,
                     expected_version: int | None = None, reason: str = "",
                     metadata: dict[str, Any] | None = None,
                     scope: tuple[str, str] = ("", ""), with_record: bool = False,
                     wait_cap: bool = True) -> Moved:
        """Push the deadline to now + ttl, bounded by count and total hold time. The
        metadata is recorded on the extension's history entry and event."""
        ttl = self.settings.hold_ttl_ms if ttl_ms is None else ttl_ms
        if not isinstance(ttl, int) or ttl <= 0:
            raise ValidationError("ttl must be a positive number of milliseconds")
        return await self._transition(reservation_id, "extend", actor, expected_version,
                                      reason, metadata_text(metadata), "", extend_ttl_ms=ttl,
                                      scope=scope, with_record=with_record, wait_cap=wait_cap)

    async def modify(self, reservation_id: str, *, actor: str, resource: Resource,
                     start_ms: int, end_ms: int, expected_version: int | None = None,
                     metadata: dict[str, Any] | None = None, partner_scope: str = "",
                     wait_cap: bool = True, reason: str = "") -> Moved:
        """Move a live pre-commit reservation to ``[start_ms, end_ms)`` on ``resource`` (its
        own or another of its vendor's under the same hash tag) in ONE script
        (lua/modify_reservation.lua): all or nothing, same id, version + 1, deadline
        unchanged. HoldConflict leaves the old hold untouched; a resource of another shard
        is ModifyCrossShard. Answers the record as the script left it."""
        from engine.errors import ModifyCrossShard

        _check_actor(actor)
        if expected_version is not None and (not isinstance(expected_version, int)
                                             or expected_version < 0):
            raise ValidationError("expected version must be a non-negative integer")
        try:
            shard = self.keys.shard_of_id(reservation_id)
        except ValueError:
            raise NotFound("reservation not found",
                           details={"reservationId": reservation_id}) from None
        if self.keys.shard_of(resource.shard_name) != shard:
            raise ModifyCrossShard(
                "the resource lives under another shard's hash tag than the reservation: "
                "a move there is not atomic yet", details={"reservationId": reservation_id,
                                                           "resourceId": resource.id})
        first, last = resource.units(start_ms, end_ms, self.settings.max_hold_units)
        block_start, block_end = resource.unit_span_ms(first, last)
        s = self.settings
        reply = await self.access.call(
            "modify_reservation",
            [self.keys.unit_root(shard), self.keys.reservation(reservation_id),
             self.keys.history(reservation_id), self.keys.events(shard),
             self.keys.deadlines(shard), self.keys.ready(shard)],
            [reservation_id, actor, "" if expected_version is None else expected_version,
             partner_scope, resource.id, resource.vendor_id or "", start_ms, end_ms, first,
             last, block_start, block_end, s.max_hold_units, metadata_text(metadata),
             s.record_retention_ms, reason])
        code = int(reply[0])
        if code == Outcome.OK:
            handoffs = self._handed_off(reply[7]) if len(reply) > 7 else ()
            return Moved(reservation_id, State(reply[1]), int(reply[2]), int(reply[3]),
                         reservation_from(reservation_id, reply[5], reply[6]),
                         handoffs=handoffs)
        if code == Outcome.EXPIRED:  # it ended: free its cap slot
            if len(reply) > 4:
                self._handed_off(reply[4])
            await self._settle_cap(reply[3], reservation_id, State(reply[1]), 0, wait_cap)
        raise error_for(reply, op="modify", resource_id=resource.id,
                        details={"reservationId": reservation_id})

    async def expire(self, reservation_id: str) -> Moved | None:
        """Expire an overdue reservation; None if it is not due (extended meanwhile),
        already terminal, or committing. Safe to race: one caller applies, others see it."""
        from engine.errors import InvalidTransition, TerminalState

        try:
            return await self._transition(reservation_id, "expire", "timeout", None, "",
                                          "{}", "")
        except (TerminalState, InvalidTransition, NotFound, NotDue):
            return None

    async def due(self, shard: int, limit: int = 500, now_ms: int | None = None) -> list[str]:
        now = clock.now_ms() if now_ms is None else now_ms
        return await self.access.redis.zrangebyscore(self.keys.deadlines(shard), "-inf", now,
                                                     start=0, num=limit)

    async def reap(self, shard: int, limit: int = 500) -> list[Moved]:
        """Expire every overdue reservation of one shard (up to ``limit``); see
        :meth:`reap_batch`."""
        return (await self.reap_batch(shard, limit)).moved

    async def reap_batch(self, shard: int, limit: int = 500) -> Reaped:
        """The reaper's call: one script (lua/reap.lua) expires the shard's overdue
        reservations at once, each with the writes of :meth:`expire`, and answers when the
        next one is due. Atomic per call: reapers racing over a shard expire each once.

        One call per reservation, even pipelined, kept the reaper seconds behind its
        deadlines under load (issue 14, benchmarks/RESULTS.md)."""
        s = self.settings
        reply = await self.access.call(
            "reap", [self.keys.unit_root(shard), self.keys.events(shard),
                     self.keys.deadlines(shard)],
            [limit, s.record_retention_ms, s.booked_marker_retention_ms])
        if int(reply[0]) != Outcome.OK:
            raise error_for(reply, op="reap", details={"shard": shard})
        moved = [Moved(rid, State(state), int(version), int(deadline),
                       handoffs=self._handed_off(flat))
                 for rid, state, version, deadline, _, flat in reply[4:]]
        # each expired reservation leaves its partner's cap (as expire() does, awaited)
        await asyncio.gather(*(self._settle_cap(row[4], m.reservation_id, m.state,
                                                m.deadline_ms, True)
                               for row, m in zip(reply[4:], moved)))
        following = reply[2]
        return Reaped(moved, int(reply[1]), int(following) if following not in ("", b"")
                      else None, int(reply[3]) == 1)

    async def _transition(self, reservation_id: str, op: str, actor: str,
                          expected_version: int | None, reason: str, metadata: str,
                          idempotency_key: str, *, booking_id: str = "",
                          extend_ttl_ms: int = 0, scope: tuple[str, str] = ("", ""),
                          with_record: bool = False, wait_cap: bool = True) -> Moved:
        _check_actor(actor)
        if expected_version is not None and (not isinstance(expected_version, int)
                                             or expected_version < 0):
            raise ValidationError("expected version must be a non-negative integer")
        if len(reason) > MAX_TEXT:
            raise ValidationError("reason is too long", details={"maxLength": MAX_TEXT})
        try:
            shard = self.keys.shard_of_id(reservation_id)
        except ValueError:
            raise NotFound("reservation not found",
                           details={"reservationId": reservation_id}) from None
        s = self.settings
        reply = await self.access.call(
            "transition",
            [self.keys.unit_root(shard), self.keys.reservation(reservation_id),
             self.keys.history(reservation_id), self.keys.events(shard),
             self.keys.deadlines(shard)],
            [reservation_id, op, actor, "" if expected_version is None else expected_version,
             reason, metadata, idempotency_key, s.hold_ttl_ms, s.confirmed_ttl_ms,
             s.authorized_ttl_ms, s.record_retention_ms, s.booked_marker_retention_ms,
             booking_id, extend_ttl_ms, s.max_hold_total_ms, s.max_extensions,
             scope[0], scope[1], "1" if with_record else ""],
        )
        code = int(reply[0])
        if code == Outcome.OK:
            record = reservation_from(reservation_id, reply[5], reply[6]) if with_record \
                else None
            handoffs = self._handed_off(reply[7]) if len(reply) > 7 else ()
            moved = Moved(reservation_id, State(reply[1]), int(reply[2]), int(reply[3]), record,
                          handoffs=handoffs)
            await self._settle_cap(reply[4], reservation_id, moved.state, moved.deadline_ms,
                                   wait_cap)
            return moved
        if code in (Outcome.HOLD_LOST, Outcome.EXPIRED, Outcome.AVAILABILITY_CHANGED):
            # it ended: free its cap slot; the units it freed served the waitlist (issue 16)
            if len(reply) > 5:
                self._handed_off(reply[5])
            await self._settle_cap(reply[3], reservation_id, State(reply[1]), 0, wait_cap)
        raise error_for(reply, op=op, details={"reservationId": reservation_id})

    async def _settle_cap(self, partner_id: str, reservation_id: str, state: State,
                          deadline_ms: int, wait: bool) -> None:
        """Keep the partner's cap slot in step with the state the transition left. Queued
        at once; awaited only when the caller asks (the API does not wait: every later call
        of this process is ordered after it on the access layer's connection)."""
        if self.limits is None:
            return
        if state in TERMINAL:
            done = self.limits.release_cap_soon(partner_id, reservation_id,
                                                committed=state == State.COMMITTED)
        else:
            done = self.limits.touch_cap_soon(partner_id, reservation_id, deadline_ms)
        if wait:
            try:
                await done
            except NotFound:
                pass  # its slot expired already; it leaves the cap by itself


def _payment_required(vendor_id: str) -> EngineError:
    from engine.errors import PaymentRequired

    return PaymentRequired("this vendor requires payment and no payment provider is "
                           "configured", details={"vendorId": vendor_id})


def reservation_from(reservation_id: str, raw: list, history: list) -> Reservation:
    """The record (HGETALL's flat list) and history (JSON entries) as a Reservation."""
    rec = dict(zip(raw[::2], raw[1::2]))
    return Reservation(
        reservation_id=reservation_id,
        state=State(rec["st"]),
        version=int(rec["v"]),
        partner_id=rec["p"],
        vendor_id=rec["vd"],
        resource_id=rec["rs"],
        requester_id=rec["rq"],
        slot_start_ms=int(rec["s"]),
        slot_end_ms=int(rec["e"]),
        block_start_ms=int(rec["bs"]),
        block_end_ms=int(rec["be"]),
        created_at_ms=int(rec["c"]),
        deadline_ms=int(rec["dl"]),
        confirmation_required=rec.get("cr") == "1",
        payment_required=rec.get("pr") == "1",
        extensions=int(rec.get("x") or 0),
        booking_id=rec.get("bk") or None,
        failure_reason=rec.get("fr") or None,
        idempotency_key=rec.get("ik") or None,
        metadata=orjson.loads(rec.get("md") or "{}"),
        history=[step for e in history
                 for step in _history_entries(reservation_id, e, rec)],
        items=[tuple(i) for i in orjson.loads(rec["it"])] if rec.get("it") else None,
    )


def _history_entries(reservation_id: str, raw: str, record: dict[str, str]
                     ) -> list[dict[str, Any]]:
    """One history entry of Redis (one script call, lua/lib/emit_transition.lua) as one
    dict per transition: a path of waived steps expands into every state it passed, each
    with its own version; metadata belongs to the call's first step. The creation entry's
    metadata and idempotency key are the record's."""
    e = orjson.loads(raw)
    if type(e) is dict:  # the layout before one entry per call: one transition
        e = [e["v"], e["f"], e["t"], e["by"], e["ts"], 1, e.get("r", ""), e.get("m", ""),
             e.get("ik", "")]
    version, from_state, to_state, actor, at = e[:5]
    steps, reason, metadata, key = (e[5:] + [1, "", "", ""][len(e) - 5:])[:4]
    if from_state == State.INTENT_CREATED:
        metadata, key = record.get("md", ""), record.get("ik", "")
    path = [to_state]
    if steps > 1:
        # Several steps in one call only ever follow the main path (waived steps).
        start = MAIN_PATH.index(State(from_state)) + 1
        path = [s.value for s in MAIN_PATH[start:start + steps]]
        if path[-1] != to_state:
            raise ValueError(f"history entry of {reservation_id} leaves the main path")
    first = int(version) - len(path) + 1
    out = []
    for i, state in enumerate(path):
        out.append({
            "id": f"{reservation_id}:{first + i}",
            "reservationId": reservation_id,
            "fromState": from_state,
            "toState": state,
            "triggeredBy": actor,
            "reason": reason or None,
            "metadata": orjson.loads(metadata) if i == 0 and metadata not in ("", "{}")
            else None,
            "timestamp_ms": int(at),
            "idempotencyKey": key or None,
            "version": first + i,
        })
        from_state = state
    return out


def metadata_text(metadata: dict[str, Any] | None) -> str:
    """Metadata as the JSON text the scripts store (the engine's own check: callers outside
    the API; the service validates the client's metadata more strictly first)."""
    if metadata is None:
        return "{}"
    if not isinstance(metadata, dict):
        raise ValidationError("metadata must be a JSON object", details={"field": "metadata"})
    try:
        text = orjson.dumps(metadata).decode()
    except TypeError as exc:
        raise ValidationError(f"metadata is not JSON-serialisable: {exc}") from None
    if len(text) > MAX_METADATA_BYTES + 512:  # room for the server's own requestId
        raise ValidationError("metadata is too large",
                              details={"field": "metadata", "maxBytes": MAX_METADATA_BYTES})
    return text


def _check_name(field_name: str, value: str) -> None:
    if value == SYSTEM_SCOPE:
        return
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValidationError(f"{field_name} is not a valid id", details={"field": field_name})


def _check_text(field_name: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT:
        raise ValidationError(f"{field_name} must be 1..{MAX_TEXT} characters",
                              details={"field": field_name})


def _check_actor(actor: str) -> None:
    if actor not in ACTORS:
        raise ValidationError(f"unknown actor {actor!r}")
