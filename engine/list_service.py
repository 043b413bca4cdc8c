"""Lists with cursors (issue 17): who may list what, the filters, and the pages.

The one place that decides these lists' permissions (engine/permissions.py's table),
tenancy and every 4xx, before any query: a partner lists only its own reservations and
bookings, a vendor only its vendor's, ops, admin and system everything; the admin lists
(vendors, partners, keys) are for admin and system keys. Query strings are checked whole:
an unknown or repeated parameter, a ``limit`` outside 1..200, a bad time, state or cursor
is a 400 with the parameter in ``details.field``.

Every page is ``(rows, next_cursor)``; ``next_cursor`` is None on the last page. The lists
read Postgres (the commit queue's read model): a reservation appears there once the worker
has written its first event, and shows the state of the last event written.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from engine import cursor
from engine.errors import NotFound, ValidationError
from engine.keys import NAME_RE
from engine.lifecycle import PARTNER, ROLES, VENDOR, State
from engine.permissions import Principal, require
from engine.store import lists as store
from engine.times import EPOCH, parse_time

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
STATES = frozenset(s.value for s in State)

RESERVATION_QUERY = {"state", "vendorId", "from", "to", "limit", "startingAfter"}
BOOKING_QUERY = {"vendorId", "from", "to", "limit", "startingAfter"}
DIRECTORY_QUERY = {"limit", "startingAfter"}
KEY_QUERY = {"role", "partnerId", "vendorId", "limit", "startingAfter"}

Page = tuple[list[Any], str | None]


class ListService:
    """``pool`` an asyncpg pool on the deployment's schema; ``throttle(principal, ip)`` the
    reservation service's rate limits (partner and vendor reads count like any read)."""

    def __init__(self, pool, throttle: Callable[[Principal, str | None], Awaitable[None]]
                 ) -> None:
        self.pool = pool
        self._throttle = throttle

    # ---- reservations and bookings ----------------------------------------------------
    async def reservations(self, principal: Principal, pairs: list[tuple[str, str]],
                           client_ip: str | None = None) -> Page:
        require(principal, "reservation.list")
        query = _query(pairs, RESERVATION_QUERY)
        states = _states(query.get("state"))
        partner_id, vendor_id = _tenancy(principal, _name(query, "vendorId"))
        start_from, start_to = _range(query)
        limit = _limit(query)
        filters = {"partner": partner_id, "vendor": vendor_id, "state": states,
                   "from": query.get("from"), "to": query.get("to")}
        after = _after_created(query, "reservations", filters)
        await self._throttle(principal, client_ip)
        async with self.pool.acquire() as conn:
            rows = await store.reservations(
                conn, partner_id=partner_id, vendor_id=vendor_id, states=states,
                start_from=start_from, start_to=start_to, after=after, limit=limit + 1)
        return _page(rows, limit, "reservations", filters,
                     lambda r: [_micros(r.created_at), r.id])

    async def bookings(self, principal: Principal, pairs: list[tuple[str, str]],
                       client_ip: str | None = None) -> Page:
        require(principal, "booking.list")
        query = _query(pairs, BOOKING_QUERY)
        partner_id, vendor_id = _tenancy(principal, _name(query, "vendorId"))
        start_from, start_to = _range(query)
        limit = _limit(query)
        filters = {"partner": partner_id, "vendor": vendor_id, "from": query.get("from"),
                   "to": query.get("to")}
        after = _after_created(query, "bookings", filters)
        await self._throttle(principal, client_ip)
        async with self.pool.acquire() as conn:
            rows = await store.bookings(conn, partner_id=partner_id, vendor_id=vendor_id,
                                        start_from=start_from, start_to=start_to,
                                        after=after, limit=limit + 1)
        return _page(rows, limit, "bookings", filters,
                     lambda r: [_micros(r.created_at), r.id])

    # ---- the directory (admin) ----------------------------------------------------------
    async def vendors(self, principal: Principal, pairs: list[tuple[str, str]]) -> Page:
        return await self._by_id(principal, pairs, "admin.vendors.list", "vendors",
                                 store.vendors)

    async def partners(self, principal: Principal, pairs: list[tuple[str, str]]) -> Page:
        return await self._by_id(principal, pairs, "admin.partners.list", "partners",
                                 store.partners)

    async def keys(self, principal: Principal, pairs: list[tuple[str, str]]) -> Page:
        require(principal, "admin.keys.list")
        query = _query(pairs, KEY_QUERY)
        role = query.get("role")
        if role is not None and role not in ROLES:
            raise _bad("role", f"role must be one of {', '.join(ROLES)}")
        filters = {"role": role, "partner": _name(query, "partnerId"),
                   "vendor": _name(query, "vendorId")}
        limit = _limit(query)
        after = _after_id(query, "keys", filters)
        async with self.pool.acquire() as conn:
            rows = await store.keys(conn, role=role, partner_id=filters["partner"],
                                    vendor_id=filters["vendor"], after=after,
                                    limit=limit + 1)
        return _page(rows, limit, "keys", filters, lambda r: [r.id])

    async def _by_id(self, principal: Principal, pairs: list[tuple[str, str]],
                     operation: str, kind: str, fetch) -> Page:
        require(principal, operation)
        query = _query(pairs, DIRECTORY_QUERY)
        limit = _limit(query)
        after = _after_id(query, kind, {})
        async with self.pool.acquire() as conn:
            rows = await fetch(conn, after=after, limit=limit + 1)
        return _page(rows, limit, kind, {}, lambda r: [r.id])


