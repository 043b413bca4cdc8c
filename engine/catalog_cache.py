"""The catalog an API process works from, kept in step with Postgres.

Vendors and resources are created by other processes (the CLI, another API worker), so a
process cannot trust its own memory: it loads everything at start, and on a miss asks
Postgres again. A miss is remembered briefly (a negative cache) so a flood of requests for
an unknown vendor costs one query per interval, but never for longer: a vendor created
elsewhere becomes visible within ``negative_ttl_s``. A vendor's list of resources is read
from Postgres again when it is older than that too: another process may add a resource to a
vendor this process already knows, and a list never refreshed would leave it out for good
(the union availability of a vendor read it that way, issue 13).
"""

from __future__ import annotations

import asyncpg

from engine import clock, directory
from engine.errors import UnknownResource
from engine.keys import NAME_RE
from engine.resources import Resource, ResourceCatalog, Vendor

NEGATIVE_TTL_S = 1.0
MAX_MISSES = 10_000  # remembered misses; random ids must not grow the cache without bound


class CatalogCache:
    def __init__(self, pool: asyncpg.Pool, catalog: ResourceCatalog | None = None, *,
                 negative_ttl_s: float = NEGATIVE_TTL_S) -> None:
        self.pool = pool
        self.catalog = catalog if catalog is not None else ResourceCatalog()
        self.negative_ttl_s = negative_ttl_s
        self._missing: dict[tuple[str, str], float] = {}
        self._listed: dict[str, float] = {}  # vendor id -> when its resources were listed

    async def load(self) -> None:
        """Everything Postgres knows (at start)."""
        async with self.pool.acquire() as conn:
            for stored in await directory.list_resources(conn):
                self.catalog.add(stored.to_engine())
            for vendor in await directory.list_vendors(conn):
                self.catalog.add_vendor(vendor.to_engine())

    async def vendor(self, vendor_id: str) -> Vendor:
        try:
            return self.catalog.vendor(vendor_id)
        except UnknownResource:
            if self._recently_missing("vendor", vendor_id) or not NAME_RE.match(vendor_id):
                raise  # a name no vendor can have never costs a Postgres lookup
        async with self.pool.acquire() as conn:
            try:
                row = await directory.get_vendor(conn, vendor_id)
            except directory.UnknownVendor:
                self._remember_miss("vendor", vendor_id)
                raise UnknownResource(f"unknown vendor {vendor_id!r}", code="UNKNOWN_VENDOR",
                                      details={"vendorId": vendor_id}) from None
            for stored in await directory.list_resources(conn, vendor_id):
                self.catalog.add(stored.to_engine())
        vendor = row.to_engine()
        self.catalog.add_vendor(vendor)
        return vendor

    async def resource(self, resource_id: str) -> Resource:
        if resource_id in self.catalog:
            return self.catalog.get(resource_id)
        if not self._recently_missing("resource", resource_id) and NAME_RE.match(resource_id):
            async with self.pool.acquire() as conn:
                try:
                    stored = await directory.get_resource(conn, resource_id)
                except UnknownResource:
                    self._remember_miss("resource", resource_id)
                    raise
            self.catalog.add(stored.to_engine())
        return self.catalog.get(resource_id)

    async def resources_of(self, vendor_id: str) -> list[Resource]:
        """Every resource of a vendor the caller resolved, as Postgres listed them at most
        ``negative_ttl_s`` ago (a resource another process added to it is not missed)."""
        listed = self._listed.get(vendor_id)
        if listed is None or clock.monotonic() - listed >= self.negative_ttl_s:
            async with self.pool.acquire() as conn:
                stored = await directory.list_resources(conn, vendor_id)
            for resource in stored:
                self.catalog.add(resource.to_engine())
            if len(self._listed) >= MAX_MISSES:
                self._listed.clear()
            self._listed[vendor_id] = clock.monotonic()
        return self.catalog.resources_of(vendor_id)

    def forget_miss(self, kind: str, item_id: str) -> None:
        """Called after this process created the item itself."""
        self._missing.pop((kind, item_id), None)

    def _remember_miss(self, kind: str, item_id: str) -> None:
        if len(self._missing) >= MAX_MISSES:
            self._missing.clear()
        self._missing[(kind, item_id)] = clock.monotonic()

    def _recently_missing(self, kind: str, item_id: str) -> bool:
        at = self._missing.get((kind, item_id))
        if at is None:
            return False
        if clock.monotonic() - at < self.negative_ttl_s:
            return True
        del self._missing[(kind, item_id)]
        return False
