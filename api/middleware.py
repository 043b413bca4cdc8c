"""Pure ASGI middleware around every request: request id, body limit, timing, last resort.

- **Request id**: ``X-Request-Id`` from the client (when it is a sane token) or a new one;
  it is put in ``scope["state"]["request_id"]``, a context variable the log records carry,
  the response's ``X-Request-Id``, and by the routes into transition metadata (``requestId``).
- **Body limit**: a ``Content-Length`` over ``max_body_bytes`` is refused before the body is
  read; a streamed body is counted as it arrives and refused when it passes the limit.
- **Timing**: ``slotguard_http_request_seconds`` by route template, method and status.
- **Last resort**: anything no exception handler answered becomes the 500 envelope (if the
  response has not started), so a client never sees a bare traceback page.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid

from starlette.requests import ClientDisconnect
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response, internal_error_response
from engine import metrics

log = logging.getLogger("slotguard.api")
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\Z")


_HTTP_SERIES: dict[tuple[str, str, int], object] = {}


class BodyTooLarge(Exception):
    pass


def install_request_id_logging() -> None:
    """Every log record of this process carries ``request_id`` (``-`` outside a request),
    whichever logger made it, so a format may use ``%(request_id)s``. Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_slotguard_request_id", False):
        return

    def record_with_request_id(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.request_id = REQUEST_ID.get()
        return record

    record_with_request_id._slotguard_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(record_with_request_id)


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        token = REQUEST_ID.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            too_large = self._declared_too_large(scope)
            if too_large:
                await self._refuse_too_large(send_wrapper)
                return
            await self.app(scope, self._counting(receive), send_wrapper)
        except BodyTooLarge:
            if not response_started:
                await self._refuse_too_large(send_wrapper)
        except ClientDisconnect:  # the client left (or api/guard.py timed its body out)
            status = 499
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not response_started:
                await internal_error_response()(scope, receive, send_wrapper)
        finally:
            REQUEST_ID.reset(token)
            key = (_route_template(scope), scope["method"], status)
            series = _HTTP_SERIES.get(key)
            if series is None:  # labels() locks and validates: keep the children
                series = metrics.HTTP_REQUEST_SECONDS.labels(
                    route=key[0], method=key[1], status=str(status))
                if len(_HTTP_SERIES) < 10_000:  # odd methods must not grow it forever
                    _HTTP_SERIES[key] = series
            series.observe(time.perf_counter() - started)

    def _declared_too_large(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    return int(value) > self.max_body_bytes
                except ValueError:
                    return False
        return False

    def _counting(self, receive: Receive) -> Receive:
        received = 0
        limit = self.max_body_bytes

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        return counting_receive

    async def _refuse_too_large(self, send: Send) -> None:
        response = error_response(413, "BODY_TOO_LARGE",
                                  f"the body exceeds {self.max_body_bytes} bytes",
                                  details={"maxBytes": self.max_body_bytes})
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID_RE.match(text):
                return text
            break
    return uuid.uuid4().hex


def _route_template(scope: Scope) -> str:
    """The matched route's path template (``/v1/reservations/{reservationId}``), never the
    raw path: ids must not become label values."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is None:
        return "unmatched"
    mounted = scope.get("root_path", "")[len(scope.get("app_root_path", "")):]
    if isinstance(route, Mount):  # matched a mount but nothing inside it
        return mounted + "/*"
    return mounted + path
