"""Liveness, readiness and the Prometheus exposition."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from api.errors import error_response
from api import schemas
from api.views import JSONResponse
from engine import metrics
from engine.connection import eviction_allowed, eviction_policy
from engine.metrics_auth import authorized
from engine.rehydration import is_rehydrated

READY_TIMEOUT_S = 2.0


async def live(request: Request) -> Response:
    """200 while the process runs and its event loop turns."""
    return JSONResponse(schemas.Live(status="live"))


async def ready(request: Request) -> Response:
    """200 only when Redis and Postgres answer, every script is loaded, the booked markers
    of this Redis are rehydrated (``rehydrated``) and Redis does not evict
    (``evictionPolicy``); else 503. The process's Redis watch (engine/runtime.py) brings
    every check back after a Redis restart."""
    svc = getattr(request.app.state, "services", None)
    checks = {"redis": False, "postgres": False, "scripts": False, "rehydrated": False,
              "evictionPolicy": False}
    if svc is not None:
        checks.update(await _redis(svc))
        checks["postgres"] = await _postgres(svc)
    if all(checks.values()):
        return JSONResponse(schemas.Ready(status="ready", checks=checks, holds_ready=True))
    return error_response(503, "NOT_READY", "a dependency is not ready",
                          details={"checks": checks}, retryable=True, retry_after_ms=1000)


async def _redis(svc) -> dict[str, bool]:
    checks = {}
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await svc.redis.ping()
            checks["redis"] = True
            checks["scripts"] = await svc.access.scripts_loaded()
            if not checks["scripts"]:
                # A flushed script cache (SCRIPT FLUSH, a failover) heals here too, not only
                # when a request happens to meet NOSCRIPT.
                await svc.access.load_scripts()
                checks["scripts"] = await svc.access.scripts_loaded()
            checks["rehydrated"] = await is_rehydrated(svc.access, svc.keyspace)
            checks["evictionPolicy"] = eviction_allowed(await eviction_policy(svc.redis),
                                                        svc.settings)
    except Exception:
        pass
    return checks


async def _postgres(svc) -> bool:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            async with svc.pool.acquire() as conn:
                return await conn.fetchval("SELECT 1") == 1
    except Exception:
        return False


async def prometheus(request: Request) -> Response:
    svc = getattr(request.app.state, "services", None)
    token = svc.settings.metrics_token if svc is not None else ""
    authorization = request.headers.get("authorization")
    if not authorized(authorization, token):  # SLOTGUARD_METRICS_TOKEN (issue 17)
        metrics.AUTH_FAILURES.labels(
            reason="missing" if not authorization else "unknown_key").inc()
        return error_response(401, "METRICS_TOKEN_REQUIRED",
                              "GET /metrics needs Authorization: Bearer <SLOTGUARD_METRICS_TOKEN>",
                              headers={"WWW-Authenticate": "Bearer"})
    metrics.reap_dead_processes()
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
