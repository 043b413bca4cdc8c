"""Waitlist handoff (issue 16): the mechanism. engine/waitlist_service.py validates.

A waitlist entry waits for one slot of one resource, or of any member of a resource group
(the hold goes to the member the group's strategy picks; the members share one hash tag;
a group entry is queued on every member, beside the member's own entries, FIFO across
both). Entries live in Redis under the resource's hash tag (``{sg:S}:wl:<entry id>``,
indexed per resource in ``{sg:S}:wli:<resource>`` by last unit), so the script that frees
units (an expiry by the reaper, a cancel, any failure, ``lua/transition.lua``) also places
the new hold for the oldest live entry that can be placed (``lua/lib/serve_waitlist.lua``):
no third party can slip in between. Every create serves the waitlist of the units it would
take first too (direct, pooled: each candidate, multi-resource: each item), so a hold whose
TTL lapsed before the reaper ran still goes to the waiting partner.

An entry counts against its partner's live-hold cap from the moment it waits
(``lua/cap_waitlist.lua``); the cap lives under the partner's hash tag, so its bookkeeping is
a second script: acquired before the entry is written (given back if the entry is refused),
passed to the hold when the entry is fulfilled (queued by whoever ran the handoff: the
reaper, an action, a create), released on withdrawal; an expired entry's slot leaves by
itself (scored by the entry's expiry).

The hold an entry becomes has the id ``rsv_<shard>_<the entry's ULID>`` (one entry, one
hold), ``origin: waitlist`` in its record, its creation event and its metadata.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

import orjson

from engine.access import RedisAccess
from engine.errors import EngineError, NotFound, Outcome, ValidationError, error_for
from engine.keys import KeySpace
from engine.limits import with_cap_slot
from engine.resources import Resource, Vendor
from engine.settings import Settings

log = logging.getLogger("slotguard.waitlist")

STATES = ("waiting", "fulfilled", "expired", "withdrawn")
# A cap slot taken before its entry exists outlives the entry by this much (the two scripts
# read the clock apart), as engine/limits.py PROVISIONAL_MARGIN_MS does for holds.
CAP_MARGIN_MS = 2_000


@dataclass(frozen=True, slots=True)
class Handoff:
    """A hold placed for a waitlist entry by the script that freed its slot."""

    reservation_id: str
    partner_id: str
    entry_id: str
    deadline_ms: int


def handoffs_from(flat: Sequence | None) -> tuple[Handoff, ...]:
    """The flat ``{reservation id, partner id, entry id, deadline, ...}`` list a script
    answers (lua/lib/serve_waitlist.lua) as Handoffs."""
    if not flat:
        return ()
    return tuple(Handoff(str(flat[i]), str(flat[i + 1]), str(flat[i + 2]), int(flat[i + 3]))
                 for i in range(0, len(flat) - 3, 4))


def pass_caps(access: RedisAccess, keys: KeySpace,
              handoffs: Sequence[Handoff]) -> list[asyncio.Future]:
    """Queue, for each handoff, the move of its entry's cap slot to the new hold (never
    refused: the entry held the place). Not awaited by the callers that free units: a lost
    call leaves the entry's slot, which expires with the entry."""
    futures = []
    for h in handoffs:
        future = access.call(
            "cap_waitlist",
            [keys.partner_holds(h.partner_id), keys.partner_reputation(h.partner_id)],
            ["fulfil", h.entry_id, h.deadline_ms, h.reservation_id, 0])
        future.add_done_callback(_log_failure)
        futures.append(future)
    return futures


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("waitlist cap bookkeeping failed (the entry's slot expires by itself): %r",
                    future.exception())


@dataclass(frozen=True, slots=True)
class WaitlistEntry:
    entry_id: str
    state: str
    partner_id: str
    vendor_id: str
    resource_id: str
    requester_id: str
    slot_start_ms: int
    slot_end_ms: int
    created_at_ms: int
    expires_at_ms: int
    reservation_id: str | None = None
    first_unit: int = 0  # the units it waits for (buffers included)
    last_unit: int = 0
    # An entry on a resource group: its id; resource_id is None until it is fulfilled (then
    # the member it got), and queued_on names the member whose queue keys the withdrawal
    # script is given (it derives the others).
    resource_group_id: str | None = None
    queued_on: str = ""


