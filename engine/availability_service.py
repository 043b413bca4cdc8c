"""The availability service (issue 13): who may change a vendor's availability inputs, the
rules cache every API process shares through Redis, the availability answer, the check a
placement makes, and the revalidation of live reservations when the inputs change.

Permissions, tenancy and every 4xx are decided here, before the first write: routes parse
and render. The computation itself is engine/availability.py (pure).

**Rules cache.** Each process keeps each vendor's :class:`Rules` (schedule and busy blocks,
from Postgres) in memory with their revision. Every write bumps the revision in Postgres
(same transaction) and then publishes it beside each of the vendor's resources in Redis
(``{sg:<shard>}:avr:<resource>``, never moving backwards: lua/availability_publish.lua).
A placement checks the slot against the cached rules in Python and passes their revision to
the hold script it calls anyway (lua/create_reservation.lua): a newer revision there is
``RULES_STALE``, so the process reloads from Postgres, checks again and retries. The check
therefore costs no Redis round trip, and no process can place a hold against rules older
than the newest published. The availability read gets the published revision with the
occupancy (the same script call, lua/read_units.lua). A Redis that lost the key heals
itself: the stale reply makes the process publish what Postgres says. A writer that
crashed between its Postgres commit and the publish leaves processes on the older
revision for at most ``availability_rules_cache_ms`` (they reload on that age).

**Revalidation.** After publishing, every live pre-commit reservation of the vendor is
checked against the new rules (hours, busy, tentative, buffer: the rules a vendor's change
can break; notice, horizon and the past are placement rules) and flagged on its record
(lua/availability_flag.lua; a flag no longer true is cleared). The transition script fails
a flagged reservation at its next step (vendor confirmation, each authorization, commit,
extend) as ``FAILED_AVAILABILITY_CHANGED`` with the reasons.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from ulid import ULID

from engine import availability as av
from engine import availability_store as store
from engine import clock
from engine.availability import Block, Rules
from engine.errors import (
    NotFound,
    NotReady,
    RulesStale,
    SlotRefused,
    UnsupportedCalendarType,
    ValidationError,
)
from engine.lifecycle import PRE_COMMIT, State
from engine.occupancy import check_query
from engine.permissions import Principal, require, require_vendor_scope
from engine.resources import Resource, Vendor
from engine.schedule import DAY_MS, parse_schedule
from engine.times import parse_time

AVAILABILITY_QUERY = {"startTime", "endTime", "slotDuration", "includeConfidence",
                      "resourceId", "explain"}
MAX_EXPLAIN_SLOTS = 96
MAX_SOURCE = 64
REVALIDATED = frozenset({"outside_hours", "busy", "tentative", "buffer"})
STALE_RETRIES = 3


@dataclass(frozen=True, slots=True)
class AvailabilityAnswer:
    vendor_id: str
    resource_id: str
    resource_ids: list[str]
    union: bool
    start_ms: int
    end_ms: int
    computed_at_ms: int
    computed_version: str
    computation_ms: float
    slots: list[av.Slot]
    include_confidence: bool
    explain: list[list[dict[str, Any]]] | None = None


class RulesCache:
    """Each vendor's rules in this process, revalidated through Redis (module docstring)."""

    def __init__(self, pool, access, keys, *, max_age_ms: int) -> None:
        self.pool = pool
        self.access = access
        self.keys = keys
        self.max_age_ms = max_age_ms
        self._rules: dict[str, tuple[Rules, float]] = {}
        self._loading: dict[str, asyncio.Future] = {}

    def cached(self, vendor_id: str) -> Rules | None:
        entry = self._rules.get(vendor_id)
        if entry is None or (clock.monotonic() - entry[1]) * 1000 >= self.max_age_ms:
            return None
        return entry[0]

    async def get(self, vendor_id: str) -> Rules:
        rules = self.cached(vendor_id)
        return rules if rules is not None else await self.reload(vendor_id)

    async def reload(self, vendor_id: str, *, publish: bool = False) -> Rules:
        """From Postgres (one load at a time per vendor; concurrent callers share it)."""
        pending = self._loading.get(vendor_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._loading[vendor_id] = future
        try:
            async with self.pool.acquire() as conn:
                rules = await store.load_rules(conn, vendor_id)
                # (id, shard key): the revision lives beside the resource's units (issue 16)
                resource_ids = [(r.id, r.shard_key) for r in await _resources(conn, vendor_id)] \
                    if publish else []
            self.remember(rules)
            if publish:
                await self.publish(rules, resource_ids)
            future.set_result(rules)
            return rules
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            del self._loading[vendor_id]

    def remember(self, rules: Rules) -> None:
        current = self._rules.get(rules.vendor_id)
        if current is None or current[0].revision <= rules.revision:
            self._rules[rules.vendor_id] = (rules, clock.monotonic())

    async def publish(self, rules: Rules, resource_ids: list[tuple[str, str]]) -> None:
        await asyncio.gather(*(self.access.call(
            "availability_publish", [self.keys.availability_revision(rid, shard_key)],
            [rules.revision]) for rid, shard_key in resource_ids))

    async def observed(self, vendor_id: str, revisions: list[str], rules: Rules) -> Rules:
        """Revisions read from Redis beside the units: reload when any is not ours."""
        if all(r == str(rules.revision) for r in revisions):
            return rules
        return await self.reload(vendor_id, publish=True)


async def _resources(conn, vendor_id: str):
    from engine import directory

    return await directory.list_resources(conn, vendor_id)


class AvailabilityService:
    def __init__(self, pool, access, keys, catalog, settings, *, reservations=None) -> None:
        self.pool = pool
        self.access = access
        self.keys = keys
        self.catalog = catalog  # engine.catalog_cache.CatalogCache
        self.settings = settings
        self.reservations = reservations  # engine.service.ReservationService (rate limits)
        self.rules = RulesCache(pool, access, keys,
                                max_age_ms=settings.availability_rules_cache_ms)

    # ---- who may ------------------------------------------------------------------------
    async def _vendor(self, principal: Principal, vendor_id: str, operation: str) -> Vendor:
        require(principal, operation)
        require_vendor_scope(principal, vendor_id)
        return await self.catalog.vendor(vendor_id)

    # ---- schedule -----------------------------------------------------------------------
    async def put_schedule(self, principal: Principal, vendor_id: str,
                           document: dict[str, Any]) -> dict[str, Any]:
        vendor = await self._vendor(principal, vendor_id, "availability.rules.write")
        schedule = parse_schedule(document)
        async with self.pool.acquire() as conn:
            await store.put_schedule(conn, vendor.id, schedule.document())
        await self._changed(vendor.id)
        return schedule.document()

    async def get_schedule(self, principal: Principal, vendor_id: str) -> dict[str, Any]:
        vendor = await self._vendor(principal, vendor_id, "availability.rules.read")
        async with self.pool.acquire() as conn:
            document = await store.get_schedule(conn, vendor.id)
        if document is None:
            raise NotFound("the vendor has no schedule (always open)", code="NO_SCHEDULE",
                           details={"vendorId": vendor.id})
        return document

    # ---- busy blocks --------------------------------------------------------------------
    async def add_block(self, principal: Principal, vendor_id: str, *, start: Any, end: Any,
                        status: str | None, source: str | None,
                        resource_id: str | None) -> Block:
        vendor = await self._vendor(principal, vendor_id, "availability.rules.write")
        start_ms, end_ms = parse_time(start, "start"), parse_time(end, "end")
        if end_ms <= start_ms:
            raise ValidationError("end must be after start", code="INVERTED_INTERVAL",
                                  details={"field": "end"})
        status = status or av.BUSY
        if status not in (av.BUSY, av.TENTATIVE):
            raise ValidationError("status is busy or tentative", code="INVALID_FIELD",
                                  details={"field": "status"})
        source = source or "manual"
        if len(source) > MAX_SOURCE:
            raise ValidationError(f"source is at most {MAX_SOURCE} characters",
                                  code="INVALID_FIELD", details={"field": "source"})
        if resource_id is not None:
            from engine.service import check_vendor_resource

            check_vendor_resource(vendor, await self.catalog.resource(resource_id))
        block = Block(block_id=f"blk_{ULID()}", start_ms=start_ms, end_ms=end_ms,
                      status=status, resource_id=resource_id, source=source)
        async with self.pool.acquire() as conn:
            if await store.count_blocks(conn, vendor.id) >= self.settings.max_busy_blocks:
                raise ValidationError("the vendor has too many busy blocks",
                                      code="TOO_MANY_BUSY_BLOCKS",
                                      details={"maximum": self.settings.max_busy_blocks})
            await store.insert_block(conn, vendor.id, block)
        await self._changed(vendor.id)
        return block

    async def list_blocks(self, principal: Principal, vendor_id: str) -> list[Block]:
        vendor = await self._vendor(principal, vendor_id, "availability.rules.read")
        async with self.pool.acquire() as conn:
            return await store.list_blocks(conn, vendor.id)

    async def delete_block(self, principal: Principal, vendor_id: str, block_id: str) -> Block:
        vendor = await self._vendor(principal, vendor_id, "availability.rules.write")
        async with self.pool.acquire() as conn:
            block, _ = await store.delete_block(conn, vendor.id, block_id)
        await self._changed(vendor.id)
        return block

    # ---- calendars (ICS) ----------------------------------------------------------------
    async def import_calendar(self, principal: Principal, vendor_id: str, calendar_id: str,
                              body: bytes, content_type: str | None) -> dict[str, Any]:
        from engine import ics
        from engine.keys import NAME_RE

        vendor = await self._vendor(principal, vendor_id, "availability.rules.write")
        if not NAME_RE.match(calendar_id):
            raise ValidationError("calendarId is not a valid id", code="INVALID_PARAMETER",
                                  details={"field": "calendarId"})
        media = (content_type or "").split(";")[0].strip().lower()
        if media != "text/calendar":
            raise UnsupportedCalendarType("the body must be text/calendar",
                                          details={"contentType": content_type or ""})
        if len(body) > self.settings.max_calendar_bytes:
            raise ValidationError("the calendar is too large", code="CALENDAR_TOO_LARGE",
                                  details={"maxBytes": self.settings.max_calendar_bytes})
        rules = await self.rules.get(vendor.id)
        horizon_days = rules.schedule.horizon_days if rules.schedule else 90
        now = clock.now_ms()
        until = now + horizon_days * DAY_MS
        events = ics.expand(body, now - DAY_MS, until,
                            max_events=self.settings.max_busy_blocks,
                            time_zone=rules.schedule.time_zone if rules.schedule
                            else vendor.timezone)
        blocks = [Block(block_id=f"blk_{ULID()}", start_ms=e.start_ms, end_ms=e.end_ms,
                        status=e.status, source=f"ics:{calendar_id}", calendar_id=calendar_id)
                  for e in events]
        async with self.pool.acquire() as conn:
            others = await store.count_blocks(conn, vendor.id, excluding_calendar=calendar_id)
            if others + len(blocks) > self.settings.max_busy_blocks:
                raise ValidationError("the vendor would have too many busy blocks",
                                      code="TOO_MANY_BUSY_BLOCKS",
                                      details={"maximum": self.settings.max_busy_blocks})
            removed, _ = await store.replace_calendar(conn, vendor.id, calendar_id, blocks)
        await self._changed(vendor.id)
        return {"vendorId": vendor.id, "calendarId": calendar_id, "blocks": len(blocks),
                "busy": sum(b.status == av.BUSY for b in blocks),
                "tentative": sum(b.status == av.TENTATIVE for b in blocks),
                "removed": len(removed or []), "expandedUntil": until}

    # ---- after a change: publish, then revalidate live reservations ----------------------
    async def _changed(self, vendor_id: str) -> None:
        rules = await self.rules.reload(vendor_id, publish=True)
        await self.revalidate(rules)

    async def revalidate(self, rules: Rules) -> int:
        """Flag (or clear) every live pre-commit reservation of the vendor by the rules a
        vendor's change can break. Answers how many are flagged now."""
        async with self.pool.acquire() as conn:
            resources = {r.id: r for r in await _resources(conn, rules.vendor_id)}
        shards = {self.keys.shard_of(r.shard_key) for r in resources.values()}
        redis = self.access.redis
        flagged = 0
        now = clock.now_ms()
        for shard in sorted(shards):
            ids = await redis.zrange(self.keys.deadlines(shard), 0, -1)
            if not ids:
                continue
            pipe = redis.pipeline(transaction=False)
            for rid in ids:
                pipe.hmget(self.keys.reservation(rid), "st", "vd", "rs", "s", "e")
            records = await pipe.execute()
            calls = []
            for rid, (state, vendor, resource, start, end) in zip(ids, records):
                if vendor != rules.vendor_id or state is None \
                        or State(state) not in PRE_COMMIT:
                    continue
                reasons = [r for r in av.refusals(rules, resource, int(start), int(end), now)
                           if r in REVALIDATED]
                flagged += bool(reasons)
                calls.append(self.access.call(
                    "availability_flag", [self.keys.reservation(rid)],
                    [resource, start, end, ",".join(reasons)]))
            await asyncio.gather(*calls)
        return flagged

    # ---- placement ------------------------------------------------------------------------
    async def check_placement(self, vendor: Vendor, resource: Resource, start_ms: int,
                              end_ms: int, now_ms: int | None = None) -> str:
        """Refuse a slot the vendor's rules refuse (409 SLOT_UNAVAILABLE with the reasons);
        answers the revision checked, for the hold script to confirm. No Redis call."""
        rules = await self.rules.get(vendor.id)
        self.refuse(rules, resource, start_ms, end_ms, now_ms)
        return str(rules.revision)

    @staticmethod
    def refuse(rules: Rules, resource: Resource, start_ms: int, end_ms: int,
               now_ms: int | None = None) -> None:
        now = clock.now_ms() if now_ms is None else now_ms
        reasons = av.refusals(rules, resource.id, start_ms, end_ms, now)
        if reasons:
            raise SlotRefused("the vendor's availability refuses this slot",
                              details={"reasons": reasons, "vendorId": rules.vendor_id,
                                       "resourceId": resource.id})

    async def retry_stale(self, place, placement, recheck=None):
        """The hold script said the rules are stale (RULES_STALE): reload them (and publish
        what Postgres says, which heals a Redis that lost the key), check the placement
        again and retry ``place`` (a few times at most). ``recheck(rules, placement)``
        answers the placement checked against ``rules`` (a pooled or multi-resource
        placement checks its members or items, issue 16); by default its one slot."""
        vendor_id = placement.vendor.id
        for _ in range(STALE_RETRIES):
            rules = await self.rules.reload(vendor_id, publish=True)
            if recheck is None:
                self.refuse(rules, placement.resource, placement.start_ms, placement.end_ms)
            else:
                placement = await recheck(rules, placement)
            placement = replace(placement, rules_revision=str(rules.revision))
            try:
                return await place(placement)
            except RulesStale:
                continue
        raise NotReady("the vendor's availability keeps changing; try again",
                       details={"vendorId": vendor_id}, retry_after_ms=100)

    async def check_move(self, vendor_id: str, resource: Resource, start_ms: int,
                         end_ms: int, now_ms: int | None = None) -> None:
        """A modify's new slot against current rules: the published revision is read (one
        GET; a modify is not on the create path) and the rules reloaded when it differs."""
        rules = await self.rules.get(vendor_id)
        published = await self.access.redis.get(
            self.keys.availability_revision(resource.id, resource.shard_name))
        rules = await self.rules.observed(vendor_id, [published or "0"], rules)
        self.refuse(rules, resource, start_ms, end_ms, now_ms)

    # ---- the availability answer ----------------------------------------------------------
    async def read(self, principal: Principal, vendor_id: str, pairs: list[tuple[str, str]],
                   client_ip: str | None = None) -> AvailabilityAnswer:
        from engine.service import check_vendor_resource, parse_bool, parse_int, query_dict

        require(principal, "availability.read")
        require_vendor_scope(principal, vendor_id)
        query = query_dict(pairs, AVAILABILITY_QUERY)
        vendor = await self.catalog.vendor(vendor_id)
        if "resourceId" in query:
            resources = [await self.catalog.resource(query["resourceId"])]
            check_vendor_resource(vendor, resources[0])
        else:
            default = await self.catalog.resource(vendor.default_resource_id)
            others = sorted((r for r in await self.catalog.resources_of(vendor.id)
                             if r.id != default.id), key=lambda r: r.id)
            resources = [default, *others]
        for name in ("startTime", "endTime"):
            if name not in query:
                raise ValidationError(f"{name} is required", code="MISSING_PARAMETER",
                                      details={"field": name})
        start_ms = parse_time(query["startTime"], "startTime")
        end_ms = parse_time(query["endTime"], "endTime")
        include_confidence = parse_bool(query.get("includeConfidence", "false"),
                                        "includeConfidence")
        explain = parse_bool(query.get("explain", "false"), "explain")
        rules = await self.rules.get(vendor.id)
        default_minutes = rules.schedule.slot_duration_minutes if rules.schedule else 60
        slot_minutes = parse_int(query.get("slotDuration", str(default_minutes)),
                                 "slotDuration", 1, 7 * 24 * 60)
        slot_ms = 0
        for resource in resources:
            slot_ms = check_query(resource, start_ms, end_ms, slot_minutes,
                                  self.settings.max_query_range_ms)
        if explain and (end_ms - start_ms) // slot_ms > MAX_EXPLAIN_SLOTS:
            raise ValidationError(f"explain covers at most {MAX_EXPLAIN_SLOTS} slots",
                                  code="RANGE_TOO_LARGE",
                                  details={"field": "explain", "maxSlots": MAX_EXPLAIN_SLOTS})
        limits = self.reservations._rate_checks(principal, client_ip) \
            if self.reservations is not None else []
        # One round trip: the rate limits and, per resource, its units with the published
        # rules revision (a read writes nothing, so it may go with the limiter).
        reads = [self._units(resource, start_ms, end_ms) for resource in resources]
        results = await asyncio.gather(*reads, *limits, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        units = results[:len(resources)]
        started = clock.monotonic()
        rules = await self.rules.observed(vendor.id, [u[2] for u in units], rules)
        now = clock.now_ms()
        per_resource = {}
        for resource, (first, occupancy, _) in zip(resources, units):
            per_resource[resource.id] = av.compute(
                rules, resource.id, unit_ms=resource.unit_ms,
                buffer_before_ms=resource.buffer_before_ms,
                buffer_after_ms=resource.buffer_after_ms, start_ms=start_ms, end_ms=end_ms,
                slot_ms=slot_ms, now_ms=now, occupancy=occupancy, first_unit=first)
        union = len(resources) > 1
        slots = av.union(per_resource) if union else per_resource[resources[0].id]
        version = av.version(rules, [r.id for r in resources], start_ms, end_ms, slot_ms,
                             [u[1] for u in units], slots)
        explained = None
        if explain:
            explained = [[{"resourceId": r.id, **step}
                          for r in resources
                          for step in av.explain(rules, r.id, s.start_ms, s.end_ms, now)]
                         for s in slots]
        return AvailabilityAnswer(
            vendor_id=vendor.id, resource_id=resources[0].id,
            resource_ids=[r.id for r in resources], union=union, start_ms=start_ms,
            end_ms=end_ms, computed_at_ms=now, computed_version=version,
            computation_ms=(clock.monotonic() - started) * 1000, slots=slots,
            include_confidence=include_confidence, explain=explained)

    async def _units(self, resource: Resource, start_ms: int, end_ms: int
                     ) -> tuple[int, str, str]:
        unit = resource.unit_ms
        first = (start_ms - resource.buffer_before_ms) // unit
        last = (end_ms + resource.buffer_after_ms) // unit - 1
        reply = await self.access.call(
            "read_units", [self.keys.unit_root(self.keys.shard_of(resource.shard_name)),
                           self.keys.availability_revision(resource.id, resource.shard_name)],
            [resource.id, first, last, last - first + 1])
        if int(reply[0]) != 1:
            raise ValidationError(str(reply[1]))
        return first, reply[1], str(reply[3])