# ---- the rules of a list's query string ------------------------------------------------------
def _query(pairs: list[tuple[str, str]], allowed: set[str]) -> dict[str, str]:
    from engine.service import query_dict

    return query_dict(pairs, allowed)


def _bad(field: str, message: str, code: str = "INVALID_PARAMETER", **details: Any):
    return ValidationError(message, code=code, details={"field": field, **details})


def _limit(query: dict[str, str]) -> int:
    from engine.service import parse_int

    return parse_int(query.get("limit", str(DEFAULT_LIMIT)), "limit", 1, MAX_LIMIT)


def _name(query: dict[str, str], field: str) -> str | None:
    value = query.get(field)
    if value is not None and not NAME_RE.match(value):
        raise _bad(field, f"{field} must be 1..64 letters, digits, '.', '_' or '-'")
    return value


def _states(value: str | None) -> list[str] | None:
    if value is None:
        return None
    states = value.split(",")
    unknown = [s for s in states if s not in STATES]
    if unknown or not states:
        raise _bad("state", "state must be one or more (comma-separated) reservation states",
                   allowed=sorted(STATES))
    return sorted(set(states))


def _range(query: dict[str, str]) -> tuple[datetime | None, datetime | None]:
    start = parse_time(query["from"], "from") if "from" in query else None
    end = parse_time(query["to"], "to") if "to" in query else None
    if start is not None and end is not None and end <= start:
        raise ValidationError("to must be after from", code="INVALID_TIME_RANGE",
                              details={"field": "to"})
    return _datetime(start), _datetime(end)


def _tenancy(principal: Principal, vendor_filter: str | None) -> tuple[str | None, str | None]:
    """(partner, vendor) every row must match: the caller's own tenant, and the filter."""
    if principal.role == PARTNER:
        return principal.partner_id or "\x00", vendor_filter
    if principal.role == VENDOR:
        own = principal.vendor_id or "\x00"
        if vendor_filter is not None and vendor_filter != own:
            raise NotFound(f"unknown vendor {vendor_filter!r}", code="UNKNOWN_VENDOR",
                           details={"vendorId": vendor_filter})
        return None, own
    return None, vendor_filter


def _after_created(query: dict[str, str], kind: str,
                   filters: dict[str, Any]) -> tuple[datetime, str] | None:
    token = query.get(cursor.FIELD)
    if token is None:
        return None
    micros, row_id = cursor.decode(token, kind, filters, (int, str))
    try:
        return EPOCH + timedelta(microseconds=micros), row_id
    except (OverflowError, ValueError):
        raise cursor.invalid("the cursor is not one this API issued") from None


def _after_id(query: dict[str, str], kind: str, filters: dict[str, Any]) -> str | None:
    token = query.get(cursor.FIELD)
    if token is None:
        return None
    (row_id,) = cursor.decode(token, kind, filters, (str,))
    return row_id


def _page(rows: list, limit: int, kind: str, filters: dict[str, Any], position) -> Page:
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, cursor.encode(kind, position(rows[-1]), filters)


def _micros(moment: datetime) -> int:
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _datetime(ms: int | None) -> datetime | None:
    return None if ms is None else EPOCH + timedelta(milliseconds=ms)
