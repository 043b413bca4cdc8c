"""HoldEngine: plain capacity-1 holds on a resource's units, placed atomically in Lua.

The benchmarks' baseline (production does not use it: its holds are reservations, see
engine/reservations.py): the cheapest correct hold the engine's scripts can place, against
which the API's cost per reservation is measured. Kept honest by tests/test_holds.py and the
Hypothesis model in tests/test_holds_model.py.

A hold owns every unit of its buffered interval or none of them. Redis TTLs free the units
when the hold expires; nothing has to run for that to happen. Every hold is issued a fencing
token that strictly increases per resource; release and extend must present it.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.access import RedisAccess
from engine.errors import NotFound, Outcome, ValidationError, error_for
from engine.holds import BOOKED_PREFIX, call_with_retry, conflict_from_reply
from engine.keys import KeySpace
from engine.resources import ResourceCatalog
from engine.settings import Settings

__all__ = ["BOOKED_PREFIX", "Hold", "HoldEngine", "conflict_from_reply"]


@dataclass(frozen=True, slots=True)
class Hold:
    hold_id: str
    resource_id: str
    first_unit: int
    last_unit: int
    expires_at_ms: int
    fence_token: int
    created_at_ms: int
    extensions: int = 0
    owner: str = ""



class HoldEngine:
    def __init__(self, access: RedisAccess, keys: KeySpace, catalog: ResourceCatalog,
                 settings: Settings) -> None:
        self.access = access
        self.keys = keys
        self.catalog = catalog
        self.settings = settings

    async def place(self, resource_id: str, start_ms: int, end_ms: int, *, owner: str = "",
                    ttl_ms: int | None = None, hold_id: str | None = None) -> Hold:
        """Hold ``[start, end)`` (plus buffers) of a resource, or raise HoldConflict."""
        resource = self.catalog.get(resource_id)
        first, last = resource.units(start_ms, end_ms, self.settings.max_hold_units)
        ttl = self.settings.hold_ttl_ms if ttl_ms is None else ttl_ms
        if ttl <= 0:
            raise ValidationError("ttl must be positive")
        if hold_id is None:
            hold_id = self.keys.new_hold_id(resource_id)
        elif self.keys.shard_of_id(hold_id) != self.keys.shard_of(resource_id):
            raise ValidationError("hold id does not carry the resource's shard")
        shard = self.keys.shard_of(resource_id)
        reply = await call_with_retry(
            self.access,
            "place_hold",
            [self.keys.unit_root(shard), self.keys.hold(hold_id), self.keys.fence(resource_id)],
            [hold_id, resource_id, first, last, ttl, self.settings.max_hold_units, owner],
        )
        if int(reply[0]) == Outcome.OK:
            return Hold(hold_id, resource_id, first, last, int(reply[1]), int(reply[2]),
                        int(reply[3]), 0, owner)
        raise error_for(reply, subject="hold", resource_id=resource_id,
                        details={"holdId": hold_id})

    async def read(self, hold_id: str) -> Hold | None:
        reply = await self.access.call("read_hold", [self._hold_key(hold_id)], [])
        if int(reply[0]) == Outcome.NOT_FOUND:
            return None
        _, resource, first, last, expires, created, ext, token, owner = reply
        return Hold(hold_id, resource, int(first), int(last), int(expires), int(token),
                    int(created), int(ext), owner or "")

    async def extend(self, hold_id: str, fence_token: int, ttl_ms: int | None = None) -> Hold:
        """Push the hold's expiry to now + ttl; bounded by count and total duration."""
        ttl = self.settings.hold_ttl_ms if ttl_ms is None else ttl_ms
        if ttl <= 0:
            raise ValidationError("ttl must be positive")
        reply = await self.access.call(
            "extend_hold",
            [self._unit_root_of(hold_id), self._hold_key(hold_id)],
            [hold_id, fence_token, ttl, self.settings.max_hold_total_ms,
             self.settings.max_extensions],
        )
        self._raise_for(reply, hold_id)
        hold = await self.read(hold_id)
        if hold is None:  # expired between the two calls
            raise NotFound("hold not found", details={"holdId": hold_id})
        return hold

    async def release(self, hold_id: str, fence_token: int) -> None:
        reply = await self.access.call(
            "release_hold",
            [self._unit_root_of(hold_id), self._hold_key(hold_id)],
            [hold_id, fence_token],
        )
        self._raise_for(reply, hold_id)

    # ---- helpers ----------------------------------------------------------------------
    def _hold_key(self, hold_id: str) -> str:
        try:
            return self.keys.hold(hold_id)
        except ValueError:
            raise NotFound("hold not found", details={"holdId": hold_id}) from None

    def _unit_root_of(self, hold_id: str) -> str:
        try:
            return self.keys.unit_root(self.keys.shard_of_id(hold_id))
        except ValueError:
            raise NotFound("hold not found", details={"holdId": hold_id}) from None

    @staticmethod
    def _raise_for(reply: list, hold_id: str) -> None:
        if int(reply[0]) != Outcome.OK:
            raise error_for(reply, subject="hold", details={"holdId": hold_id})
