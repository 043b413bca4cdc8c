"""The one pure-ASGI layer around every request (:class:`EdgeMiddleware`): the ASGI half
of the edge (api/guard.py states its bounds), request id, body limit, timing, last resort.

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

import asyncio
import contextvars
import logging
import re
import time
import uuid

from starlette.requests import ClientDisconnect
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response, internal_error_response
from api.guard import answer_edge
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


class EdgeMiddleware:
    """The one pure-ASGI layer around every request: the ASGI half of the edge
    (api/guard.py: header count and bytes, 431; the body's read deadline, 408) and the
    request context (request id, body limit, timing, last resort).

    One layer instead of two (profile of one worker under create load, issue 10 Build 5):
    the request's headers are read in one pass (count, bytes, ``Content-Length``,
    ``Transfer-Encoding``, ``X-Request-Id``) instead of four, and one ``receive`` and one
    ``send`` wrapper stand between the server and the app instead of two of each.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_header_count: int,
                 max_header_bytes: int, body_read_timeout_ms: int,
                 calendar_body_bytes: int = 0) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # ICS imports (issue 13) carry whole calendars: their own, larger limit.
        self.calendar_body_bytes = calendar_body_bytes
        self.max_header_count = max_header_count
        self.max_header_bytes = max_header_bytes
        self.body_timeout_s = body_read_timeout_ms / 1000

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = scope.get("headers") or ()
        head_bytes = 0
        has_body = False
        content_length = given_id = None
        for name, value in headers:
            head_bytes += len(name) + len(value) + 4
            if name == b"content-length":
                if content_length is None:
                    content_length = value
                has_body = has_body or value != b"0"
            elif name == b"transfer-encoding":
                has_body = True
            elif name == b"x-request-id" and given_id is None:
                given_id = value
        # The edge first: a request over the header bounds is answered before any context.
        if (self.max_header_count and len(headers) > self.max_header_count) or (
                self.max_header_bytes and head_bytes > self.max_header_bytes):
            await answer_edge(send, 431, f"at most {self.max_header_count} headers and "
                                     f"{self.max_header_bytes} bytes of them")
            return

        request_id = _request_id(given_id)
        token = REQUEST_ID.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        request_id_header = (b"x-request-id", request_id.encode())
        status = 500
        response_started = False
        answered = False  # the edge answered 408 for the app: drop what the app still sends
        limit = self.max_body_bytes
        if self.calendar_body_bytes and _CALENDAR_PATH.match(scope.get("path", "")):
            limit = self.calendar_body_bytes
        received = 0
        deadline = (asyncio.get_running_loop().time() + self.body_timeout_s
                    if self.body_timeout_s and has_body else None)
        body_done = deadline is None

        async def edge_receive() -> Message:
            nonlocal body_done, answered, received
            if body_done or answered:
                message = await receive()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    if not response_started:
                        answered = True
                        await answer_edge(send, 408, "the request body was not sent in time")
                    message = {"type": "http.disconnect"}
                else:
                    if message["type"] != "http.request" or not message.get("more_body",
                                                                              False):
                        body_done = True
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        async def edge_send(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                if answered:
                    return
                response_started = True
                message["headers"] = [*message.get("headers", ()), request_id_header]
            elif answered:
                return
            await send(message)

        try:
            if content_length is not None and _too_large(content_length, limit):
                await self._refuse_too_large(edge_send, limit)
                return
            await self.app(scope, edge_receive, edge_send)
        except BodyTooLarge:
            if not response_started:
                await self._refuse_too_large(edge_send, limit)
        except ClientDisconnect:  # the client left (or the edge timed its body out)
            status = 499
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not response_started:
                await internal_error_response()(scope, receive, edge_send)
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

    async def _refuse_too_large(self, send: Send, limit: int) -> None:
        response = error_response(413, "BODY_TOO_LARGE",
                                  f"the body exceeds {limit} bytes",
                                  details={"maxBytes": limit})
        await response({"type": "http"}, _no_receive, send)


_CALENDAR_PATH = re.compile(r"^/v1/vendors/[^/]+/calendars/[^/]+$")


def _too_large(content_length: bytes, limit: int) -> bool:
    try:
        return int(content_length) > limit
    except ValueError:
        return False


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _request_id(given: bytes | None) -> str:
    """The client's ``X-Request-Id`` (its first) when it is a sane token, else a new one."""
    if given is not None:
        text = given.decode("latin-1")
        if _REQUEST_ID_RE.match(text):
            return text
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
