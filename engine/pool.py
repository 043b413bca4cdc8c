"""Resource groups, pooled holds and vendor re-keying (issue 16, pool).

A resource group ("room type") is a list of one vendor's resources and a strategy; a pooled
hold names the group instead of a resource, and ONE script (lua/create_pooled_reservation.lua)
takes the first free member in the order the strategy gives, or the tightest free gap
(``best_fit``), all under one hash tag. Every member must therefore share a shard: new
resources do (their shard key is their vendor's id, migration 0011); a vendor's older
resources are moved there by :func:`rekey_vendor` (``slotguard rekey``).

Validation and permissions for groups are decided here, once, before any write (the
service layer of this feature); Postgres rows live in ``resource_groups`` and
``resource_group_members``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from engine import clock
from engine.catalog_cache import CatalogCache
from engine.errors import (
    GroupNotColocated,
    LiveHoldsOnResource,
    NotFound,
    ValidationError,
)
from engine.keys import NAME_RE, KeySpace, _glob_escape
from engine.lifecycle import BOOKED_PREFIX, VENDOR
from engine.permissions import Principal, require
from engine.resources import Resource, Vendor

STRATEGIES = ("first_fit", "best_fit", "adjacent", "preferred")
GROUP_CACHE_S = 1.0  # a group changed by another process is seen within this


class UnknownGroup(NotFound):
    code = "UNKNOWN_RESOURCE_GROUP"


@dataclass(frozen=True, slots=True)
class ResourceGroup:
    vendor_id: str
    group_id: str
    strategy: str
    resource_ids: tuple[str, ...]
    preferred_order: tuple[str, ...] = ()
    anchor_resource_id: str | None = None
    # Named zones of members (a floor, a wing): an adjacent hold may ask for one.
    zones: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.preferred_order:
            out["preferredOrder"] = list(self.preferred_order)
        if self.anchor_resource_id:
            out["anchorResourceId"] = self.anchor_resource_id
        if self.zones:
            out["zones"] = {name: list(members) for name, members in self.zones}
        return out

    def candidate_order(self, near: str | None = None, zone: str | None = None) -> list[str]:
        """The members in the order the strategy tries them (best_fit: ties broken so)."""
        ids = list(self.resource_ids)
        if self.strategy == "preferred":
            first = [r for r in self.preferred_order if r in ids]
            return first + [r for r in ids if r not in first]
        if self.strategy == "adjacent":
            inside = set(dict(self.zones).get(zone, ())) if zone else set()
            if inside:  # the zone's members first, then the nearest to the zone
                spots = [ids.index(r) for r in inside]
                return sorted(ids, key=lambda r: (r not in inside,
                                                  min(abs(ids.index(r) - s) for s in spots),
                                                  ids.index(r)))
            anchor = near or self.anchor_resource_id or ids[0]
            at = ids.index(anchor) if anchor in ids else 0
            # Nearest first along the group's order (rooms along a corridor); ties: lower.
            return sorted(ids, key=lambda r: (abs(ids.index(r) - at), ids.index(r)))
        return ids


@dataclass(frozen=True, slots=True)
class PoolChoice:
    """What a pooled placement hands the script: the group and its candidates in order,
    each with its own unit range and buffered block."""

    group_id: str
    tightest: bool  # best_fit: the free member whose free gap around the stay is smallest
    candidates: tuple[tuple[Resource, int, int, int, int], ...] = field(default=())


# ---- Postgres ---------------------------------------------------------------------------
async def _load(conn: asyncpg.Connection, vendor_id: str, group_id: str) -> ResourceGroup | None:
    row = await conn.fetchrow(
        "SELECT strategy, params FROM resource_groups WHERE vendor_id = $1 AND group_id = $2",
        vendor_id, group_id)
    if row is None:
        return None
    members = await conn.fetch(
        """SELECT resource_id FROM resource_group_members
           WHERE vendor_id = $1 AND group_id = $2 ORDER BY position""", vendor_id, group_id)
    params = orjson.loads(row["params"]) if isinstance(row["params"], str) else row["params"]
    return ResourceGroup(vendor_id, group_id, row["strategy"],
                         tuple(m["resource_id"] for m in members),
                         tuple(params.get("preferredOrder") or ()),
                         params.get("anchorResourceId"),
                         tuple((name, tuple(rs)) for name, rs in
                               (params.get("zones") or {}).items()))


async def _store(conn: asyncpg.Connection, group: ResourceGroup, *, create: bool) -> None:
    params = orjson.dumps(group.params).decode()
    async with conn.transaction():
        if create:
            try:
                await conn.execute(
                    """INSERT INTO resource_groups (vendor_id, group_id, strategy, params)
                       VALUES ($1, $2, $3, $4::jsonb)""",
                    group.vendor_id, group.group_id, group.strategy, params)
            except asyncpg.UniqueViolationError:
                from engine.directory import AlreadyExists

                raise AlreadyExists(f"resource group {group.group_id!r} already exists",
                                    details={"groupId": group.group_id}) from None
        else:
            await conn.execute(
                """UPDATE resource_groups SET strategy = $3, params = $4::jsonb,
                       updated_at = now() WHERE vendor_id = $1 AND group_id = $2""",
                group.vendor_id, group.group_id, group.strategy, params)
            await conn.execute(
                "DELETE FROM resource_group_members WHERE vendor_id = $1 AND group_id = $2",
                group.vendor_id, group.group_id)
        await conn.executemany(
            """INSERT INTO resource_group_members (vendor_id, group_id, resource_id, position)
               VALUES ($1, $2, $3, $4)""",
            [(group.vendor_id, group.group_id, r, i)
             for i, r in enumerate(group.resource_ids)])


# ---- the service: who may, what is valid, then the write -------------------------------
class GroupService:
    def __init__(self, pool: asyncpg.Pool, catalog: CatalogCache, keys: KeySpace,
                 max_members: int = 200, *, access=None, throttle=None,
                 max_range_ms: int = 31 * 86_400_000) -> None:
        self.pool = pool
        self.access = access
        self._throttle = throttle  # async (principal, client_ip): the rate limits
        self.max_range_ms = max_range_ms
        self.catalog = catalog
        self.keys = keys
        self.max_members = max_members
        self._cache: dict[tuple[str, str], tuple[float, ResourceGroup]] = {}

    async def _vendor_for(self, principal: Principal, vendor_id: str, op: str) -> Vendor:
        require(principal, op)
        if principal.role == VENDOR and principal.vendor_id != vendor_id:
            raise NotFound(f"unknown vendor {vendor_id!r}", code="UNKNOWN_VENDOR",
                           details={"vendorId": vendor_id})
        return await self.catalog.vendor(vendor_id)

    async def validate(self, vendor: Vendor, group_id: Any, resource_ids: Any, strategy: Any,
                       preferred_order: Any = None,
                       anchor_resource_id: Any = None, zones: Any = None) -> ResourceGroup:
        """Every rule of a group, before any write: typed 4xx, nothing changed."""
        if not isinstance(group_id, str) or not NAME_RE.match(group_id):
            raise ValidationError("groupId is not a valid name", code="INVALID_FIELD",
                                  details={"field": "groupId"})
        if strategy not in STRATEGIES:
            raise ValidationError(f"strategy must be one of {', '.join(STRATEGIES)}",
                                  code="INVALID_FIELD",
                                  details={"field": "strategy", "allowed": list(STRATEGIES)})
        if not isinstance(resource_ids, list | tuple) or not resource_ids:
            raise ValidationError("resourceIds must list at least one resource",
                                  code="EMPTY_GROUP", details={"field": "resourceIds"})
        if len(resource_ids) > self.max_members:
            raise ValidationError(f"a group has at most {self.max_members} members",
                                  code="GROUP_TOO_LARGE",
                                  details={"field": "resourceIds", "maximum": self.max_members})
        if len(set(resource_ids)) != len(resource_ids):
            raise ValidationError("resourceIds lists a resource twice", code="DUPLICATE_MEMBER",
                                  details={"field": "resourceIds"})
        members = []
        for rid in resource_ids:
            if not isinstance(rid, str) or not NAME_RE.match(rid):
                raise ValidationError("resourceIds holds an invalid name", code="INVALID_FIELD",
                                      details={"field": "resourceIds"})
            resource = await self.catalog.resource(rid)  # 404 UNKNOWN_RESOURCE
            if resource.vendor_id != vendor.id:
                raise ValidationError("the resource does not belong to the vendor",
                                      code="RESOURCE_VENDOR_MISMATCH",
                                      details={"field": "resourceIds", "resourceId": rid,
                                               "vendorId": vendor.id})
            members.append(resource)
        shards = {self.keys.shard_of(r.shard_name) for r in members}
        if len(shards) > 1:
            raise GroupNotColocated(
                "the members live under different shard hash tags; re-key the vendor "
                "(slotguard rekey --vendor) first",
                details={"vendorId": vendor.id,
                         "shardKeys": sorted({r.shard_name for r in members})})
        preferred = tuple(preferred_order or ())
        if any(r not in resource_ids for r in preferred) or len(set(preferred)) != len(preferred):
            raise ValidationError("preferredOrder must list members of the group, once each",
                                  code="INVALID_FIELD", details={"field": "preferredOrder"})
        if strategy == "preferred" and not preferred:
            raise ValidationError("strategy preferred needs preferredOrder",
                                  code="MISSING_FIELD", details={"field": "preferredOrder"})
        if anchor_resource_id is not None and anchor_resource_id not in resource_ids:
            raise ValidationError("anchorResourceId must be a member of the group",
                                  code="INVALID_FIELD", details={"field": "anchorResourceId"})
        zones = dict(zones or {})
        for name, zone_members in zones.items():
            if (not isinstance(name, str) or not NAME_RE.match(name) or not zone_members
                    or len(set(zone_members)) != len(zone_members)
                    or any(r not in resource_ids for r in zone_members)):
                raise ValidationError("zones must name non-empty lists of the group's members, "
                                      "each once",
                                      code="INVALID_FIELD", details={"field": "zones"})
        return ResourceGroup(vendor.id, group_id, strategy, tuple(resource_ids), preferred,
                             anchor_resource_id,
                             tuple((n, tuple(m)) for n, m in sorted(zones.items())))

    async def create(self, principal: Principal, vendor_id: str, group_id: Any,
                     resource_ids: Any, strategy: Any, preferred_order: Any = None,
                     anchor_resource_id: Any = None, zones: Any = None) -> ResourceGroup:
        vendor = await self._vendor_for(principal, vendor_id, "groups.write")
        group = await self.validate(vendor, group_id, resource_ids, strategy, preferred_order,
                                    anchor_resource_id, zones)
        async with self.pool.acquire() as conn:
            await _store(conn, group, create=True)
        self._cache.pop((vendor_id, group.group_id), None)
        return group

    async def get(self, principal: Principal, vendor_id: str, group_id: str) -> ResourceGroup:
        await self._vendor_for(principal, vendor_id, "groups.read")
        return await self._fetch(vendor_id, group_id)

    async def update(self, principal: Principal, vendor_id: str, group_id: str, *,
                     resource_ids: Any = None, strategy: Any = None,
                     preferred_order: Any = None, anchor_resource_id: Any = None,
                     zones: Any = None) -> ResourceGroup:
        """PATCH: the fields given replace the group's; the result is validated whole."""
        vendor = await self._vendor_for(principal, vendor_id, "groups.write")
        current = await self._fetch(vendor_id, group_id)
        group = await self.validate(
            vendor, group_id,
            list(current.resource_ids) if resource_ids is None else resource_ids,
            current.strategy if strategy is None else strategy,
            current.preferred_order if preferred_order is None else preferred_order,
            current.anchor_resource_id if anchor_resource_id is None else anchor_resource_id,
            dict(current.zones) if zones is None else zones)
        async with self.pool.acquire() as conn:
            await _store(conn, group, create=False)
        self._cache.pop((vendor_id, group_id), None)
        return group

    async def delete(self, principal: Principal, vendor_id: str, group_id: str) -> None:
        await self._vendor_for(principal, vendor_id, "groups.write")
        async with self.pool.acquire() as conn:
            done = await conn.execute(
                "DELETE FROM resource_groups WHERE vendor_id = $1 AND group_id = $2",
                vendor_id, group_id)
        self._cache.pop((vendor_id, group_id), None)
        if done.endswith(" 0"):
            raise UnknownGroup("unknown resource group",
                               details={"vendorId": vendor_id, "groupId": group_id})

    async def availability(self, principal: Principal, vendor_id: str, group_id: str,
                           pairs: list[tuple[str, str]], client_ip: str | None = None):
        """Free members per slot: who (403/404), the group (404), the query (400), then the
        rate limits and one batch of reads."""
        from engine import occupancy
        from engine.service import parse_int, parse_time, query_dict

        vendor = await self._vendor_for(principal, vendor_id, "availability.read")
        query = query_dict(pairs, {"startTime", "endTime", "slotDuration"})
        _group, members = await self.resolve(vendor, group_id)
        for name in ("startTime", "endTime"):
            if name not in query:
                raise ValidationError(f"{name} is required", code="MISSING_PARAMETER",
                                      details={"field": name})
        start_ms = parse_time(query["startTime"], "startTime")
        end_ms = parse_time(query["endTime"], "endTime")
        slot_minutes = parse_int(query.get("slotDuration", "60"), "slotDuration", 1, 7 * 1440)
        slot_ms = 0
        for member in members:
            slot_ms = occupancy.check_query(member, start_ms, end_ms, slot_minutes,
                                            self.max_range_ms)
        if self._throttle is not None:
            await self._throttle(principal, client_ip)
        slots = await group_availability(self.access, self.keys, members, start_ms, end_ms,
                                         slot_ms)
        return vendor, group_id, len(members), slots

    async def _fetch(self, vendor_id: str, group_id: str) -> ResourceGroup:
        async with self.pool.acquire() as conn:
            group = await _load(conn, vendor_id, group_id)
        if group is None:
            raise UnknownGroup("unknown resource group",
                               details={"vendorId": vendor_id, "groupId": group_id})
        return group

    async def resolve(self, vendor: Vendor, group_id: str) -> tuple[ResourceGroup,
                                                                    list[Resource]]:
        """The group and its members for a pooled hold (cached ``GROUP_CACHE_S``); the
        members are checked colocated again (a re-key may have moved some)."""
        if not NAME_RE.match(group_id):
            raise UnknownGroup("unknown resource group",
                               details={"vendorId": vendor.id, "groupId": group_id})
        cached = self._cache.get((vendor.id, group_id))
        now = clock.monotonic()
        if cached is not None and now - cached[0] < GROUP_CACHE_S:
            group = cached[1]
        else:
            group = await self._fetch(vendor.id, group_id)
            self._cache[(vendor.id, group_id)] = (now, group)
        members = [await self.catalog.resource(r) for r in group.resource_ids]
        if len({self.keys.shard_of(r.shard_name) for r in members}) > 1:
            raise GroupNotColocated("the group's members live under different shard hash "
                                    "tags", details={"groupId": group_id})
        return group, members


