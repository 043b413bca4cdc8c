"""Liveness, readiness and the Prometheus exposition."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from api.errors import error_response
from api.views import JSONResponse
from engine import metrics

READY_TIMEOUT_S = 2.0


async def live(request: Request) -> Response:
    """200 while the process runs and its event loop turns."""
    return JSONResponse({"status": "live"})


async def ready(request: Request) -> Response:
    """200 only when Redis and Postgres answer and every script is loaded; else 503."""
    svc = getattr(request.app.state, "services", None)
    checks = {"redis": False, "postgres": False, "scripts": False}
    if svc is not None:
        checks["redis"], checks["scripts"] = await _redis(svc)
        checks["postgres"] = await _postgres(svc)
    if all(checks.values()):
        holds_ready = await svc.reservations.engine.is_ready()
        return JSONResponse({"status": "ready", "checks": checks, "holdsReady": holds_ready})
    return error_response(503, "NOT_READY", "a dependency is not ready",
                          details={"checks": checks}, retryable=True, retry_after_ms=1000)


async def _redis(svc) -> tuple[bool, bool]:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await svc.redis.ping()
            return True, await svc.access.scripts_loaded()
    except Exception:
        return False, False


async def _postgres(svc) -> bool:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            async with svc.pool.acquire() as conn:
                return await conn.fetchval("SELECT 1") == 1
    except Exception:
        return False


async def prometheus(request: Request) -> Response:
    metrics.reap_dead_processes()
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
