"""The error envelope and the one table from error to HTTP status.

Every error the API answers is ``{"error": {"code", "message", "details", "retryable",
"retryAfter"}}`` with the Bookiji status taxonomy: 400 invalid input, 401/403 auth, 404 not
found (other tenants' reservations included), 409 business rule, 412 stale ``If-Match``,
413 oversized body, 415 wrong content type, 422 idempotency key reuse, 429 rate limits and
caps, 500/503 retryable. ``retryAfter`` is in seconds (null when not applicable); 429 and 503
also carry a ``Retry-After`` header.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import asyncpg
import orjson
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from engine import errors as e
from engine.directory import AlreadyExists
from engine.permissions import Forbidden

log = logging.getLogger("slotguard.api")


class ApiError(e.EngineError):
    """An error raised by the HTTP layer itself (auth, parsing, routing)."""

    status = 400

    def __init__(self, status: int, code: str, message: str, *,
                 details: dict[str, Any] | None = None, retry_after_ms: int | None = None,
                 retryable: bool = False, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, details=details, retry_after_ms=retry_after_ms, code=code)
        self.status = status
        self.retryable = retryable
        self.headers = headers or {}


# Engine error class -> HTTP status. Subclasses inherit their parent's status.
STATUS: dict[type[e.EngineError], int] = {
    e.ValidationError: 400,
    e.UnknownResource: 404,
    e.NotFound: 404,
    e.HoldConflict: 409,
    e.HoldIdReused: 409,
    e.NotOwner: 409,
    e.ExtensionLimit: 409,
    e.MaxHoldDuration: 409,
    e.InvalidTransition: 409,
    e.TerminalState: 409,
    e.ReservationExpired: 409,
    e.CommitInProgress: 409,
    e.HoldLost: 409,
    e.VersionMismatch: 412,
    e.RateLimited: 429,
    e.CapExceeded: 429,
    e.IdempotencyMismatch: 422,
    e.IdempotencyInProgress: 409,
    e.PaymentRequired: 409,
    e.UnsafeRedis: 503,
    e.NotReady: 503,
    e.ModifyCrossShard: 409,
    # Payments (issue 12).
    e.PaymentDeclined: 402,
    e.InvalidPaymentMethod: 400,
    e.PaymentNotRequired: 409,
    e.PaymentTermsIncomplete: 409,
    e.PaymentProviderError: 503,
    e.InvalidWebhook: 400,
    e.PoolFull: 409,  # issue 16 (pool)
    e.GroupNotColocated: 409,
    e.LiveHoldsOnResource: 409,
    e.ModifyMultiResource: 409,
    # Hold transfer and waitlist handoff (issue 16); TransferTokenInvalid is a NotFound.
    e.TransferTokenUsed: 409,
    e.TransferWrongPartner: 403,
    e.TransferToSelf: 409,
    e.WaitlistNotWaiting: 409,
    e.ExtendNotLater: 409,  # issue 17
    Forbidden: 403,
    AlreadyExists: 409,
    # Availability engine (issue 13).
    e.SlotRefused: 409,
    e.RulesStale: 503,
    e.AvailabilityChanged: 409,
    e.UnsupportedCalendarType: 415,
}


def status_of(exc: e.EngineError) -> int:
    if isinstance(exc, ApiError):
        return exc.status
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


def envelope(code: str, message: str, details: dict[str, Any] | None, retryable: bool,
             retry_after_ms: int | None) -> dict[str, Any]:
    return {"error": {
        "code": code,
        "message": message,
        "details": _integral(details) if details else {},
        "retryable": retryable,
        "retryAfter": retry_after_seconds(retry_after_ms),
    }}


def _integral(value: Any) -> Any:
    """Integral floats as integers (issue 17: ``unitMinutes: 30``, never ``30.0``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def retry_after_seconds(retry_after_ms: int | None) -> int | None:
    if retry_after_ms is None:
        return None
    return max(1, math.ceil(retry_after_ms / 1000))


def error_response(status: int, code: str, message: str, *, details=None,
                   retryable: bool = False, retry_after_ms: int | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    if status in (429, 503) and retry_after_ms is None:
        retry_after_ms = 1000
    body = envelope(code, message, details, retryable, retry_after_ms)
    out = dict(headers or {})
    if retry_after_ms is not None:
        out["Retry-After"] = str(retry_after_seconds(retry_after_ms))
    return Response(orjson.dumps(body), status_code=status, headers=out,
                    media_type="application/json")


def engine_error_response(exc: e.EngineError) -> Response:
    status = status_of(exc)
    retryable = bool(exc.retryable) or status in (429, 500, 503)
    headers = exc.headers if isinstance(exc, ApiError) else None
    return error_response(status, exc.code, exc.message, details=exc.details,
                          retryable=retryable, retry_after_ms=exc.retry_after_ms,
                          headers=headers)


# ---- Starlette exception handlers (keyed by class in create_app) -----------------------
async def handle_engine_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, e.EngineError)
    count_refusal(exc)
    return engine_error_response(exc)


def count_refusal(exc: e.EngineError) -> None:
    """403s and rate-limit 429s in their counters (issue 17); 401s are counted where the
    key is resolved (api/context.py), hold caps where they are refused (engine/service.py)."""
    from engine import metrics

    if isinstance(exc, Forbidden):
        metrics.AUTH_FAILURES.labels(reason="forbidden").inc()
    elif isinstance(exc, e.RateLimited):
        scope = "ip" if "clientIp" in exc.details else "partner"
        metrics.RATE_LIMIT_REJECTIONS.labels(scope=scope).inc()


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "ROUTE_NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def handle_unavailable(request: Request, exc: Exception) -> Response:
    """Redis or Postgres did not answer: retryable, the client should back off."""
    log.warning("dependency unavailable: %r", exc)
    return error_response(503, "SERVICE_UNAVAILABLE", "a backing service is unavailable",
                          retryable=True, retry_after_ms=1000)


def internal_error_response() -> Response:
    """Sent by the request middleware for anything no handler above recognised."""
    return error_response(500, "INTERNAL_ERROR", "internal error", retryable=True)


# Errors that mean "a backing service did not answer", not "the request is wrong".
UNAVAILABLE = (RedisError, OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
               asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)


def exception_handlers() -> dict[Any, Any]:
    handlers: dict[Any, Any] = {
        e.EngineError: handle_engine_error,
        HTTPException: handle_http_exception,
    }
    for cls in UNAVAILABLE:
        handlers[cls] = handle_unavailable
    return handlers
