"""ReservationEngine: holds that move through the lifecycle, atomically in Lua.

Creation holds every unit and walks the reservation as far as its vendor's policy allows;
each later step is one ``transition`` script call (compare-and-set on the version, mandatory
revalidation, staged TTLs, the event appended to the shard's commit-queue stream). Only the
commit-queue worker sets COMMITTED (``finalize_commit``), after the booking row is committed
in Postgres.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import orjson

from engine.access import RedisAccess
from engine.errors import (
    CommitInProgress,
    EngineError,
    ExtensionLimit,
    HoldIdReused,
    HoldLost,
    InvalidTransition,
    MaxHoldDuration,
    NotFound,
    NotReady,
    Outcome,
    PaymentRequired,
    ReservationExpired,
    TerminalState,
    ValidationError,
    VersionMismatch,
)
from engine.holds import call_with_retry, conflict_from_reply
from engine.keys import NAME_RE, KeySpace
from engine.lifecycle import ACTIONS, MAIN_PATH, TERMINAL, State, creation_stage
from engine.limits import PROVISIONAL_MARGIN_MS, Limits
from engine.resources import ResourceCatalog
from engine.settings import Settings

MAX_METADATA_BYTES = 4096
MAX_TEXT = 256
ACTORS = frozenset({"system", "vendor", "requester", "partner", "timeout", "ops", "admin"})


@dataclass(frozen=True, slots=True)
class Moved:
    """The outcome of a transition: where the reservation stopped."""

    reservation_id: str
    state: State
    version: int
    deadline_ms: int


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
        """Hold the slot and walk the new reservation as far as the vendor allows.

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
            raise PaymentRequired("this vendor requires payment and no payment provider is "
                                  "configured", details={"vendorId": vendor.id})
        _check_name("partnerId", partner_id)
        _check_text("requesterId", requester_id)
        _check_actor(triggered_by)
        first, last = resource.units(start_ms, end_ms, self.settings.max_hold_units)
        block_start, block_end = resource.unit_span_ms(first, last)
        metadata_text = _metadata_text(metadata)
        if reservation_id is None:
            reservation_id = self.keys.new_reservation_id(resource.id)
        s = self.settings
        argv = [reservation_id, partner_id, vendor.id, resource.id, requester_id, start_ms,
                end_ms, first, last, block_start, block_end, int(vendor.confirmation_required),
                int(vendor.payment_required), metadata_text, idempotency_key, triggered_by,
                s.hold_ttl_ms, s.confirmed_ttl_ms, s.authorized_ttl_ms, s.max_hold_units,
                s.record_retention_ms]
        if self.limits is None:
            if admission is not None:
                await admission
            return await self._hold(reservation_id, resource.id, argv)
        # The cap entry expires with the deadline the new reservation will stop under (the
        # vendor's policy decides it), plus a margin for the clock between the two scripts:
        # no third call is needed to move it.
        stage = creation_stage(vendor.confirmation_required, vendor.payment_required)
        ttl = {"hold": s.hold_ttl_ms, "confirmed": s.confirmed_ttl_ms,
               "authorized": s.authorized_ttl_ms}[stage]
        cap = self.limits.acquire_cap(partner_id, reservation_id,
                                      ttl_ms=ttl + PROVISIONAL_MARGIN_MS)
        if admission is None:
            await cap
        else:
            took, admitted = await asyncio.gather(cap, admission, return_exceptions=True)
            if isinstance(admitted, BaseException):
                if not isinstance(took, BaseException):
                    await self.limits.release_cap(partner_id, reservation_id, placed=False)
                raise admitted
            if isinstance(took, BaseException):
                raise took
        try:
            return await self._hold(reservation_id, resource.id, argv)
        except EngineError:  # a definite answer: nothing was held, give the slot back
            await self.limits.release_cap(partner_id, reservation_id, placed=False)
            raise

    async def _hold(self, reservation_id: str, resource_id: str, argv: list) -> Moved:
        shard = self.keys.shard_of(resource_id)
        reply = await call_with_retry(
            self.access,
            "create_reservation",
            [self.keys.unit_root(shard), self.keys.reservation(reservation_id),
             self.keys.history(reservation_id), self.keys.fence(resource_id),
             self.keys.events(shard), self.keys.deadlines(shard), self.keys.ready(shard)],
            argv,
        )
        code = int(reply[0])
        if code == Outcome.OK:
            return Moved(reservation_id, State(reply[1]), int(reply[2]), int(reply[3]))
        if code == Outcome.CONFLICT:
            raise conflict_from_reply(reply, resource_id)
        if code == Outcome.HOLD_ID_REUSED:
            raise HoldIdReused("reservation id already in use",
                               details={"reservationId": reservation_id})
        if code == Outcome.NOT_READY:
            raise NotReady("booked markers are being restored; try again shortly",
                           details={"shard": shard}, retry_after_ms=1000)
        raise ValidationError(str(reply[1]))

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
        raw = reply[1]
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
            history=[step for e in reply[2]
                     for step in _history_entries(reservation_id, e, rec)],
        )

    # ---- transitions ------------------------------------------------------------------
    async def act(self, reservation_id: str, action: str, *, actor: str,
                  expected_version: int | None = None, reason: str = "",
                  metadata: dict[str, Any] | None = None, idempotency_key: str = "",
                  booking_id: str = "") -> Moved:
        """Apply a named action of the lifecycle table (see engine/lifecycle.py ACTIONS)."""
        if action not in ACTIONS:
            raise ValidationError(f"unknown action {action!r}")
        return await self._transition(reservation_id, action, actor, expected_version, reason,
                                      metadata, idempotency_key, booking_id=booking_id)

    async def extend(self, reservation_id: str, *, actor: str, ttl_ms: int | None = None,
                     expected_version: int | None = None, reason: str = "") -> Moved:
        """Push the deadline to now + ttl, bounded by count and total hold time."""
        ttl = self.settings.hold_ttl_ms if ttl_ms is None else ttl_ms
        if not isinstance(ttl, int) or ttl <= 0:
            raise ValidationError("ttl must be a positive number of milliseconds")
        return await self._transition(reservation_id, "extend", actor, expected_version,
                                      reason, None, "", extend_ttl_ms=ttl)

    async def expire(self, reservation_id: str) -> Moved | None:
        """Expire an overdue reservation; None if it is not due (extended meanwhile),
        already terminal, or committing. Safe to race: one caller applies, others see it."""
        try:
            return await self._transition(reservation_id, "expire", "timeout", None, "",
                                          None, "")
        except (TerminalState, InvalidTransition, NotFound, _NotDue):
            return None

    async def due(self, shard: int, limit: int = 500, now_ms: int | None = None) -> list[str]:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return await self.access.redis.zrangebyscore(self.keys.deadlines(shard), "-inf", now,
                                                     start=0, num=limit)

    async def reap(self, shard: int, limit: int = 500) -> list[Moved]:
        """Expire every overdue reservation of one shard (the reaper's tick)."""
        moved = []
        for reservation_id in await self.due(shard, limit):
            result = await self.expire(reservation_id)
            if result is not None:
                moved.append(result)
        return moved

    async def _transition(self, reservation_id: str, op: str, actor: str,
                          expected_version: int | None, reason: str,
                          metadata: dict[str, Any] | None, idempotency_key: str, *,
                          booking_id: str = "", extend_ttl_ms: int = 0) -> Moved:
        _check_actor(actor)
        if expected_version is not None and (not isinstance(expected_version, int)
                                             or expected_version < 0):
            raise ValidationError("expected version must be a non-negative integer")
        if len(reason) > MAX_TEXT:
            raise ValidationError("reason is too long", details={"maxLength": MAX_TEXT})
        metadata_text = _metadata_text(metadata)
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
             reason, metadata_text, idempotency_key, s.hold_ttl_ms, s.confirmed_ttl_ms,
             s.authorized_ttl_ms, s.record_retention_ms, s.booked_marker_retention_ms,
             booking_id, extend_ttl_ms, s.max_hold_total_ms, s.max_extensions],
        )
        code = int(reply[0])
        if code == Outcome.OK:
            moved = Moved(reservation_id, State(reply[1]), int(reply[2]), int(reply[3]))
            await self._settle_cap(reply[4], moved.reservation_id, moved.state,
                                   moved.deadline_ms)
            return moved
        if code in (Outcome.HOLD_LOST, Outcome.EXPIRED):  # it ended: free its cap slot
            await self._settle_cap(reply[3], reservation_id, State(reply[1]), 0)
        raise _error_for(code, reply, reservation_id, op)

    async def _settle_cap(self, partner_id: str, reservation_id: str, state: State,
                          deadline_ms: int) -> None:
        if self.limits is None:
            return
        if state in TERMINAL:
            await self.limits.release_cap(partner_id, reservation_id,
                                          committed=state == State.COMMITTED)
            return
        try:
            await self.limits.touch_cap(partner_id, reservation_id, deadline_ms)
        except NotFound:
            pass  # its slot expired already; it leaves the cap by itself


