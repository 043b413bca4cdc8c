"""The reservation service: what the API may ask of the engine, and who may ask it.

The one place that decides permissions (engine/permissions.py's table), tenancy, catalog
lookups and every 4xx, each once, before the first write; the engine
(engine/reservations.py) then executes already-validated input. Routes parse and render.

Order of refusals: who (403), then what (404: vendor, resource, reservation), then the finer
rules of the request (400), then business rules (409); rate limits (429) are asked after
validation, so a refused request has written nothing.

Round trips (the access layer coalesces the calls of one event-loop turn into one batch):

- create: (1) IP and partner rate limits, the partner's cap slot and the Idempotency-Key
  claim in one batch; (2) the hold. The stored response (and, on a definite failure, the
  cap slot's release) is queued, not awaited.
- transition: (1) the rate limits; (2) the transition, whose reply carries the record as the
  transition left it (what the response shows), tenancy checked inside the script. The cap
  bookkeeping is queued, not awaited. With rate limits off: one round trip.
- read: one (rate limits and the record in one batch; a read writes nothing, so it can go
  with the limiter).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from ulid import ULID

from engine import clock, metrics
from engine.catalog_cache import CatalogCache
from engine.errors import (
    CapExceeded,
    EngineError,
    HoldConflict,
    NotFound,
    NotReady,
    PaymentRequired,
    RulesStale,
    TerminalState,
    ValidationError,
)
from engine.idempotency import IdempotencyStore, StoredResponse, check_key
from engine.lifecycle import PARTNER, SYSTEM, SYSTEM_SCOPE, TERMINAL, VENDOR, State
from engine.limits import Limits
from engine.permissions import Principal, can_see, require
from engine.reservations import (
    MAX_METADATA_BYTES,
    MAX_TEXT,
    Moved,
    Reservation,
    ReservationEngine,
)
from engine.resources import MINUTE_MS, Resource, Vendor
from engine.times import parse_range, parse_time

MAX_ITEMS = 20  # items of one multi-resource reservation (issue 16)
MAX_TTL_MS = 86_400_000  # the largest extension asked for; the hold's own limit is lower
MIN_TTL_MS = 1_000
AUDIT_QUERY = {"reservationId", "resourceId", "actor", "since", "until", "limit",
               "startingAfter"}
# Kept for callers that named the old constant: the partner scope of system-created
# reservations (engine/lifecycle.py SYSTEM_SCOPE, which no partner id can equal).
SYSTEM_PARTNER = SYSTEM_SCOPE

# Route action -> (permission, engine action per outcome). Authorization endpoints take an
# outcome; the others have one engine action.
ACTIONS: dict[str, tuple[str, dict[str | None, str]]] = {
    "vendor-confirmation": ("reservation.vendor-confirmation",
                            {None: "vendor-confirmation"}),
    "vendor-authorization": ("reservation.vendor-authorization",
                             {"authorized": "vendor-authorization",
                              "failed": "vendor-authorization-failed"}),
    "requester-authorization": ("reservation.requester-authorization",
                                {"authorized": "requester-authorization",
                                 "failed": "requester-authorization-failed"}),
    "commit": ("reservation.commit", {None: "commit"}),
    "cancel": ("reservation.cancel", {None: "cancel"}),
    "extend": ("reservation.extend", {None: "extend"}),
}

# Characters that draw nothing (white space, C1 controls, format characters, combining
# marks, fillers, variation selectors): a requester id made only of these names nobody. A
# character class the OpenAPI document publishes as is (Python and ECMA-262 read it alike).
INVISIBLE = ("\\s\\u0080-\\u00a0\\u00ad\\u0300-\\u036f\\u034f\\u061c\\u115f\\u1160"
             "\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u2028-\\u202f\\u205f-\\u206f"
             "\\u2800\\u3000\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0\\ufff0-\\ufff8")
_VISIBLE_RE = re.compile(f"[^{INVISIBLE}]")


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """A parsed creation body (types checked by the route; every rule checked here)."""

    vendor_id: str
    resource_id: str | None
    slot_start: str | None
    slot_end: str | None
    requester_id: str
    metadata: dict[str, Any] | None
    idempotency_key: str | None  # the body's idempotencyKey
    request_id: str = "-"
    fingerprint: str | None = None  # of the canonical request, when a key is given
    idempotency_header: str | None = None  # the Idempotency-Key header
    resource_group_id: str | None = None  # a pooled hold (issue 16): a member is chosen
    near_resource_id: str | None = None  # the adjacent strategy's anchor for this hold
    near_zone: str | None = None  # or a zone of the adjacent group
    # A multi-resource reservation (issue 16): (resourceId, slotStartTime, slotEndTime) each.
    items: tuple[tuple[Any, Any, Any], ...] | None = None


@dataclass(frozen=True, slots=True)
class Created:
    moved: Moved
    vendor: Vendor
    resource_id: str | None = None  # the resource held (a pooled hold's chosen member)
    items: tuple | None = None  # a multi-resource reservation's (resource, start ms, end ms)


@dataclass(frozen=True, slots=True)
class Answer:
    """What a create answers: a fresh result, a stored error, or a replay."""

    status: int
    body: bytes
    replayed: bool = False


# render(created) -> (status, body); render_error(error) -> (status, body): the API's views.
Render = Callable[[Created], tuple[int, bytes]]
RenderError = Callable[[EngineError], tuple[int, bytes]]


class _Replay(Exception):
    def __init__(self, stored: StoredResponse) -> None:
        self.stored = stored


class ReservationService:
    def __init__(self, engine: ReservationEngine, catalog: CatalogCache, limits: Limits,
                 *, load_stored=None, rehydrate=None,
                 idempotency: IdempotencyStore | None = None, availability=None,
                 on_bulk_release=None, groups=None) -> None:
        self.engine = engine
        # engine.availability_service.AvailabilityService (issue 13): the vendor's hours,
        # busy blocks, notice and horizon checked before a placement or a move.
        self.availability = availability
        # engine.pool.GroupService: resource groups for pooled holds (issue 16).
        self.groups = groups
        self.catalog = catalog
        self.limits = limits
        self.keys = engine.keys
        self.settings = engine.settings
        self.idempotency = idempotency or IdempotencyStore(engine.access, engine.keys,
                                                           engine.settings)
        # async (reservation_id) -> Reservation | None: the Postgres record of a reservation
        # whose Redis record is gone (terminal and past retention).
        self._load_stored = load_stored
        # async () -> None: restore booked markers when Redis reports it lost them.
        self._rehydrate = rehydrate
        # async (bulk id, at ms, actor, key id, reason, released, failed) -> None: the ops
        # event of a bulk release (issue 14, engine/webhook_events.emit_bulk_release).
        self._on_bulk_release = on_bulk_release

    # ---- who is asking ------------------------------------------------------------------
    @staticmethod
    def scope_of(principal: Principal) -> str:
        """The partner scope a principal creates under: its partner id, or for system keys
        :data:`SYSTEM_SCOPE` (never derived from a partner id)."""
        if principal.role == PARTNER and principal.partner_id:
            return principal.partner_id
        if principal.role == SYSTEM:
            return SYSTEM_SCOPE
        raise ValidationError("this key creates no reservations")

    @staticmethod
    def _tenancy(principal: Principal) -> tuple[str, str]:
        """(partner, vendor) the transition script must match ('' = any)."""
        if principal.role == PARTNER:
            return principal.partner_id or "\x00", ""
        if principal.role == VENDOR:
            return "", principal.vendor_id or "\x00"
        return "", ""

    # ---- abuse controls ---------------------------------------------------------------
    def _rate_checks(self, principal: Principal, client_ip: str | None) -> list[Awaitable]:
        checks: list[Awaitable] = []
        settings = self.limits.settings
        # A limiter switched off (rate 0) costs no call and no task.
        if client_ip and settings.ip_rate_per_minute:
            checks.append(self.limits.check_ip_rate(client_ip))
        if principal.role != SYSTEM and settings.partner_rate_per_minute:
            checks.append(self.limits.check_partner_rate(principal.partner_id
                                                         or principal.key_id))
        return checks

    async def throttle(self, principal: Principal, client_ip: str | None) -> None:
        """Count the request against its client IP and its key (partner); 429 when over.
        Both limiters are asked in the same Redis round trip."""
        checks = self._rate_checks(principal, client_ip)
        if checks:
            await _first_error(await asyncio.gather(*checks, return_exceptions=True))

    # ---- creation ---------------------------------------------------------------------
    async def validate_create(self, principal: Principal,
                              req: CreateRequest) -> tuple[Vendor, Resource, int, int]:
        """Everything creation checks before its first write, in the order of refusals."""
        require(principal, "reservation.create")
        vendor = await self.catalog.vendor(req.vendor_id)
        if req.items is not None:
            return await self._validate_items(vendor, req)
        if req.resource_group_id is not None:
            return await self._validate_pooled(principal, vendor, req)
        for name, value in (("nearResourceId", req.near_resource_id),
                            ("nearZone", req.near_zone)):
            if value is not None:
                raise ValidationError(f"{name} goes with resourceGroupId",
                                      code="INVALID_FIELD", details={"field": name})
        resource = await self.catalog.resource(req.resource_id or vendor.default_resource_id)
        start_ms, end_ms = parse_range(req.slot_start, req.slot_end, "slotStartTime",
                                       "slotEndTime")
        check_vendor_resource(vendor, resource)
        self._check_slot(resource, start_ms, end_ms)
        check_requester(req.requester_id)
        check_metadata(req.metadata)
        idempotency_key(req.idempotency_header, req.idempotency_key)
        self.check_payments(vendor)
        return vendor, resource, start_ms, end_ms

    async def _validate_pooled(self, principal: Principal, vendor: Vendor, req: CreateRequest):
        """A pooled create (issue 16): the group, then every member's grid, then the rest.
        Answers the first member (its shard is every member's) and the PoolChoice."""
        from engine.pool import PoolChoice

        if req.resource_id is not None:
            raise ValidationError("give resourceId or resourceGroupId, not both",
                                  code="INVALID_FIELD", details={"field": "resourceGroupId"})
        if self.groups is None:
            raise ValidationError("resource groups are not enabled", code="INVALID_FIELD",
                                  details={"field": "resourceGroupId"})
        group, members = await self.groups.resolve(vendor, req.resource_group_id)
        if req.near_resource_id is not None and (req.near_resource_id not in group.resource_ids
                                                 or group.strategy != "adjacent"):
            raise ValidationError("nearResourceId must be a member of an adjacent group",
                                  code="INVALID_FIELD", details={"field": "nearResourceId"})
        if req.near_zone is not None and (req.near_zone not in dict(group.zones)
                                          or group.strategy != "adjacent"):
            raise ValidationError("nearZone must be a zone of an adjacent group",
                                  code="INVALID_FIELD", details={"field": "nearZone"})
        start_ms, end_ms = parse_range(req.slot_start, req.slot_end, "slotStartTime",
                                       "slotEndTime")
        by_id = {m.id: m for m in members}
        candidates = []
        for rid in group.candidate_order(req.near_resource_id, req.near_zone):
            member = by_id[rid]
            self._check_slot(member, start_ms, end_ms)
            first, last = member.units(start_ms, end_ms, self.settings.max_hold_units)
            candidates.append((member, first, last, *member.unit_span_ms(first, last)))
        check_requester(req.requester_id)
        check_metadata(req.metadata)
        idempotency_key(req.idempotency_header, req.idempotency_key)
        self.check_payments(vendor)
        choice = PoolChoice(group.group_id, group.strategy == "best_fit", tuple(candidates))
        return vendor, (members[0], choice), start_ms, end_ms

    async def _validate_items(self, vendor: Vendor, req: CreateRequest):
        """A multi-resource create (issue 16): 1..MAX_ITEMS items of the vendor's resources
        under one hash tag, not overlapping one another; answers the first item's resource
        and ("items", ...) for the engine (None for a single item: a plain create)."""
        for name, value in (("slotStartTime", req.slot_start), ("slotEndTime", req.slot_end),
                            ("resourceId", req.resource_id),
                            ("resourceGroupId", req.resource_group_id),
                            ("nearResourceId", req.near_resource_id),
                            ("nearZone", req.near_zone)):
            if value is not None:
                raise ValidationError(f"items replace {name}", code="INVALID_FIELD",
                                      details={"field": name})
        if not req.items:
            raise ValidationError("items must list at least one item", code="NO_ITEMS",
                                  details={"field": "items"})
        if len(req.items) > MAX_ITEMS:
            raise ValidationError(f"a reservation has at most {MAX_ITEMS} items",
                                  code="TOO_MANY_ITEMS",
                                  details={"field": "items", "maximum": MAX_ITEMS,
                                           "items": len(req.items)})
        items, resources = [], []
        for position, (resource_id, start, end) in enumerate(req.items):
            resource = await self.catalog.resource(resource_id)
            check_vendor_resource(vendor, resource, f"items[{position}].resourceId")
            start_ms, end_ms = parse_range(start, end, f"items[{position}].slotStartTime",
                                           f"items[{position}].slotEndTime")
            self._check_slot(resource, start_ms, end_ms)
            first, last = resource.units(start_ms, end_ms, self.settings.max_hold_units)
            items.append((resource.id, start_ms, end_ms, first, last,
                          *resource.unit_span_ms(first, last)))
            resources.append(resource)
        if len({self.keys.shard_of(r.shard_name) for r in resources}) > 1:
            from engine.errors import GroupNotColocated

            raise GroupNotColocated("the items' resources live under different shard hash "
                                    "tags; re-key the vendor (slotguard rekey) first",
                                    code="ITEMS_NOT_COLOCATED",
                                    details={"field": "items", "vendorId": vendor.id})
        for i, a in enumerate(items):
            for b in items[:i]:
                if a[0] == b[0] and a[3] <= b[4] and b[3] <= a[4]:
                    raise ValidationError("two items overlap on one resource (buffers "
                                          "included)", code="ITEMS_OVERLAP",
                                          details={"field": "items", "resourceId": a[0]})
        check_requester(req.requester_id)
        check_metadata(req.metadata)
        idempotency_key(req.idempotency_header, req.idempotency_key)
        self.check_payments(vendor)
        choice = ("items", tuple(items) if len(items) > 1 else None, tuple(items))
        return vendor, (resources[0], choice), items[0][1], items[0][2]

    def check_payments(self, vendor: Vendor) -> None:
        """A vendor that requires payment needs a payment provider (409)."""
        if vendor.payment_required and not self.engine.payments_enabled:
            raise PaymentRequired("this vendor requires payment and no payment provider is "
                                  "configured yet", details={"vendorId": vendor.id})

    def _check_slot(self, resource: Resource, start_ms: int, end_ms: int) -> None:
        """The slot on the resource's unit grid and within the units one hold may cover."""
        if start_ms % resource.unit_ms or end_ms % resource.unit_ms:
            raise ValidationError("slotStartTime and slotEndTime must sit on the vendor's "
                                  "unit grid", code="SLOT_NOT_ALIGNED",
                                  details={"field": "slotStartTime",
                                           "unitMinutes": resource.unit_ms // MINUTE_MS})
        units = ((end_ms + resource.buffer_after_ms)
                 - (start_ms - resource.buffer_before_ms)) // resource.unit_ms
        if units > self.settings.max_hold_units:
            raise ValidationError("the slot is longer than one hold may be",
                                  code="SLOT_TOO_LONG",
                                  details={"field": "slotEndTime", "units": units,
                                           "maxUnits": self.settings.max_hold_units})

    async def create(self, principal: Principal, req: CreateRequest, *,
                     client_ip: str | None, render: Render,
                     render_error: RenderError) -> Answer:
        """Validate once, then hold the slot in two Redis round trips (see the module
        docstring). With an Idempotency-Key the answer (a success or a definite client
        error) is stored for replay; a replay answers the stored bytes."""
        vendor, resource, start_ms, end_ms = await self.validate_create(principal, req)
        pool = multi = listed = None
        if isinstance(resource, tuple):  # pooled or items: (first resource, the choice)
            resource, pool = resource
            if isinstance(pool, tuple):  # ("items", items for the engine or None, all)
                _, multi, listed = pool
                pool = None
        scope = self.scope_of(principal)
        key = idempotency_key(req.idempotency_header, req.idempotency_key)
        placement = self.engine.placement(
            partner_id=scope, vendor=vendor, resource=resource, start_ms=start_ms,
            end_ms=end_ms, requester_id=req.requester_id,
            metadata_text=orjson.dumps(_with_request_id(req.metadata, req.request_id)).decode(),
            idempotency_key=key or "", triggered_by=principal.actor,
            reservation_id=self._reservation_id(scope, resource.shard_name, key))
        if pool is not None:  # issue 16: members the vendor's availability refuses drop out
            placement = await self._recheck(dataclasses.replace(placement, pool=pool))
        elif multi is not None:  # issue 16: every item against the vendor's availability
            placement = await self._recheck(dataclasses.replace(placement, items=multi))
        else:
            placement = await self._check_availability(placement, start_ms, end_ms)
        claimed = False

        async def claim() -> None:
            nonlocal claimed
            stored = await self.idempotency.begin(scope, key, req.fingerprint)
            if stored is not None:
                raise _Replay(stored)
            claimed = True

        admission = self._rate_checks(principal, client_ip)
        if key is not None:
            admission.append(claim())
        try:
            moved = await self._place(placement, admission, pool)
        except _Replay as replay:
            metrics.IDEMPOTENT_REPLAYS.inc()
            return Answer(replay.stored.status, replay.stored.body_bytes, replayed=True)
        except EngineError as exc:
            if isinstance(exc, HoldConflict):
                metrics.HOLDS_CONFLICTED.inc()
                # A multi-resource conflict names its item's resource (issue 16).
                named = exc.details.get("resourceId")
                held = self.catalog.catalog.get(named) if named in self.catalog.catalog \
                    else resource
                exc = await self._readable_conflict(principal, exc, held)
            elif isinstance(exc, CapExceeded):
                metrics.CAP_REJECTIONS.labels(scope="partner").inc()
            if not claimed:
                raise exc from None
            status, body = render_error(exc)
            if status >= 500 or status == 429:  # the client should simply retry
                self.idempotency.abandon_soon(scope, key, req.fingerprint)
                raise exc from None
            self.idempotency.complete_soon(scope, key, req.fingerprint, status, body)
            return Answer(status, body)
        except BaseException:
            if claimed:
                self.idempotency.abandon_soon(scope, key, req.fingerprint)
            raise
        metrics.HOLDS_PLACED.inc()
        status, body = render(Created(moved, vendor, moved.resource_id or resource.id,
                                      tuple(i[:3] for i in listed) if listed else None))
        if claimed:
            self.idempotency.complete_soon(scope, key, req.fingerprint, status, body)
        return Answer(status, body)

    async def _check_availability(self, placement, start_ms: int, end_ms: int):
        """Issue 13: the slot against the vendor's availability rules (in the past, minimum
        notice, horizon, hours, busy blocks: 409 SLOT_UNAVAILABLE), before any write and
        without a Redis call; the hold script confirms the rules' revision."""
        if self.availability is None:
            return placement
        revision = await self.availability.check_placement(placement.vendor,
                                                           placement.resource, start_ms, end_ms)
        return dataclasses.replace(placement, rules_revision=revision)

    async def _recheck(self, placement, rules=None):
        """Issue 16 with issue 13: a pooled or multi-resource placement against the vendor's
        availability rules (``rules``, else the cached ones), before any write and without a
        Redis call; the hold script confirms the rules' revision beside every resource it
        may take. A pooled hold's candidates the rules refuse drop out (busy blocks may be
        per resource; none left: the first member's refusal, 409); every item of a
        multi-resource hold must pass (409). Also the RULES_STALE retry's check."""
        if self.availability is None:
            return placement
        from engine import availability as av

        if rules is None:
            rules = await self.availability.rules.get(placement.vendor.id)
        now = clock.now_ms()
        if placement.pool is not None:
            pool = placement.pool
            allowed = tuple(c for c in pool.candidates
                            if not av.refusals(rules, c[0].id, placement.start_ms,
                                               placement.end_ms, now))
            if not allowed:
                self.availability.refuse(rules, pool.candidates[0][0], placement.start_ms,
                                         placement.end_ms, now)
            placement = dataclasses.replace(placement,
                                            pool=dataclasses.replace(pool, candidates=allowed))
        else:
            for resource_id, start_ms, end_ms, *_ in placement.items:
                self.availability.refuse(rules, await self.catalog.resource(resource_id),
                                         start_ms, end_ms, now)
        return dataclasses.replace(placement, rules_revision=str(rules.revision))

    async def _place(self, placement, admission: list[Awaitable], pool=None) -> Moved:
        """``pool``: a pooled hold's candidates before the rules filtered them."""
        try:
            return await self.engine.place(placement, admission)
        except RulesStale:
            # Issue 13: the vendor's availability changed since this process cached it.
            # A pooled hold is checked again from every candidate (the fresh rules may allow
            # a member the cached ones refused), a multi-resource hold item by item.
            recheck = None
            if pool is not None:
                async def recheck(rules, p):
                    return await self._recheck(dataclasses.replace(p, pool=pool), rules)
            elif placement.items is not None:
                async def recheck(rules, p):
                    return await self._recheck(p, rules)
            return await self.availability.retry_stale(self.engine.place, placement, recheck)
        except NotReady:
            # Redis lost its data (restart): restore the booked markers, then retry once
            # (the admission already passed; the cap slot is taken again idempotently).
            if self._rehydrate is None:
                raise
            await self._rehydrate()
            return await self.engine.place(placement)

    def _reservation_id(self, scope: str, shard_key: str, key: str | None) -> str:
        """With an idempotency key the id is derived from it, so a retry after a crash
        between the hold and the stored response lands on the same reservation."""
        if key is None:
            return self.keys.new_reservation_id(shard_key)
        raw = hashlib.sha256(f"{scope}\n{key}".encode()).digest()[:16]
        return f"rsv_{self.keys.shard_of(shard_key)}_{ULID.from_bytes(raw)}"

    async def _readable_conflict(self, principal: Principal, exc: HoldConflict,
                                 resource: Resource) -> HoldConflict:
        """ISO times, and the holder only when the caller may know it (issue 17)."""
        from engine.conflicts import readable_conflict

        return await readable_conflict(principal, exc, resource, self.engine.access.redis,
                                       self.keys)

    # ---- reads ------------------------------------------------------------------------
    async def read(self, principal: Principal, reservation_id: str,
                   client_ip: str | None = None) -> Reservation:
        """One round trip: the rate limits and the record in one batch (a read writes
        nothing, so reading before the limiter answers changes nothing)."""
        require(principal, "reservation.read")
        self._known_id(reservation_id)
        found, *limited = await asyncio.gather(self.engine.get(reservation_id),
                                               *self._rate_checks(principal, client_ip),
                                               return_exceptions=True)
        await _first_error(limited)
        if isinstance(found, BaseException):
            raise found
        if found is None and self._load_stored is not None:
            found = await self._load_stored(reservation_id)
        if found is None or not can_see(principal, found.partner_id, found.vendor_id):
            raise _not_found(reservation_id)
        return found

    def _known_id(self, reservation_id: str) -> None:
        try:
            self.keys.shard_of_id(reservation_id)
        except ValueError:  # not one of our ids: no lookup anywhere
            raise _not_found(reservation_id) from None

    # ---- transitions ------------------------------------------------------------------
    async def act(self, principal: Principal, reservation_id: str, action: str, *,
                  outcome: str | None = None, expected_version: int | None = None,
                  reason: str | None = None, metadata: dict[str, Any] | None = None,
                  ttl_ms: int | None = None, client_ip: str | None = None,
                  request_id: str = "-") -> Reservation:
        """One lifecycle step, compare-and-set on ``expected_version`` when given. Answers
        the record as the step's own script left it (never a later state read back)."""
        permission, engine_actions = ACTIONS[action]
        require(principal, permission)
        if action.endswith("-authorization") and outcome is None:
            outcome = "authorized"
        if outcome not in engine_actions:
            raise ValidationError("outcome must be 'authorized' or 'failed'"
                                  if outcome is not None or None not in engine_actions
                                  else "this action takes no outcome",
                                  code="INVALID_OUTCOME", details={"field": "outcome"})
        reason = check_reason(reason)
        if ttl_ms is not None and not MIN_TTL_MS <= ttl_ms <= MAX_TTL_MS:
            raise ValidationError(f"ttlMs must be between {MIN_TTL_MS} and {MAX_TTL_MS}",
                                  code="INVALID_FIELD",
                                  details={"field": "ttlMs", "maximum": MAX_TTL_MS})
        check_metadata(metadata)
        self._known_id(reservation_id)
        await self.throttle(principal, client_ip)
        return await self._apply(principal, reservation_id, engine_actions[outcome],
                                 expected_version, reason,
                                 _with_request_id(metadata, request_id), ttl_ms,
                                 self._tenancy(principal))

    async def _apply(self, principal: Principal, rid: str, engine_action: str,
                     expected_version: int | None, reason: str,
                     metadata: dict[str, Any] | None, ttl_ms: int | None,
                     scope: tuple[str, str]) -> Reservation:
        try:
            if engine_action == "extend":
                moved = await self.engine.extend(
                    rid, actor=principal.actor, ttl_ms=ttl_ms,
                    expected_version=expected_version, reason=reason, metadata=metadata,
                    scope=scope, with_record=True, wait_cap=False)
            else:
                moved = await self.engine.act(
                    rid, engine_action, actor=principal.actor,
                    expected_version=expected_version, reason=reason, metadata=metadata,
                    scope=scope, with_record=True, wait_cap=False)
        except NotFound:
            # Gone from Redis: only the Postgres record of a terminal reservation may be
            # left, and nothing can move it any more.
            stored = await self._load_stored(rid) if self._load_stored is not None else None
            if stored is None or not can_see(principal, stored.partner_id, stored.vendor_id):
                raise _not_found(rid) from None
            raise TerminalState(f"the reservation is {stored.state}, a terminal state",
                                details={"reservationId": rid,
                                         "state": stored.state}) from None
        assert moved.reservation is not None
        return moved.reservation

    # ---- modify / move ----------------------------------------------------------------
    async def modify(self, principal: Principal, reservation_id: str, *,
                     resource_id: str | None, slot_start: Any, slot_end: Any,
                     expected_version: int | None = None, client_ip: str | None = None,
                     request_id: str = "-", now_ms: int | None = None) -> Reservation:
        """Move a live pre-commit reservation to a new slot and/or another resource of its
        vendor (lua/modify_reservation.lua: all or nothing, version + 1). Two round trips:
        (1) the record with the rate limits (which resource and vendor it is on), (2) the
        move; the script checks tenancy, version, state and vendor again, atomically."""
        require(principal, "reservation.modify")
        self._known_id(reservation_id)
        resource = await self.catalog.resource(resource_id) if resource_id is not None \
            else None
        current = await self.read(principal, reservation_id, client_ip)
        start_ms, end_ms = parse_range(slot_start, slot_end, "slotStartTime", "slotEndTime")
        if current.state in TERMINAL:
            raise TerminalState(f"the reservation is {current.state}, a terminal state",
                                details={"reservationId": reservation_id,
                                         "state": current.state})
        if resource is None:
            resource = await self.catalog.resource(current.resource_id)
        if resource.vendor_id and resource.vendor_id != current.vendor_id:
            raise ValidationError("the resource does not belong to the reservation's vendor",
                                  code="RESOURCE_VENDOR_MISMATCH",
                                  details={"field": "resourceId", "resourceId": resource.id})
        self._check_slot(resource, start_ms, end_ms)
        now = clock.now_ms() if now_ms is None else now_ms
        if self.availability is not None:
            # Issue 13: the past, notice, horizon, hours and blocks: 409 SLOT_UNAVAILABLE.
            await self.availability.check_move(current.vendor_id, resource, start_ms, end_ms,
                                               now)
        elif start_ms < now:
            raise ValidationError("slotStartTime is in the past", code="SLOT_IN_PAST",
                                  details={"field": "slotStartTime"})
        try:
            moved = await self.engine.modify(
                reservation_id, actor=principal.actor, resource=resource, start_ms=start_ms,
                end_ms=end_ms, expected_version=expected_version,
                metadata={"requestId": request_id},
                partner_scope=self._tenancy(principal)[0], wait_cap=False)
        except HoldConflict as exc:
            metrics.HOLDS_CONFLICTED.inc()
            raise await self._readable_conflict(principal, exc, resource) from None
        except NotFound:
            raise _not_found(reservation_id) from None
        assert moved.reservation is not None
        return moved.reservation

    # ---- operations -------------------------------------------------------------------
    async def release(self, principal: Principal, reservation_id: str, reason: Any,
                      client_ip: str | None = None) -> Reservation:
        """Manual release: cancel as ops/admin with a reason, through the normal event path."""
        require(principal, "ops.release")
        reason = check_reason(reason)
        self._known_id(reservation_id)
        await self.throttle(principal, client_ip)
        # Who released it rides on the event (hold.manually_released, issue 14).
        return await self._apply(principal, reservation_id, "cancel", None, reason,
                                 {"releasedBy": principal.key_id}, None, ("", ""))

    async def bulk_release(self, principal: Principal, reason: Any, *,
                           reservation_ids: list[str] | None = None,
                           resource_id: str | None = None, start: str | None = None,
                           end: str | None = None,
                           client_ip: str | None = None) -> dict[str, Any]:
        require(principal, "ops.bulk-release")
        reason = check_reason(reason)
        resource = None
        if reservation_ids is None:
            resource = await self.catalog.resource(resource_id or "")  # 404 before 400
            start_ms, end_ms = parse_range(start, end, "startTime", "endTime")
            if end_ms - start_ms > self.settings.max_query_range_ms:
                raise ValidationError("the range is too long", code="RANGE_TOO_LARGE",
                                      details={"field": "endTime",
                                               "maxRangeMs": self.settings.max_query_range_ms})
        await self.throttle(principal, client_ip)
        if resource is not None:
            from engine.occupancy import held_by

            reservation_ids = [h for h in await held_by(self.engine.access, self.keys,
                                                        resource, start_ms, end_ms)
                               if h.startswith("rsv_")]
        released, failed = [], []
        # One hold.bulk_released event names them all; each cancel carries its id (issue 14).
        bulk_id = f"blk_{ULID()}"
        marker = {"bulkReleaseId": bulk_id, "releasedBy": principal.key_id}
        for rid in reservation_ids or []:
            try:
                self._known_id(rid)
                moved = await self._apply(principal, rid, "cancel", None, reason, marker, None,
                                          ("", ""))
                released.append({"reservationId": rid, "state": moved.state.value})
            except EngineError as exc:
                failed.append({"reservationId": rid, "code": exc.code, "message": exc.message})
        if released and self._on_bulk_release is not None:
            await self._on_bulk_release(bulk_id, clock.now_ms(), principal.actor,
                                        principal.key_id, reason, released, failed)
        return {"released": released, "failed": failed}


    # ---- audit (availability: engine/availability_service.py, issue 13) ---------------------
    async def audit(self, principal: Principal, pool, pairs: list[tuple[str, str]],
                    client_ip: str | None = None) -> list:
        """Audit rows (ops, admin, system), filters checked before the limiter and Postgres."""
        return (await self.audit_page(principal, pool, pairs, client_ip))[0]

    async def audit_page(self, principal: Principal, pool, pairs: list[tuple[str, str]],
                         client_ip: str | None = None) -> tuple[list, str | None]:
        """A page of audit rows, oldest first, and the cursor of the next page (issue 17:
        ``startingAfter``; None on the last page)."""
        from engine import cursor
        from engine.store import queries

        require(principal, "ops.audit")
        query = query_dict(pairs, AUDIT_QUERY)
        since = parse_time(query["since"], "since") if "since" in query else None
        until = parse_time(query["until"], "until") if "until" in query else None
        limit = parse_int(query.get("limit", "100"), "limit", 1, queries.MAX_AUDIT_PAGE)
        for name in ("reservationId", "resourceId", "actor"):
            if name in query and not 0 < len(query[name]) <= 128:
                raise ValidationError(f"{name} must be 1..128 characters",
                                      code="INVALID_PARAMETER", details={"field": name})
        filters = {k: v for k, v in query.items() if k not in ("limit", cursor.FIELD)}
        after_id = None
        if cursor.FIELD in query:
            (after_id,) = cursor.decode(query[cursor.FIELD], "audit", filters, (int,))
        await self.throttle(principal, client_ip)
        if since is not None and until is not None and until <= since:
            return [], None  # since <= at < until: an empty range
        async with pool.acquire() as conn:
            rows = await queries.query_audit(
                conn, reservation_id=query.get("reservationId"),
                resource_id=query.get("resourceId"), actor=query.get("actor"),
                since=_datetime(since), until=_datetime(until), after_id=after_id,
                limit=limit + 1)
        if len(rows) <= limit:
            return rows, None
        rows = rows[:limit]
        return rows, cursor.encode("audit", [rows[-1].id], filters)


# ---- the rules of the request ----------------------------------------------------------------
def check_reason(reason: Any) -> str:
    if reason is None:
        return ""
    if not isinstance(reason, str) or len(reason) > MAX_TEXT:
        raise ValidationError(f"reason must be at most {MAX_TEXT} characters",
                              details={"field": "reason"})
    return reason


def idempotency_key(header: str | None, body_key: str | None) -> str | None:
    """The key from the ``Idempotency-Key`` header or the body's ``idempotencyKey``; when
    both are given they must agree."""
    if header is not None and body_key is not None and header != body_key:
        raise ValidationError("the Idempotency-Key header and body idempotencyKey differ",
                              code="IDEMPOTENCY_KEY_CONFLICT",
                              details={"field": "idempotencyKey"})
    key = header if header is not None else body_key
    if key is not None:
        try:
            check_key(key)
        except ValidationError as exc:
            raise ValidationError(exc.message, code="INVALID_IDEMPOTENCY_KEY",
                                  details={"field": "Idempotency-Key"}) from None
    return key


def check_vendor_resource(vendor: Vendor, resource: Resource,
                          field: str = "resourceId") -> None:
    """A resource named for a vendor must be the vendor's (400 RESOURCE_VENDOR_MISMATCH)."""
    if resource.vendor_id and resource.vendor_id != vendor.id:
        raise ValidationError("the resource does not belong to the vendor",
                              code="RESOURCE_VENDOR_MISMATCH",
                              details={"field": field, "resourceId": resource.id,
                                       "vendorId": vendor.id})


def check_requester(requester_id: Any) -> str:
    """1..256 characters of which at least one is visible (not a space, a control or format
    character, or a letter that draws nothing)."""
    if (not isinstance(requester_id, str) or not 0 < len(requester_id) <= MAX_TEXT
            or not _VISIBLE_RE.search(requester_id)):
        raise ValidationError(f"requesterId must be 1..{MAX_TEXT} characters, some visible",
                              code="INVALID_FIELD", details={"field": "requesterId"})
    return requester_id


def check_metadata(metadata: Any) -> None:
    """The client's metadata: a JSON object of at most 4,096 bytes (compact UTF-8 JSON), as
    documented; the server's ``requestId`` is added after this check."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise ValidationError("metadata must be a JSON object", code="INVALID_FIELD_TYPE",
                              details={"field": "metadata"})
    try:
        size = len(orjson.dumps(metadata))
    except TypeError:  # nesting beyond what orjson writes; the API refuses it earlier
        raise ValidationError("metadata nests too deeply", code="NESTING_TOO_DEEP",
                              details={"field": "metadata"}) from None
    if size > MAX_METADATA_BYTES:
        raise ValidationError("metadata is too large", code="METADATA_TOO_LARGE",
                              details={"field": "metadata", "maxBytes": MAX_METADATA_BYTES})


def _with_request_id(metadata: dict[str, Any] | None, request_id: str) -> dict[str, Any]:
    """Stored metadata carries the request id (the client's own fields win)."""
    return {"requestId": request_id, **(metadata or {})}


def _not_found(reservation_id: str) -> NotFound:
    return NotFound("reservation not found", details={"reservationId": reservation_id})


async def _first_error(results: list) -> None:
    for result in results:
        if isinstance(result, BaseException):
            raise result


def query_dict(pairs: list[tuple[str, str]], allowed: set[str]) -> dict[str, str]:
    """A query string's (name, value) pairs as a flat dict; unknown or repeated parameters
    are refused, and NUL (Postgres cannot store it: the OpenAPI document says NO_NUL)."""
    out: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise ValidationError(f"unknown query parameter {name!r}", code="UNKNOWN_PARAMETER",
                                  details={"field": name, "allowed": sorted(allowed)})
        if name in out:
            raise ValidationError(f"{name} is given more than once",
                                  code="REPEATED_PARAMETER", details={"field": name})
        if "\x00" in value:
            raise ValidationError(f"{name} contains a NUL character", code="INVALID_PARAMETER",
                                  details={"field": name})
        out[name] = value
    return out


def parse_bool(value: str, field: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise ValidationError(f"{field} must be true or false", code="INVALID_PARAMETER",
                          details={"field": field})


def parse_int(value: str, field: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]{1,12}", value):
        raise ValidationError(f"{field} must be an integer", code="INVALID_PARAMETER",
                              details={"field": field})
    number = int(value)
    if not low <= number <= high:
        raise ValidationError(f"{field} must be between {low} and {high}",
                              code="INVALID_PARAMETER",
                              details={"field": field, "minimum": low, "maximum": high})
    return number


def _datetime(ms: int | None):
    from datetime import UTC, datetime

    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def _ms(moment) -> int:
    return int(moment.timestamp() * 1000)


def from_record(stored) -> Reservation:
    """A Postgres record (engine.store.queries.StoredReservation) as the engine's Reservation."""
    history = [{
        "id": t.event_id,
        "reservationId": stored.id,
        "fromState": t.from_state,
        "toState": t.to_state,
        "triggeredBy": t.triggered_by,
        "reason": t.reason,
        "metadata": t.metadata or None,
        "timestamp_ms": _ms(t.at),
        "idempotencyKey": t.idempotency_key,
        "version": t.version,
    } for t in stored.history]
    start, end = _ms(stored.slot_start), _ms(stored.slot_end)
    return Reservation(
        reservation_id=stored.id, state=State(stored.state), version=stored.version,
        partner_id=stored.partner_id, vendor_id=stored.vendor_id,
        resource_id=stored.resource_id, requester_id=stored.requester_id,
        slot_start_ms=start, slot_end_ms=end,
        block_start_ms=start if stored.block_start is None else _ms(stored.block_start),
        block_end_ms=end if stored.block_end is None else _ms(stored.block_end),
        # A multi-resource reservation's items, as the Redis record has them (units are
        # Redis's business: not recorded, None here).
        items=[(i.resource_id, i.slot_start_ms, i.slot_end_ms, None, None, i.block_start_ms,
                i.block_end_ms) for i in stored.items] if stored.multi_resource else None,
        created_at_ms=_ms(stored.created_at),
        deadline_ms=_ms(stored.expires_at or stored.updated_at),
        confirmation_required=False, payment_required=False,
        booking_id=stored.booking_id, failure_reason=stored.failure_reason,
        metadata=stored.metadata or {}, history=history)


class AdminService:
    """Management (partners, vendors, resources, API keys): the permission table decides who,
    engine/directory.py validates and writes. ``issue_key(conn, role, partner_id=,
    vendor_id=)`` mints a key (api/auth.py owns the key format)."""

    MAX_MINUTES = 1440

    def __init__(self, pool, catalog: CatalogCache, issue_key) -> None:
        self.pool = pool
        self.catalog = catalog
        self._issue_key = issue_key

    def _minutes(self, **values: int | None) -> None:
        for name, value in values.items():
            if value is not None and not 0 <= value <= self.MAX_MINUTES:
                raise ValidationError(f"{name} must be between 0 and {self.MAX_MINUTES}",
                                      code="INVALID_FIELD", details={"field": name})

    async def create_partner(self, principal: Principal, partner_id: str, name: str | None):
        from engine import directory

        require(principal, "admin.partners.create")
        async with self.pool.acquire() as conn:
            return await directory.create_partner(conn, partner_id, name or partner_id)

    async def create_vendor(self, principal: Principal, vendor_id: str, *, unit_minutes=None,
                            buffer_before_minutes=None, buffer_after_minutes=None,
                            confirmation_required=None, payment_required=None, timezone=None,
                            terms: dict | None = None):
        """``terms``: the payment terms given (PaymentTerms field names; issue 12), checked
        complete and in range (engine/payments/terms.py) before the write."""
        from engine import directory
        from engine.payments.terms import PaymentTerms, check_terms

        require(principal, "admin.vendors.create")
        self._minutes(unitMinutes=unit_minutes, bufferBeforeMinutes=buffer_before_minutes,
                      bufferAfterMinutes=buffer_after_minutes)
        checked = check_terms(PaymentTerms(payment_required=bool(payment_required),
                                           **(terms or {})))
        async with self.pool.acquire() as conn:
            vendor = await directory.create_vendor(
                conn, vendor_id, unit_minutes=15 if unit_minutes is None else unit_minutes,
                buffer_before_minutes=buffer_before_minutes or 0,
                buffer_after_minutes=buffer_after_minutes or 0,
                confirmation_required=(True if confirmation_required is None
                                       else confirmation_required),
                payment_required=bool(payment_required), timezone=timezone or "UTC",
                terms=checked)
        self.catalog.forget_miss("vendor", vendor.id)
        self.catalog.forget_miss("resource", vendor.default_resource_id)
        return vendor

    async def update_vendor(self, principal: Principal, vendor_id: str, changes: dict):
        """PATCH a vendor's payment terms (issue 12); the merged terms are checked whole.
        This process's catalog learns the new payment policy at once; other processes keep
        the one they loaded until they restart (a vendor's policy is read at creation)."""
        from engine import directory
        from engine.payments.terms import check_fields

        require(principal, "admin.vendors.create")
        # Each value's own rules before any lookup; the merged whole is checked under the
        # row lock (engine/directory.py update_vendor_terms).
        changes = {**changes, **check_fields(changes)}
        async with self.pool.acquire() as conn:
            vendor = await directory.update_vendor_terms(conn, vendor_id, changes)
        self.catalog.catalog.add_vendor(vendor.to_engine())
        return vendor

    async def create_resource(self, principal: Principal, resource_id: str, vendor_id: str, *,
                              unit_minutes=None, buffer_before_minutes=None,
                              buffer_after_minutes=None):
        from engine import directory

        require(principal, "admin.resources.create")
        self._minutes(unitMinutes=unit_minutes, bufferBeforeMinutes=buffer_before_minutes,
                      bufferAfterMinutes=buffer_after_minutes)
        async with self.pool.acquire() as conn:
            stored = await directory.create_resource(
                conn, resource_id, vendor_id, unit_minutes=unit_minutes,
                buffer_before_minutes=buffer_before_minutes,
                buffer_after_minutes=buffer_after_minutes)
        self.catalog.forget_miss("resource", stored.id)
        return stored

    async def create_key(self, principal: Principal, role: str, partner_id: str | None,
                         vendor_id: str | None):
        require(principal, "admin.keys.create")
        async with self.pool.acquire() as conn:
            return await self._issue_key(conn, role, partner_id=partner_id,
                                         vendor_id=vendor_id)

    async def revoke_key(self, principal: Principal, key_id: str):
        from engine import directory

        require(principal, "admin.keys.revoke")
        async with self.pool.acquire() as conn:
            return await directory.revoke_api_key(conn, key_id)
