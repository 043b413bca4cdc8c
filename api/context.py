"""What a route handler needs from the running app: its services and the caller."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from starlette.requests import Request

from api.auth import KeyResolver
from engine import metrics
from engine.access import RedisAccess
from engine.catalog_cache import CatalogCache
from engine.idempotency import IdempotencyStore
from engine.keys import KeySpace
from engine.list_service import ListService
from engine.permissions import Principal
from engine.service import AdminService, ReservationService
from engine.settings import Settings, trusted_networks
from engine.webhook_service import WebhookService


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
    webhooks: WebhookService | None = None  # events out (issue 14)
    transfers: Any = None  # engine.transfer_service.TransferService (issue 16)
    waitlist: Any = None  # engine.waitlist_service.WaitlistService (issue 16)
    extra: dict = field(default_factory=dict)
    availability: Any = None  # engine.availability_service.AvailabilityService (issue 13)
    lists: ListService | None = None  # lists with cursors (issue 17)


def services(request: Request) -> Services:
    return request.app.state.services


async def principal(request: Request) -> Principal:
    """The caller behind ``Authorization: Bearer``; 401 when missing or invalid, 429 (with
    Retry-After) once the client IP failed too often (``auth_failure_*`` settings)."""
    svc = services(request)
    authorization = request.headers.get("authorization")
    ip = client_ip(request)
    guard = svc.api_keys.failures
    if ip is not None and svc.api_keys.known(authorization) is None:
        guard.refuse_if_blocked(ip)  # no key lookup for an IP that keeps failing
    try:
        return await svc.api_keys.principal(authorization)
    except Exception as exc:
        if getattr(exc, "status", None) == 401:
            metrics.AUTH_FAILURES.labels(
                reason="missing" if not authorization else "unknown_key").inc()
            if ip is not None:
                await guard.failed(svc.reservations.limits, ip)
        raise


@functools.lru_cache(maxsize=4096)
def _peer(host: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                              str | None]:
    """A peer's address parsed once per address (the same few peers send every request)."""
    try:
        peer = ipaddress.ip_address(host)
    except ValueError:
        return None, None
    return peer, peer.compressed


def client_ip(request: Request) -> str | None:
    """The client's IP address, or None when the transport has none (a unix socket).

    The peer's address, unless the peer is one of ``SLOTGUARD_TRUSTED_PROXIES``: then
    ``X-Forwarded-For`` is read from the right, past every trusted proxy, and the first
    address that is not one is the client. An entry that is not an address ends the walk at
    the last trusted hop (garbage never hides the client behind "no address", which would
    switch the per-IP limit off). Empty by default: the header is ignored.
    """
    host = request.client.host if request.client else None
    peer, compressed = _peer(host) if host else (None, None)
    if peer is None:
        return None
    trusted = _trusted(services(request).settings.trusted_proxies)
    if not trusted or not _is_trusted(peer, trusted):
        return compressed
    hops = [part.strip() for value in request.headers.getlist("x-forwarded-for")
            for part in value.split(",")]
    client = peer
    for hop in reversed(hops):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            break
        client = address
        if not _is_trusted(address, trusted):
            break
    return client.compressed


@functools.lru_cache(maxsize=8)
def _trusted(spec: str) -> tuple:
    return trusted_networks(spec)


def _is_trusted(address, networks) -> bool:
    if getattr(address, "ipv4_mapped", None) is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


async def throttle(request: Request, caller: Principal) -> None:
    """Count the request against its client IP and its key; 429 when over either limit.
    Called after validation, so a refused request has written nothing."""
    # A refusal is counted once, by the error handler (api/errors.py count_refusal).
    await services(request).reservations.throttle(caller, client_ip(request))