# ---- availability by group ----------------------------------------------------------------
async def group_availability(access, keys: KeySpace, members: list[Resource], start_ms: int,
                             end_ms: int, slot_ms: int) -> list[tuple[int, int, int]]:
    """(start, end, free members) per slot: a member counts when a hold of the slot on it
    would succeed now (buffers included). One read per member, coalesced into one batch."""
    from engine import occupancy

    per_member = await asyncio.gather(*(
        occupancy.availability(access, keys, r, start_ms, end_ms, slot_ms) for r in members))
    slots = []
    for i, slot in enumerate(per_member[0].slots):
        free = sum(1 for a in per_member if a.slots[i].is_available)
        slots.append((slot.start_ms, slot.end_ms, free))
    return slots


# ---- re-keying a vendor onto its own shard key --------------------------------------------
@dataclass
class RekeyReport:
    vendor_id: str
    resources: list[str] = field(default_factory=list)  # re-keyed (or to be, in a dry run)
    markers_moved: int = 0
    applied: bool = False


async def rekey_vendor(conn: asyncpg.Connection, redis, keys: KeySpace, vendor_id: str, *,
                       apply: bool) -> RekeyReport:
    """Give every resource of ``vendor_id`` the vendor's id as shard key. A resource whose
    shard changes has its booked markers copied to the new tag (same value and expiry, the
    new key written before the old is deleted, so a unit never reads free) and its fencing
    counter carried over. Refused (nothing changed) while any unit of those resources is
    held by a live hold: a live reservation's id names its shard, so it cannot move. Run it
    with the vendor quiesced and restart API and worker processes afterwards (each caches
    the catalog, shard keys included)."""
    rows = await conn.fetch("SELECT id, shard_key FROM resources WHERE vendor_id = $1 "
                            "AND shard_key <> vendor_id ORDER BY id", vendor_id)
    report = RekeyReport(vendor_id, [r["id"] for r in rows])
    target = keys.shard_of(vendor_id)
    moves: list[tuple[str, str, str]] = []  # (resource, old key, new key) per unit
    for row in rows:
        old = keys.shard_of(row["shard_key"])
        if old == target:
            continue  # the same tag: only the Postgres row changes
        pattern = f"{_glob_escape(keys.unit_root(old) + row['id'])}:*"
        async for key in redis.scan_iter(match=pattern, count=1000):
            index = key.rsplit(":", 1)[1]
            if not index.lstrip("-").isdigit():
                continue  # another resource whose id extends this one's with ':'
            owner = await redis.get(key)
            if owner is None:
                continue
            if not owner.startswith(BOOKED_PREFIX):
                raise LiveHoldsOnResource(
                    "a resource to re-key has live holds; quiesce the vendor first",
                    details={"resourceId": row["id"], "holder": owner})
            moves.append((row["id"], key, keys.unit(row["id"], int(index), vendor_id)))
    if not apply:
        report.markers_moved = len(moves)
        return report
    for _resource, old_key, new_key in moves:
        value = await redis.get(old_key)
        if value is None:
            continue
        expires = await redis.pexpiretime(old_key)
        if expires > 0:
            await redis.set(new_key, value, pxat=expires)
        else:
            await redis.set(new_key, value)
        await redis.delete(old_key)
        report.markers_moved += 1
    for row in rows:
        old_fence = keys.fence(row["id"], row["shard_key"])
        new_fence = keys.fence(row["id"], vendor_id)
        if old_fence != new_fence:
            token = int(await redis.get(old_fence) or 0)
            if token > int(await redis.get(new_fence) or 0):
                await redis.set(new_fence, token)
    await conn.execute("UPDATE resources SET shard_key = vendor_id WHERE vendor_id = $1",
                       vendor_id)
    report.applied = True
    return report


__all__ = ["GroupService", "PoolChoice", "ResourceGroup", "RekeyReport",
           "STRATEGIES", "UnknownGroup", "group_availability", "rekey_vendor"]
