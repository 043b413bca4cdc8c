"""The Redis key layout: the only module that formats a key string.

Every key of a resource lives under one hash tag ``{sg:<shard>}`` where
``shard = crc32(resource) mod shards``, so each Lua call touches one hash slot and the same
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


def stable_hash(value: str) -> int:
    """A hash that is the same in every process and every release (unlike ``hash``)."""
    return zlib.crc32(value.encode())


@dataclass(frozen=True, slots=True)
class KeySpace:
    prefix: str
    shards: int

    # ---- shards and ids -------------------------------------------------------------
    def shard_of(self, resource_id: str) -> int:
        return stable_hash(resource_id) % self.shards

    def tag(self, shard: int) -> str:
        return f"{self.prefix}{{sg:{shard}}}"

    def partner_tag(self, partner_id: str) -> str:
        return f"{self.prefix}{{sg:p:{partner_id}}}"

    def ip_tag(self, client_ip: str) -> str:
        return f"{self.prefix}{{sg:ip:{client_ip}}}"

    def new_hold_id(self, resource_id: str) -> str:
        return f"hld_{self.shard_of(resource_id)}_{ULID()}"

    def new_reservation_id(self, resource_id: str) -> str:
        return f"rsv_{self.shard_of(resource_id)}_{ULID()}"

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

    def unit(self, resource_id: str, unit_index: int) -> str:
        return f"{self.unit_root(self.shard_of(resource_id))}{resource_id}:{unit_index}"

    def fence(self, resource_id: str) -> str:
        return f"{self.tag(self.shard_of(resource_id))}:fence:{resource_id}"

    def hold(self, hold_id: str) -> str:
        return f"{self.tag(self.shard_of_id(hold_id))}:h:{hold_id}"

    # ---- availability rules (issue 13) -------------------------------------------------
    def availability_revision(self, resource_id: str) -> str:
        """The revision of the availability rules of the resource's vendor, beside the
        resource's units: the hold script compares it with the revision the caller checked
        the slot against (engine/availability_rules.py)."""
        return f"{self.tag(self.shard_of(resource_id))}:avr:{resource_id}"

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
