"""Webhook endpoints and their delivery log (issue 14): who may do what, validation, SQL.

The one place that decides the webhook routes' permissions, tenancy and every 4xx, before
the first write (as engine/service.py does for reservations): who (403, the permission
table), which endpoint (404: unknown or another tenant's, indistinguishable), then the
request's own rules (400: URL, private targets, event types, description). Tenancy: a
partner key manages its partner's endpoints, a vendor key its vendor's, ops/admin/system
keys the ops endpoints (which receive every event, the ops-only ``hold.*`` ones included).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from ulid import ULID

from engine.errors import NotFound, ValidationError
from engine.permissions import PARTNER, VENDOR, Principal, require
from engine.settings import Settings
from engine.webhook_events import EVENT_TYPES, PING, emit, payload

MAX_URL = 2_048
MAX_DESCRIPTION = 500
MAX_PAGE = 100
DEFAULT_PAGE = 50
DELIVERY_STATUSES = ("pending", "delivered", "failed", "dead")


@dataclass(frozen=True, slots=True)
class Endpoint:
    id: str
    owner_kind: str
    owner_id: str
    url: str
    events: list[str]
    description: str
    disabled: bool
    disabled_reason: str | None
    flagged_at: datetime | None
    failing_since: datetime | None
    previous_secret_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Delivery:
    id: str
    webhook_id: str
    endpoint_id: str
    type: str
    reservation_id: str | None
    version: int | None
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_latency_ms: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime
    position: int


_ENDPOINT_COLUMNS = """id, owner_kind, owner_id, url, events, description, disabled,
    disabled_reason, flagged_at, failing_since, previous_secret_expires_at, created_at,
    updated_at"""
_DELIVERY_COLUMNS = """id, webhook_id, endpoint_id, type, reservation_id, version, status,
    attempts, next_attempt_at, last_status_code, last_latency_ms, last_error,
    last_attempt_at, delivered_at, created_at, event_position"""


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def owner_of(principal: Principal) -> tuple[str, str]:
    if principal.role == PARTNER:
        return "partner", principal.partner_id or ""
    if principal.role == VENDOR:
        return "vendor", principal.vendor_id or ""
    return "ops", ""


def _endpoint_not_found(endpoint_id: str) -> NotFound:
    return NotFound("webhook endpoint not found", code="WEBHOOK_ENDPOINT_NOT_FOUND",
                    details={"endpointId": endpoint_id})


def _invalid(code: str, message: str, field: str, **details: Any) -> ValidationError:
    return ValidationError(message, code=code, details={"field": field, **details})


def refused_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


async def resolve_host(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address a host name resolves to ([] when it does not resolve in 5 s)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout=5)
    except (OSError, asyncio.TimeoutError, UnicodeError):
        return []
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


async def private_target(url: str) -> bool:
    """The URL's host is (or resolves to) a private, loopback, link-local or otherwise
    non-global address, or does not resolve at all."""
    host = urlsplit(url).hostname or ""
    if host.lower() in ("localhost",) or host.lower().endswith(".localhost"):
        return True
    addresses = await resolve_host(host)
    return not addresses or any(refused_address(a) for a in addresses)


class WebhookService:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings

    # ---- validation -------------------------------------------------------------------
    async def check_url(self, url: Any) -> str:
        if not isinstance(url, str) or not url.strip() or len(url) > MAX_URL:
            raise _invalid("INVALID_URL", f"url must be an http(s) URL of at most {MAX_URL} "
                           "characters", "url")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (ValueError for a port out of range)
        except ValueError:
            raise _invalid("INVALID_URL", "url is not a URL", "url") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _invalid("INVALID_URL", "url must be an absolute http or https URL", "url")
        if parts.username or parts.password or any(c.isspace() or ord(c) < 32 for c in url):
            raise _invalid("INVALID_URL", "url must carry no credentials, spaces or control "
                           "characters", "url")
        if not self.settings.webhook_allow_private and await private_target(url):
            raise _invalid("WEBHOOK_URL_PRIVATE", "url must resolve to a public address "
                           "(private, loopback and link-local targets are refused)", "url")
        return url

    @staticmethod
    def check_events(events: Any) -> list[str]:
        if events == "*":
            return ["*"]
        if not isinstance(events, list) or not events or len(events) > len(EVENT_TYPES):
            raise _invalid("INVALID_EVENTS", "events must be a non-empty list of event types, "
                           'or ["*"]', "events")
        if events == ["*"]:
            return events
        unknown = [e for e in events if e not in EVENT_TYPES]
        if unknown or len(set(events)) != len(events):
            raise _invalid("UNKNOWN_EVENT_TYPE", "events must name known event types, each "
                           'once, or be ["*"]', "events",
                           unknown=[str(e)[:100] for e in unknown][:10],
                           allowed=list(EVENT_TYPES))
        return list(events)

    @staticmethod
    def check_description(description: Any) -> str:
        if description is None:
            return ""
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION or any(
                ord(c) < 32 and c not in "\t" for c in description):
            raise _invalid("INVALID_FIELD", f"description must be text of at most "
                           f"{MAX_DESCRIPTION} characters", "description")
        return description

    # ---- endpoints ----------------------------------------------------------------------
    async def create(self, principal: Principal, url: Any, events: Any,
                     description: Any) -> tuple[Endpoint, str]:
        """A new endpoint and its secret (answered this once)."""
        require(principal, "webhooks.manage")
        events = self.check_events(events)
        description = self.check_description(description)
        url = await self.check_url(url)
        kind, owner = owner_of(principal)
        secret = new_secret()
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                f"""INSERT INTO webhook_endpoints (id, owner_kind, owner_id, url, events,
                                                  description, secret)
                    VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_ENDPOINT_COLUMNS}""",
                f"whe_{ULID()}", kind, owner, url, events, description, secret)
        return Endpoint(*row), secret

    async def _owned(self, conn, principal: Principal, endpoint_id: Any,
                     for_update: bool = False) -> Endpoint:
        if not isinstance(endpoint_id, str) or not endpoint_id.startswith("whe_"):
            raise _endpoint_not_found(str(endpoint_id)[:100])
        kind, owner = owner_of(principal)
        row = await conn.fetchrow(
            f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints "
            f"WHERE id = $1 AND owner_kind = $2 AND owner_id = $3"
            + (" FOR UPDATE" if for_update else ""), endpoint_id, kind, owner)
        if row is None:
            raise _endpoint_not_found(endpoint_id)
        return Endpoint(*row)

    async def get(self, principal: Principal, endpoint_id: str) -> Endpoint:
        require(principal, "webhooks.manage")
        async with self.pool.acquire() as conn:
            return await self._owned(conn, principal, endpoint_id)

    async def list(self, principal: Principal) -> list[Endpoint]:
        require(principal, "webhooks.manage")
        kind, owner = owner_of(principal)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints "
                f"WHERE owner_kind = $1 AND owner_id = $2 ORDER BY id", kind, owner)
        return [Endpoint(*r) for r in rows]

    async def update(self, principal: Principal, endpoint_id: str, *, url: Any = None,
                     events: Any = None, disabled: Any = None,
                     description: Any = None) -> Endpoint:
        """Change url, events, disabled (re-enabling clears the failure record) and/or
        description; fields left out (None) stay."""
        require(principal, "webhooks.manage")
        async with self.pool.acquire() as conn:
            await self._owned(conn, principal, endpoint_id)  # 404 before 400
        if events is not None:
            events = self.check_events(events)
        if description is not None:
            description = self.check_description(description)
        if disabled is not None and not isinstance(disabled, bool):
            raise _invalid("INVALID_FIELD", "disabled must be true or false", "disabled")
        if url is not None:
            url = await self.check_url(url)
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await self._owned(conn, principal, endpoint_id, for_update=True)
                row = await conn.fetchrow(
                    f"""UPDATE webhook_endpoints SET
                          url = coalesce($2, url), events = coalesce($3, events),
                          description = coalesce($4, description),
                          disabled = coalesce($5, disabled),
                          disabled_reason = CASE WHEN $5 IS NULL THEN disabled_reason
                                                 WHEN $5 THEN 'disabled by its owner'
                                                 ELSE NULL END,
                          failing_since = CASE WHEN $5 = false THEN NULL ELSE failing_since END,
                          flagged_at = CASE WHEN $5 = false THEN NULL ELSE flagged_at END,
                          updated_at = now()
                        WHERE id = $1 RETURNING {_ENDPOINT_COLUMNS}""",
                    endpoint_id, url, events, description, disabled)
        return Endpoint(*row)

    async def delete(self, principal: Principal, endpoint_id: str) -> None:
        require(principal, "webhooks.manage")
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await self._owned(conn, principal, endpoint_id, for_update=True)
                await conn.execute("DELETE FROM webhook_endpoints WHERE id = $1", endpoint_id)

    async def rotate_secret(self, principal: Principal, endpoint_id: str) -> tuple[Endpoint,
                                                                                   str]:
        """A new secret; the current one keeps signing beside it for
        ``webhook_secret_overlap_s`` (a receiver verifies with either meanwhile)."""
        require(principal, "webhooks.manage")
        secret = new_secret()
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await self._owned(conn, principal, endpoint_id, for_update=True)
                row = await conn.fetchrow(
                    f"""UPDATE webhook_endpoints SET previous_secret = secret, secret = $2,
                          previous_secret_expires_at = now() + $3 * interval '1 second',
                          updated_at = now()
                        WHERE id = $1 RETURNING {_ENDPOINT_COLUMNS}""",
                    endpoint_id, secret, self.settings.webhook_secret_overlap_s)
        return Endpoint(*row), secret

    # ---- deliveries ---------------------------------------------------------------------
    async def deliveries(self, principal: Principal, endpoint_id: str,
                         query: dict[str, str]) -> tuple[list[Delivery], str | None]:
        """A page of the endpoint's deliveries, newest event first; the cursor is opaque."""
        require(principal, "webhooks.manage")
        async with self.pool.acquire() as conn:
            await self._owned(conn, principal, endpoint_id)  # 404 before 400
        unknown = set(query) - {"cursor", "limit", "status"}
        if unknown:
            name = sorted(unknown)[0]
            raise _invalid("UNKNOWN_PARAMETER", f"unknown query parameter {name[:100]!r}",
                           name[:100])
        limit = DEFAULT_PAGE
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                limit = 0
            if not 1 <= limit <= MAX_PAGE:
                raise _invalid("INVALID_FIELD", f"limit must be 1..{MAX_PAGE}", "limit")
        before = None
        if "cursor" in query:
            before = _decode_cursor(query["cursor"])
        status = query.get("status")
        if status is not None and status not in DELIVERY_STATUSES:
            raise _invalid("INVALID_FIELD", "status must be one of " +
                           ", ".join(DELIVERY_STATUSES), "status")
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"""SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries
                    WHERE endpoint_id = $1 AND ($2::bigint IS NULL OR event_position < $2)
                      AND ($3::text IS NULL OR status = $3)
                    ORDER BY event_position DESC LIMIT $4""",
                endpoint_id, before, status, limit + 1)
        page = [Delivery(*r) for r in rows[:limit]]
        cursor = _encode_cursor(page[-1].position) if len(rows) > limit else None
        return page, cursor

    async def retry(self, principal: Principal, endpoint_id: str,
                    delivery_id: str) -> Delivery:
        """Send a delivery again now (same webhook-id); a pending one is just made due."""
        require(principal, "webhooks.manage")
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await self._owned(conn, principal, endpoint_id)
                row = await conn.fetchrow(
                    f"""UPDATE webhook_deliveries SET status = 'pending',
                          next_attempt_at = clock_timestamp(), leased_until = NULL
                        WHERE id = $1 AND endpoint_id = $2 RETURNING {_DELIVERY_COLUMNS}""",
                    delivery_id, endpoint_id)
        if row is None:
            raise NotFound("delivery not found", code="WEBHOOK_DELIVERY_NOT_FOUND",
                           details={"deliveryId": str(delivery_id)[:100]})
        return Delivery(*row)

    async def ping(self, principal: Principal, endpoint_id: str) -> Delivery:
        """Queue a signed ``ping`` to this endpoint alone (the worker sends it)."""
        require(principal, "webhooks.manage")
        now = datetime.now(timezone.utc)
        at_ms = int(now.timestamp() * 1000)
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                endpoint = await self._owned(conn, principal, endpoint_id)
                key = f"ping:{ULID()}"
                body = payload(PING, at_ms, {"endpointId": endpoint.id,
                                             "occurredAt": now.isoformat()}).decode()
                await emit(conn, [(key, PING, "endpoint", "", "", "", 0, body, at_ms)])
                row = await conn.fetchrow(
                    f"""INSERT INTO webhook_deliveries (id, endpoint_id, event_position,
                                                        webhook_id, type)
                        SELECT 'dlv_' || replace(gen_random_uuid()::text, '-', ''), $1,
                               position, 'msg_' || position, type
                        FROM webhook_events WHERE event_key = $2
                        RETURNING {_DELIVERY_COLUMNS}""", endpoint.id, key)
        return Delivery(*row)


def _encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"d:{position}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, number = text.partition(":")
        position = int(number)
        if kind != "d" or position < 1:
            raise ValueError
        return position
    except (ValueError, UnicodeError):
        raise _invalid("INVALID_CURSOR", "cursor is not one this endpoint gave", "cursor") \
            from None