class _NotDue(EngineError):
    code = "NOT_DUE"


def _error_for(code: int, reply: list, reservation_id: str, op: str) -> EngineError:
    details: dict[str, Any] = {"reservationId": reservation_id}
    if code == Outcome.NOT_FOUND:
        return NotFound("reservation not found", details=details)
    if code == Outcome.VERSION_MISMATCH:
        details["currentVersion"] = int(reply[1])
        return VersionMismatch("the reservation changed since that version", details=details)
    if code == Outcome.TERMINAL:
        details["state"] = reply[1]
        return TerminalState(f"the reservation is {reply[1]}, a terminal state",
                             details=details)
    if code == Outcome.INVALID_TRANSITION:
        details.update(state=reply[1], action=op)
        if reply[1] == State.COMMIT_IN_PROGRESS and op == "cancel":
            return CommitInProgress("the commit is under way and cannot be cancelled",
                                    details=details)
        return InvalidTransition(f"{op} is not allowed in state {reply[1]}", details=details)
    if code == Outcome.HOLD_LOST:
        details.update(state=reply[1], version=int(reply[2]))
        return HoldLost("the hold no longer owns its slot; the reservation failed",
                        details=details)
    if code == Outcome.EXPIRED:
        details.update(state=reply[1], version=int(reply[2]))
        return ReservationExpired("the reservation's deadline passed", details=details)
    if code == Outcome.EXTENSION_LIMIT:
        return ExtensionLimit("the reservation was extended the maximum number of times",
                              details=details)
    if code == Outcome.MAX_DURATION:
        return MaxHoldDuration("the extension would exceed the maximum hold time",
                               details=details)
    if code == Outcome.NOT_DUE:
        return _NotDue("not due yet", details=details)
    return ValidationError(str(reply[1]) if len(reply) > 1 else "invalid request",
                           details=details)


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


def _metadata_text(metadata: dict[str, Any] | None) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, dict):
        raise ValidationError("metadata must be a JSON object", details={"field": "metadata"})
    try:
        text = orjson.dumps(metadata).decode()
    except TypeError as exc:
        raise ValidationError(f"metadata is not JSON-serialisable: {exc}") from None
    if len(text) > MAX_METADATA_BYTES:
        raise ValidationError("metadata is too large",
                              details={"field": "metadata", "maxBytes": MAX_METADATA_BYTES})
    return text


def _check_name(field_name: str, value: str) -> None:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValidationError(f"{field_name} is not a valid id", details={"field": field_name})


def _check_text(field_name: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT:
        raise ValidationError(f"{field_name} must be 1..{MAX_TEXT} characters",
                              details={"field": field_name})


def _check_actor(actor: str) -> None:
    if actor not in ACTORS:
        raise ValidationError(f"unknown actor {actor!r}")
