"""What a route handler needs from the running app: its services and the caller."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis
from starlette.requests import Request

from api.auth import KeyResolver
from engine import metrics
from engine.access import RedisAccess
from engine.catalog_cache import CatalogCache
from engine.errors import RateLimited
from engine.idempotency import IdempotencyStore
from engine.keys import KeySpace
from engine.permissions import Principal
from engine.service import AdminService, ReservationService
from engine.settings import Settings


@dataclass
class Services:
    """Everything the lifespan opens; one per process, on ``app.state.services``."""

    settings: Settings
    redis: aioredis.Redis
    pool: asyncpg.Pool
    access: RedisAccess
    catalog: CatalogCache
    keyspace: KeySpace
    api_keys: KeyResolver
    reservations: ReservationService
    idempotency: IdempotencyStore
    admin: AdminService | None = None
    extra: dict = field(default_factory=dict)


def services(request: Request) -> Services:
    return request.app.state.services


async def principal(request: Request) -> Principal:
    """The caller behind ``Authorization: Bearer``; 401 when missing or invalid."""
    try:
        return await services(request).api_keys.principal(request.headers.get("authorization"))
    except Exception as exc:
        if getattr(exc, "status", None) == 401:
            metrics.AUTH_FAILURES.labels(
                reason="missing" if not request.headers.get("authorization") else "unknown_key",
            ).inc()
        raise


def client_ip(request: Request) -> str | None:
    """The peer's IP address, or None when the transport has none (a unix socket, a test
    client). Proxies' forwarding headers are not trusted here."""
    host = request.client.host if request.client else None
    try:
        return ipaddress.ip_address(host).compressed if host else None
    except ValueError:
        return None


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


async def throttle(request: Request, caller: Principal) -> None:
    """Count the request against its client IP and its key; 429 when over either limit.
    Called after validation, so a refused request has written nothing."""
    try:
        await services(request).reservations.throttle(caller, client_ip(request))
    except RateLimited as exc:
        scope = "ip" if "clientIp" in exc.details else "partner"
        metrics.RATE_LIMIT_REJECTIONS.labels(scope=scope).inc()
        raise
