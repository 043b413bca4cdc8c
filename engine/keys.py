"""The Redis key layout: the only module that formats a key string.

Every key of a resource lives under one hash tag ``{sg:<shard>}`` where
``shard = crc32(shard key) mod shards``; a resource's shard key is stored with it
(``resources.shard_key``, migration 0011): its own id for resources created before, its
vendor's id for newer ones (so a vendor's resources share a tag, while vendors spread over
the shards). Code that knows only a resource id (plain holds, benchmarks) passes the id,
which is its shard key unless the catalog says otherwise. So each Lua call touches one hash slot and the same
scripts run on a single Redis or a Redis Cluster. Partner-scoped keys (rate limits, caps,
idempotency) live under ``{sg:p:<partner>}``. A configurable prefix, outside the tag, keeps
deployments (and tests) that share a Redis apart.

Reservation and hold ids carry their shard (``rsv_<shard>_<ulid>``), so any lookup goes
straight to its slot without a global index.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from ulid import ULID

_ID_RE = re.compile(r"^(rsv|hld)_(\d{1,5})_([0-9A-HJKMNP-TV-Z]{26})\Z")
# Resource, vendor and partner ids become part of keys: keep them to a safe alphabet.
# `$`, as the OpenAPI document's pattern (ECMA-262 has no \Z): the two must agree.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
# Waitlist entry ids carry their shard as reservation ids do (issue 16).
_WAITLIST_ID_RE = re.compile(r"^wl_(\d{1,5})_([0-9A-HJKMNP-TV-Z]{26})\Z")


def stable_hash(value: str) -> int:
    """A hash that is the same in every process and every release (unlike ``hash``)."""
    return zlib.crc32(value.encode())


@dataclass(frozen=True, slots=True)
class KeySpace:
    prefix: str
    shards: int

    # ---- shards and ids -------------------------------------------------------------
    def shard_of(self, shard_key: str) -> int:
        """The shard of a shard key (a resource's ``shard_name``; its id by default)."""
        return stable_hash(shard_key) % self.shards

    def tag(self, shard: int) -> str:
        return f"{self.prefix}{{sg:{shard}}}"

    def partner_tag(self, partner_id: str) -> str:
        return f"{self.prefix}{{sg:p:{partner_id}}}"

    def ip_tag(self, client_ip: str) -> str:
        return f"{self.prefix}{{sg:ip:{client_ip}}}"

    def new_hold_id(self, shard_key: str) -> str:
        return f"hld_{self.shard_of(shard_key)}_{ULID()}"

    def new_reservation_id(self, shard_key: str) -> str:
        """A reservation id on the shard of ``shard_key`` (a resource's ``shard_name``)."""
        return f"rsv_{self.shard_of(shard_key)}_{ULID()}"

    def shard_of_id(self, hold_or_reservation_id: str) -> int:
        """The shard an id carries; ``ValueError`` for anything that is not one of ours."""
        match = _ID_RE.match(hold_or_reservation_id)
        if match is None:
            raise ValueError(f"not a slotguard id: {hold_or_reservation_id!r}")
        shard = int(match.group(2))
        if shard >= self.shards:
            raise ValueError(f"id names shard {shard} but there are {self.shards}")
        return shard

    # ---- per-resource keys (tag of the resource's shard) ------------------------------
    def unit_root(self, shard: int) -> str:
        """Unit keys are ``<unit_root><resource>:<unit index>``.

        Scripts receive the root in KEYS and append resource and index themselves
        (``lua/lib/unit_key.lua``), so a transition by reservation id is one round trip;
        the appended part never contains a brace, so every unit key keeps the root's tag.
        """
        return f"{self.tag(shard)}:u:"

    def unit(self, resource_id: str, unit_index: int, shard_key: str | None = None) -> str:
        shard = self.shard_of(shard_key or resource_id)
        return f"{self.unit_root(shard)}{resource_id}:{unit_index}"

    def fence(self, resource_id: str, shard_key: str | None = None) -> str:
        return f"{self.fence_root(self.shard_of(shard_key or resource_id))}{resource_id}"

    def fence_root(self, shard: int) -> str:
        """Fencing counters are ``<fence_root><resource>``: a pooled hold's script appends
        the member it chose (lua/create_pooled_reservation.lua), as unit keys do."""
        return f"{self.tag(shard)}:fence:"

    def hold(self, hold_id: str) -> str:
        return f"{self.tag(self.shard_of_id(hold_id))}:h:{hold_id}"

    # ---- availability rules (issue 13) -------------------------------------------------
    def availability_revision(self, resource_id: str, shard_key: str | None = None) -> str:
        """The revision of the availability rules of the resource's vendor, beside the
        resource's units: the hold script compares it with the revision the caller checked
        the slot against (engine/availability_rules.py)."""
        return f"{self.tag(self.shard_of(shard_key or resource_id))}:avr:{resource_id}"

    # ---- reservations (tag of the shard the id carries) -------------------------------
    def reservation(self, reservation_id: str) -> str:
        return f"{self.tag(self.shard_of_id(reservation_id))}:r:{reservation_id}"

    def history(self, reservation_id: str) -> str:
        return f"{self.tag(self.shard_of_id(reservation_id))}:rh:{reservation_id}"

    # ---- per-shard structures ---------------------------------------------------------
    def events(self, shard: int) -> str:
        """The shard's commit-queue stream: every transition event, XADDed by the script."""
        return f"{self.tag(shard)}:events"

    def dead_letters(self, shard: int) -> str:
        return f"{self.tag(shard)}:dead"

    def ready(self, shard: int) -> str:
        """Present once the shard's booked markers were rehydrated from Postgres. It lives
        beside the markers, so a Redis that loses its data loses this flag with them."""
        return f"{self.tag(shard)}:ready"

    def deadlines(self, shard: int) -> str:
        """Sorted set: reservation id scored by the deadline of the state it is in."""
        return f"{self.tag(shard)}:deadlines"

    # ---- partner-scoped keys ----------------------------------------------------------
    def partner_holds(self, partner_id: str) -> str:
        """Sorted set of the partner's live holds scored by expiry (the hold cap)."""
        return f"{self.partner_tag(partner_id)}:holds"

    def partner_rate(self, partner_id: str) -> str:
        return f"{self.partner_tag(partner_id)}:rate"

    def partner_reputation(self, partner_id: str) -> str:
        return f"{self.partner_tag(partner_id)}:rep"

    def idempotency(self, partner_id: str, key: str) -> str:
        return f"{self.partner_tag(partner_id)}:idem:{key}"

    def ip_rate(self, client_ip: str) -> str:
        return f"{self.ip_tag(client_ip)}:rate"

    # ---- global, single-key -----------------------------------------------------------
    def rehydrated(self) -> str:
        """Run id of the Redis whose booked markers were last rehydrated from Postgres."""
        return f"{self.prefix}sg:rehydrated"

    def shard_count(self) -> str:
        """The SLOTGUARD_SHARDS the data was written with, set at first start; a process
        started with another count refuses to start."""
        return f"{self.prefix}sg:shards"

    def idempotency_refused(self, partner_id: str) -> str:
        """Sorted set: the partner's records of refused requests (full key) by expiry."""
        return f"{self.partner_tag(partner_id)}:idem-refused"

    def auth_failures(self, client_ip: str) -> str:
        """GCRA of failed authentications from one client IP."""
        return f"{self.ip_tag(client_ip)}:authfail"

    # ---- hold transfer and waitlist (issue 16): under the resource's shard tag ---------
    def transfer_offer(self, reservation_id: str) -> str:
        """Hash: the reservation's live transfer offer (token digest, addressee, expiry,
        used flag); one offer per reservation, a new one replaces it."""
        return f"{self.tag(self.shard_of_id(reservation_id))}:xo:{reservation_id}"

    def new_waitlist_entry_id(self, shard_key: str) -> str:
        """An entry id on the shard of ``shard_key`` (its resource's ``shard_name``: the
        entry lives beside the resource's unit keys, so the script that frees them serves
        it)."""
        return f"wl_{self.shard_of(shard_key)}_{ULID()}"

    def shard_of_waitlist_id(self, entry_id: str) -> int:
        """The shard a waitlist entry id carries; ``ValueError`` for anything else."""
        match = _WAITLIST_ID_RE.match(entry_id)
        if match is None:
            raise ValueError(f"not a waitlist entry id: {entry_id!r}")
        shard = int(match.group(1))
        if shard >= self.shards:
            raise ValueError(f"id names shard {shard} but there are {self.shards}")
        return shard

    @staticmethod
    def waitlist_reservation_id(entry_id: str) -> str:
        """The one reservation a waitlist entry can become: the same shard and ULID, so a
        handoff is idempotent and never places two holds for one entry (mirrored in
        ``lua/lib/serve_waitlist.lua``)."""
        return "rsv" + entry_id.removeprefix("wl")

    def waitlist_entry(self, entry_id: str) -> str:
        """Hash: one waitlist entry (state, partner, slot, units, expiry, FIFO sequence)."""
        return f"{self.tag(self.shard_of_waitlist_id(entry_id))}:wl:{entry_id}"

    def waitlist_index(self, resource_id: str, shard: int) -> str:
        """Sorted set: the resource's slots with waiting entries (member ``<first>:<last>``
        units) scored by last unit. Scripts that free units derive it from the unit root
        (``<tag>:wli:<resource>``, mirrored in lua/lib/serve_waitlist.lua)."""
        return f"{self.tag(shard)}:wli:{resource_id}"

    def waitlist_queue(self, resource_id: str, first_unit: int, last_unit: int,
                       shard: int) -> str:
        """Sorted set: one slot's waiting entries scored by the shard's sequence (FIFO)."""
        return (f"{self.tag(shard)}:wlq:{resource_id}:"
                f"{first_unit}:{last_unit}")

    def waitlist_sequence(self, shard: int) -> str:
        """Counter: the FIFO order of waitlist entries of one shard."""
        return f"{self.tag(shard)}:wlseq"

    # ---- scan patterns (only the tag's own keys: a pattern never spans tags) -----------
    def unit_pattern(self, shard: int) -> str:
        """A SCAN pattern for the unit keys of one shard, and for nothing else: the tag is
        exact (``{sg:<shard>}``), so no partner-scoped key (an idempotency key holding
        ``}:u:``) can match it."""
        return f"{_glob_escape(self.unit_root(shard))}*"

    def reservation_pattern(self, shard: int) -> str:
        """A SCAN pattern for the reservation records of one shard."""
        return f"{_glob_escape(self.tag(shard))}:r:rsv_*"

    def pattern(self) -> str:
        """A SCAN pattern for every key of this key space (tests and ops tooling)."""
        return f"{self.prefix}{{sg:*"


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a SCAN (glob) pattern: a prefix may hold ``*?[]\\``."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