@dataclass(frozen=True, slots=True)
class EntryPlacement:
    """A waitlist entry already validated by the service: the engine only executes it."""

    entry_id: str
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
    ttl_ms: int
    metadata_text: str
    # An entry on a resource group (issue 16): the group, the strategy's choice ('first' or
    # 'tightest') and every member as (resource, first unit, last unit, block start, block
    # end) in the strategy's order; ``resource`` and the units above are the first member's.
    group_id: str = ""
    choice: str = "first"
    members: tuple[tuple[Resource, int, int, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Added:
    entry: WaitlistEntry
    handoffs: tuple[Handoff, ...]


class WaitlistEngine:
    def __init__(self, access: RedisAccess, keys: KeySpace, settings: Settings) -> None:
        self.access = access
        self.keys = keys
        self.settings = settings

    # ---- the cap ------------------------------------------------------------------------
    def _cap(self, partner_id: str, op: str, entry_id: str, expires_at_ms: int,
             reservation_id: str = "") -> asyncio.Future:
        return self.access.call(
            "cap_waitlist",
            [self.keys.partner_holds(partner_id), self.keys.partner_reputation(partner_id)],
            [op, entry_id, expires_at_ms, reservation_id, self.settings.partner_max_live_holds])

    async def _acquire_cap(self, partner_id: str, entry_id: str, expires_at_ms: int) -> None:
        reply = await self._cap(partner_id, "acquire", entry_id, expires_at_ms)
        if int(reply[0]) != Outcome.OK:
            raise error_for(reply, max_live=self.settings.partner_max_live_holds,
                            details={"partnerId": partner_id, "waitlistEntryId": entry_id})

    def release_cap_soon(self, partner_id: str, entry_id: str) -> asyncio.Future:
        future = self._cap(partner_id, "release", entry_id, 0)
        future.add_done_callback(_log_failure)
        return future

    # ---- add ----------------------------------------------------------------------------
    async def add(self, p: EntryPlacement, *, cap_expires_at_ms: int,
                  admission: list[Awaitable] | None = None) -> Added:
        """Take the partner's cap slot (in the same round trip as ``admission``: the rate
        limits), then write the entry and serve the slot's waitlist in one script. A
        refusal in either step gives the cap slot back (queued)."""
        await with_cap_slot(self._acquire_cap(p.partner_id, p.entry_id, cap_expires_at_ms),
                            admission or [],
                            lambda _: self.release_cap_soon(p.partner_id, p.entry_id))
        s = self.settings
        shard = self.keys.shard_of_waitlist_id(p.entry_id)  # the resource's (shard_name)
        group_argv = []
        if p.group_id:
            group_argv = [p.group_id, p.choice, s.pool_fit_window_units, orjson.dumps(
                [[m.id, first, last, bs, be] for m, first, last, bs, be in p.members]).decode()]
        try:
            reply = await self.access.call(
                "waitlist_add",
                [self.keys.unit_root(shard), self.keys.waitlist_entry(p.entry_id),
                 self.keys.waitlist_index(p.resource.id, shard),
                 self.keys.waitlist_queue(p.resource.id, p.first_unit, p.last_unit, shard),
                 self.keys.waitlist_sequence(shard),
                 self.keys.events(shard), self.keys.deadlines(shard)],
                [p.entry_id, p.partner_id, p.vendor.id, p.resource.id, p.requester_id,
                 p.start_ms, p.end_ms, p.first_unit, p.last_unit, p.block_start_ms,
                 p.block_end_ms, int(p.vendor.confirmation_required),
                 int(p.vendor.payment_required), p.metadata_text, p.ttl_ms, s.hold_ttl_ms,
                 s.confirmed_ttl_ms, s.authorized_ttl_ms, s.max_hold_units,
                 s.record_retention_ms, *group_argv])
        except EngineError:
            self.release_cap_soon(p.partner_id, p.entry_id)
            raise
        if int(reply[0]) != Outcome.OK:
            self.release_cap_soon(p.partner_id, p.entry_id)
            raise error_for(reply, subject="waitlist entry",
                            details={"waitlistEntryId": p.entry_id})
        handoffs = handoffs_from(reply[5])
        pass_caps(self.access, self.keys, handoffs)
        entry = WaitlistEntry(
            entry_id=p.entry_id, state=str(reply[1]), partner_id=p.partner_id,
            vendor_id=p.vendor.id, resource_id=str(reply[6]) or None,
            requester_id=p.requester_id, slot_start_ms=p.start_ms, slot_end_ms=p.end_ms,
            created_at_ms=int(reply[4]), expires_at_ms=int(reply[2]),
            reservation_id=str(reply[3]) or None, first_unit=p.first_unit,
            last_unit=p.last_unit, resource_group_id=p.group_id or None,
            queued_on=p.resource.id)
        return Added(entry, handoffs)

    # ---- read and withdraw ----------------------------------------------------------------
    async def read(self, entry_id: str) -> WaitlistEntry | None:
        try:
            key = self.keys.waitlist_entry(entry_id)
        except ValueError:
            return None
        reply = await self.access.call("waitlist_read", [key], [])
        if int(reply[0]) != Outcome.OK:
            return None
        return entry_from(entry_id, reply[1], int(reply[2]))

    async def withdraw(self, entry_id: str, *, partner_scope: str = "") -> WaitlistEntry:
        """Withdraw a waiting entry (NotFound for another partner's); its cap slot is given
        back (queued). WaitlistNotWaiting once fulfilled, expired or withdrawn."""
        try:
            key = self.keys.waitlist_entry(entry_id)
            shard = self.keys.shard_of_waitlist_id(entry_id)
        except ValueError:
            raise NotFound("waitlist entry not found",
                           details={"waitlistEntryId": entry_id}) from None
        found = await self.read(entry_id)
        if found is None or (partner_scope and found.partner_id != partner_scope):
            raise NotFound("waitlist entry not found", details={"waitlistEntryId": entry_id})
        reply = await self.access.call(
            "waitlist_withdraw",
            [key, self.keys.waitlist_index(found.queued_on, shard),
             self.keys.waitlist_queue(found.queued_on, found.first_unit, found.last_unit,
                                      shard)],
            [entry_id, partner_scope])
        if int(reply[0]) != Outcome.OK:
            raise error_for(reply, subject="waitlist entry",
                            details={"waitlistEntryId": entry_id})
        self.release_cap_soon(found.partner_id, entry_id)
        return WaitlistEntry(**{**_fields(found), "state": "withdrawn"})


def _fields(entry: WaitlistEntry) -> dict:
    return {name: getattr(entry, name) for name in WaitlistEntry.__slots__}


def entry_from(entry_id: str, raw: list, now_ms: int) -> WaitlistEntry:
    """An entry's hash (HGETALL's flat list) as read at the server's ``now_ms``: a waiting
    entry past its expiry reads as expired."""
    e = dict(zip(raw[::2], raw[1::2]))
    state = e["st"]
    expires_at = int(e["x"])
    if state == "waiting" and expires_at <= now_ms:
        state = "expired"
    if state not in STATES:
        raise ValidationError(f"waitlist entry {entry_id} has an unknown state {state!r}")
    members = orjson.loads(e["gc"]) if e.get("gc") else []
    return WaitlistEntry(
        entry_id=entry_id, state=state, partner_id=e["p"], vendor_id=e["vd"],
        resource_id=e["rs"] or None, requester_id=e["rq"], slot_start_ms=int(e["s"]),
        slot_end_ms=int(e["e"]), created_at_ms=int(e["c"]), expires_at_ms=expires_at,
        reservation_id=e.get("r") or None, first_unit=int(e["f"]), last_unit=int(e["l"]),
        resource_group_id=e.get("g") or None,
        queued_on=str(members[0][0]) if members else e["rs"])
