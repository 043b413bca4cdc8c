"""A typed partner client of the slotguard HTTP API (httpx): ``Client`` (sync) and
``AsyncClient``.

    from slotguard.client import Client, ApiError, RetryExhausted

    with Client("http://127.0.0.1:8000", key="sg_live_...") as sg:
        created = sg.create_reservation(vendor_id="dentist", requester_id="r-1",
                                        slot_start_time="2030-01-01T09:00:00Z",
                                        slot_end_time="2030-01-01T09:30:00Z")
        sg.commit(created.reservation_id)

Every route of the API has one method; answers decode into the same msgspec Structs the
server encodes them from (api/schemas.py), so a field renamed there is renamed here.

**Errors.** An answer outside 2xx raises :class:`ApiError` (a subclass by status:
:class:`NotFound`, :class:`Conflict`, :class:`RateLimited`, ...) carrying the envelope's
``code``, ``message``, ``details``, ``retryable``, ``retryAfter`` and the answer's
``X-Request-Id`` as ``request_id``.

**Retries** (:class:`RetryPolicy`; CRS v3 §6 and the Bookiji retry policy): at most
``attempts`` tries (5); before try ``n + 1`` the client waits
``min(max_delay_s, base_delay_s · 2^n · U(0.8, 1.2))`` (``n`` counted from 0, base 1 s, max
60 s), or the answer's ``Retry-After`` when that is longer. Retried: no answer (connect,
read, write errors and timeouts), any 5xx, 429, and 409 ``IDEMPOTENCY_KEY_IN_PROGRESS`` (the
first request with that key is still running). Never retried: any other 4xx. When the
tries run out the client raises :class:`RetryExhausted` (attempts, waits, the last error).

**Idempotency.** Every POST carries an ``Idempotency-Key`` generated once per logical call
(or given by the caller) and sent unchanged on every retry of that call. The server honours
it on ``POST /v1/reservations`` (a retried create answers the first answer, replayed); the
lifecycle actions are guarded by versions instead (``if_match``), so a retried action whose
first try landed answers 409, which the caller reads as "look at the reservation".

The decision of what to retry and how long to wait is :class:`RetryPolicy`, a plain object
the benchmark's raw HTTP client and the chaos traffic share (``policy.decide(...)``).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
import msgspec

from api import schemas

__all__ = ["Client", "AsyncClient", "ApiError", "RetryExhausted", "RetryPolicy", "Attempt",
           "RequestBuilder", "http11",
           "BadRequest", "Unauthorized", "Forbidden", "NotFound", "Conflict",
           "PreconditionFailed", "Unprocessable", "RateLimited", "ServerError"]

T = TypeVar("T")
IN_PROGRESS = "IDEMPOTENCY_KEY_IN_PROGRESS"
ACTIONS = ("vendor-confirmation", "vendor-authorization", "requester-authorization",
           "commit", "cancel", "extend")
DEFAULT_TIMEOUT_S = 30.0


# ---- errors -----------------------------------------------------------------------------
class ApiError(Exception):
    """An answer outside 2xx, from the error envelope."""

    def __init__(self, status: int, code: str, message: str, *,
                 details: dict[str, Any] | None = None, retryable: bool = False,
                 retry_after: float | None = None, request_id: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.retryable = retryable
        self.retry_after = retry_after
        self.request_id = request_id

    @classmethod
    def from_response(cls, status: int, body: bytes, headers: Mapping[str, str]
                      ) -> ApiError:
        """The typed error of an answer (any body: a proxy's HTML page included)."""
        error: dict[str, Any] = {}
        try:
            payload = msgspec.json.decode(body) if body else {}
            if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
                error = payload["error"]
        except msgspec.DecodeError:
            pass
        retry_after = parse_retry_after(headers.get("retry-after"))
        if retry_after is None and isinstance(error.get("retryAfter"), (int, float)):
            retry_after = float(error["retryAfter"])
        details = error.get("details")
        kind = _ERROR_CLASSES.get(status) or (ServerError if status >= 500 else ApiError)
        return kind(status, str(error.get("code") or f"HTTP_{status}"),
                    str(error.get("message") or body[:200].decode("utf-8", "replace")),
                    details=details if isinstance(details, dict) else {},
                    retryable=bool(error.get("retryable", status >= 500 or status == 429)),
                    retry_after=retry_after, request_id=headers.get("x-request-id"))


class BadRequest(ApiError): pass  # noqa: E701  400
class Unauthorized(ApiError): pass  # noqa: E701  401
class Forbidden(ApiError): pass  # noqa: E701  403
class NotFound(ApiError): pass  # noqa: E701  404
class Conflict(ApiError): pass  # noqa: E701  409
class PreconditionFailed(ApiError): pass  # noqa: E701  412 (a stale If-Match)
class Unprocessable(ApiError): pass  # noqa: E701  422 (an idempotency key reused)
class RateLimited(ApiError): pass  # noqa: E701  429
class ServerError(ApiError): pass  # noqa: E701  5xx


_ERROR_CLASSES: dict[int, type[ApiError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    412: PreconditionFailed, 422: Unprocessable, 429: RateLimited}


class RetryExhausted(Exception):
    """Every try of one logical call failed with something retryable."""

    def __init__(self, method: str, path: str, attempts: int, last_error: Exception,
                 waits: list[float], idempotency_key: str | None) -> None:
        super().__init__(f"{method} {path}: gave up after {attempts} attempt(s); "
                         f"last error: {last_error}")
        self.method, self.path = method, path
        self.attempts = attempts
        self.last_error = last_error
        self.waits = waits  # seconds waited before each retry
        self.idempotency_key = idempotency_key

    @property
    def last_status(self) -> int | None:
        return self.last_error.status if isinstance(self.last_error, ApiError) else None


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date (None when absent/bad)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


# ---- the retry policy (shared with benchmarks/http_client.py and fault_traffic) ----------
@dataclass
class RetryPolicy:
    """How many tries and how long between them. ``rng`` is injectable for tests."""

    attempts: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    jitter: tuple[float, float] = (0.8, 1.2)
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("attempts >= 1 and non-negative delays")

    @staticmethod
    def retryable_status(status: int, code: str | None = None) -> bool:
        """5xx, 429 and 409 in-progress are worth another try; any other 4xx is final."""
        return status >= 500 or status == 429 or (status == 409 and code == IN_PROGRESS)

    def backoff(self, retry: int) -> float:
        """Seconds before retry number ``retry`` (0 = the first retry), without Retry-After."""
        low, high = self.jitter
        return min(self.max_delay_s, self.base_delay_s * (2 ** retry) * self.rng.uniform(low, high))

    def delay(self, retry: int, retry_after: float | None) -> float:
        """The backoff, or the server's ``Retry-After`` when that asks for longer."""
        wait = self.backoff(retry)
        return max(wait, retry_after) if retry_after is not None else wait


NO_RETRY = RetryPolicy(attempts=1)


# ---- one logical call ------------------------------------------------------------------
@dataclass
class Call:
    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    result: Any = None  # a Struct type to decode into; None: no body; ``bytes``/``dict`` raw
    headers: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    retry: bool = True


@dataclass(slots=True)
class Attempt:
    """One try of a call, as the ``on_attempt`` hook sees it: the answer or the transport
    error, and when it was sent and answered (``time.monotonic()``)."""

    call: Call
    number: int  # 1-based
    t0: float
    t1: float
    response: httpx.Response | None
    error: Exception | None


def _clean(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v is not None}


def _decode(call: Call, response: httpx.Response) -> Any:
    if call.result is None:
        return None
    if call.result is bytes:
        return response.content
    if call.result is dict:
        return msgspec.json.decode(response.content) if response.content else None
    return msgspec.json.decode(response.content, type=call.result)


class _Routes:
    """Every route once; ``self._run(call)`` is a value (sync) or an awaitable (async)."""

    def _run(self, call: Call):  # pragma: no cover - defined by the two clients
        raise NotImplementedError

    # Reservations (role partner; the vendor actions with a vendor key).
    def create_reservation(self, *, vendor_id: str, slot_start_time: str, slot_end_time: str,
                           requester_id: str, resource_id: str | None = None,
                           metadata: dict[str, Any] | None = None,
                           idempotency_key: str | None = None):
        """``POST /v1/reservations`` → :class:`api.schemas.CreateReservationResponse`."""
        body = _clean({"vendorId": vendor_id, "slotStartTime": slot_start_time,
                       "slotEndTime": slot_end_time, "requesterId": requester_id,
                       "resourceId": resource_id, "metadata": metadata})
        return self._run(Call("POST", "/v1/reservations", body,
                              result=schemas.CreateReservationResponse,
                              idempotency_key=idempotency_key))

    def get_reservation(self, reservation_id: str):
        """``GET /v1/reservations/{id}`` → :class:`api.schemas.Reservation`."""
        return self._run(Call("GET", f"/v1/reservations/{_seg(reservation_id)}",
                              result=schemas.Reservation))

    def act(self, reservation_id: str, action: str, *, reason: str | None = None,
            metadata: dict[str, Any] | None = None, outcome: str | None = None,
            ttl_ms: int | None = None, if_match: int | None = None,
            idempotency_key: str | None = None):
        """``POST /v1/reservations/{id}/{action}`` → :class:`api.schemas.Reservation`."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        body = _clean({"reason": reason, "metadata": metadata, "outcome": outcome,
                       "ttlMs": ttl_ms})
        headers = {} if if_match is None else {"If-Match": str(if_match)}
        return self._run(Call("POST", f"/v1/reservations/{_seg(reservation_id)}/{action}",
                              body or None, result=schemas.Reservation, headers=headers,
                              idempotency_key=idempotency_key))

    def vendor_confirmation(self, reservation_id: str, **kw):
        return self.act(reservation_id, "vendor-confirmation", **kw)

    def vendor_authorization(self, reservation_id: str, outcome: str | None = None, **kw):
        return self.act(reservation_id, "vendor-authorization", outcome=outcome, **kw)

    def requester_authorization(self, reservation_id: str, outcome: str | None = None, **kw):
        return self.act(reservation_id, "requester-authorization", outcome=outcome, **kw)

    def commit(self, reservation_id: str, **kw):
        """202 while the commit queue finishes it (state ``COMMIT_IN_PROGRESS``)."""
        return self.act(reservation_id, "commit", **kw)

    def cancel(self, reservation_id: str, **kw):
        return self.act(reservation_id, "cancel", **kw)

    def extend(self, reservation_id: str, ttl_ms: int | None = None, **kw):
        return self.act(reservation_id, "extend", ttl_ms=ttl_ms, **kw)

    def modify(self, reservation_id: str, *, slot_start_time: str, slot_end_time: str,
               resource_id: str | None = None, if_match: int | None = None,
               idempotency_key: str | None = None):
        """``POST /v1/reservations/{id}/modify`` (a move) → Reservation."""
        body = _clean({"slotStartTime": slot_start_time, "slotEndTime": slot_end_time,
                       "resourceId": resource_id})
        headers = {} if if_match is None else {"If-Match": str(if_match)}
        return self._run(Call("POST", f"/v1/reservations/{_seg(reservation_id)}/modify",
                              body, result=schemas.Reservation, headers=headers,
                              idempotency_key=idempotency_key))

    def availability(self, vendor_id: str, *, start_time: str, end_time: str,
                     slot_duration: int | None = None, include_confidence: bool | None = None,
                     resource_id: str | None = None):
        """``GET /v1/vendors/{id}/availability`` → :class:`api.schemas.Availability`."""
        params = _clean({"startTime": start_time, "endTime": end_time,
                         "slotDuration": slot_duration, "resourceId": resource_id,
                         "includeConfidence": None if include_confidence is None
                         else str(include_confidence).lower()})
        return self._run(Call("GET", f"/v1/vendors/{_seg(vendor_id)}/availability",
                              params=params, result=schemas.Availability))

    # Operations (roles ops/admin).
    def release(self, reservation_id: str, *, reason: str):
        return self._run(Call("POST", f"/v1/ops/reservations/{_seg(reservation_id)}/release",
                              {"reason": reason}, result=schemas.Reservation))

    def bulk_release(self, *, reason: str, reservation_ids: list[str] | None = None,
                     resource_id: str | None = None, start_time: str | None = None,
                     end_time: str | None = None):
        body = _clean({"reason": reason, "reservationIds": reservation_ids,
                       "resourceId": resource_id, "startTime": start_time,
                       "endTime": end_time})
        return self._run(Call("POST", "/v1/ops/releases", body,
                              result=schemas.BulkReleaseResult))

    def audit(self, *, reservation_id: str | None = None, resource_id: str | None = None,
              actor: str | None = None, since: str | None = None, until: str | None = None,
              limit: int | None = None, starting_after: str | None = None):
        params = _clean({"reservationId": reservation_id, "resourceId": resource_id,
                         "actor": actor, "since": since, "until": until, "limit": limit,
                         "startingAfter": starting_after})
        return self._run(Call("GET", "/v1/ops/audit", params=params,
                              result=schemas.AuditPage))

    # Lists with cursors: one page each (``data``, ``next_cursor``); ``pages()`` walks them.
    def list_reservations(self, *, state: str | None = None, vendor_id: str | None = None,
                          from_time: str | None = None, to_time: str | None = None,
                          limit: int | None = None, starting_after: str | None = None):
        """``GET /v1/reservations`` (a partner sees its own) → ReservationList."""
        from api import schemas_lists

        params = _clean({"state": state, "vendorId": vendor_id, "from": from_time,
                         "to": to_time, "limit": limit, "startingAfter": starting_after})
        return self._run(Call("GET", "/v1/reservations", params=params,
                              result=schemas_lists.ReservationList))

    def list_bookings(self, *, vendor_id: str | None = None, from_time: str | None = None,
                      to_time: str | None = None, limit: int | None = None,
                      starting_after: str | None = None):
        from api import schemas_lists

        params = _clean({"vendorId": vendor_id, "from": from_time, "to": to_time,
                         "limit": limit, "startingAfter": starting_after})
        return self._run(Call("GET", "/v1/bookings", params=params,
                              result=schemas_lists.BookingList))

    def list_partners(self, *, limit: int | None = None, starting_after: str | None = None):
        from api import schemas_lists

        return self._run(Call("GET", "/v1/admin/partners", result=schemas_lists.PartnerList,
                              params=_clean({"limit": limit, "startingAfter": starting_after})))

    def list_vendors(self, *, limit: int | None = None, starting_after: str | None = None):
        from api import schemas_lists

        return self._run(Call("GET", "/v1/admin/vendors", result=schemas_lists.VendorList,
                              params=_clean({"limit": limit, "startingAfter": starting_after})))

    def list_keys(self, *, role: str | None = None, partner_id: str | None = None,
                  vendor_id: str | None = None, limit: int | None = None,
                  starting_after: str | None = None):
        """``GET /v1/admin/keys``: records, never a secret → ApiKeyList."""
        from api import schemas_lists

        params = _clean({"role": role, "partnerId": partner_id, "vendorId": vendor_id,
                         "limit": limit, "startingAfter": starting_after})
        return self._run(Call("GET", "/v1/admin/keys", params=params,
                              result=schemas_lists.ApiKeyList))

    # Management (role admin).
    def create_partner(self, partner_id: str, name: str | None = None):
        return self._run(Call("POST", "/v1/admin/partners",
                              _clean({"partnerId": partner_id, "name": name}),
                              result=schemas.Partner))

    def create_vendor(self, vendor_id: str, *, unit_minutes: int | None = None,
                      buffer_before_minutes: int | None = None,
                      buffer_after_minutes: int | None = None,
                      confirmation_required: bool | None = None,
                      payment_required: bool | None = None, timezone: str | None = None):
        body = _clean({"vendorId": vendor_id, "unitMinutes": unit_minutes,
                       "bufferBeforeMinutes": buffer_before_minutes,
                       "bufferAfterMinutes": buffer_after_minutes,
                       "confirmationRequired": confirmation_required,
                       "paymentRequired": payment_required, "timezone": timezone})
        return self._run(Call("POST", "/v1/admin/vendors", body, result=schemas.Vendor))

    def create_resource(self, resource_id: str, vendor_id: str, *,
                        unit_minutes: int | None = None,
                        buffer_before_minutes: int | None = None,
                        buffer_after_minutes: int | None = None):
        body = _clean({"resourceId": resource_id, "vendorId": vendor_id,
                       "unitMinutes": unit_minutes,
                       "bufferBeforeMinutes": buffer_before_minutes,
                       "bufferAfterMinutes": buffer_after_minutes})
        return self._run(Call("POST", "/v1/admin/resources", body, result=schemas.Resource))

    def create_key(self, role: str, *, partner_id: str | None = None,
                   vendor_id: str | None = None):
        """The answer's ``key`` is the plaintext key, shown once."""
        body = _clean({"role": role, "partnerId": partner_id, "vendorId": vendor_id})
        return self._run(Call("POST", "/v1/admin/keys", body, result=schemas.ApiKey))

    def revoke_key(self, key_id: str):
        return self._run(Call("POST", f"/v1/admin/keys/{_seg(key_id)}/revoke",
                              result=schemas.ApiKey))

    # Any route (one the methods above do not name yet): the JSON answer as builtins.
    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                json: Any = None, idempotency_key: str | None = None):
        """``method path`` with the client's key, retries and typed errors; the decoded JSON
        answer (dict/list), or None for an empty body."""
        return self._run(Call(method.upper(), path, json, params=params, result=dict,
                              idempotency_key=idempotency_key))

    # Health, metrics, the document (no key needed).
    def live(self):
        return self._run(Call("GET", "/health/live", result=schemas.Live, retry=False))

    def ready(self):
        """:class:`api.schemas.Ready`; a 503 ``NOT_READY`` raises (not retried)."""
        return self._run(Call("GET", "/health/ready", result=schemas.Ready, retry=False))

    def metrics(self):
        """The Prometheus exposition, as bytes."""
        return self._run(Call("GET", "/metrics", result=bytes))

    def openapi(self):
        return self._run(Call("GET", "/openapi.json", result=dict))


def _seg(value: str) -> str:
    """One path segment, percent-encoded (an id never changes the path it goes to)."""
    from urllib.parse import quote

    return quote(str(value), safe="")


class RequestBuilder(_Routes):
    """The routes as :class:`Call` values, without I/O: what a raw transport sends (the
    benchmark's HTTP/1.1 load client builds its requests here, :func:`http11`)."""

    def _run(self, call: Call) -> Call:
        return call


def http11(call: Call, host: str, headers: Mapping[str, str] | None = None) -> bytes:
    """``call`` as the bytes of one HTTP/1.1 request (keep-alive)."""
    target = call.path
    if call.params:
        from urllib.parse import urlencode

        target += "?" + urlencode(call.params)
    body = b"" if call.json is None else msgspec.json.encode(call.json)
    lines = [f"{call.method} {target} HTTP/1.1", f"host: {host}"]
    for name, value in {**(headers or {}), **call.headers}.items():
        lines.append(f"{name}: {value}")
    if call.idempotency_key is not None:
        lines.append(f"idempotency-key: {call.idempotency_key}")
    if body or call.method == "POST":
        lines.append("content-type: application/json")
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Base(_Routes):
    def __init__(self, base_url: str, key: str | None, policy: RetryPolicy | None,
                 headers: Mapping[str, str] | None,
                 new_key: Callable[[], str] | None,
                 on_attempt: Callable[[Attempt], None] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.policy = policy or RetryPolicy()
        self.extra_headers = dict(headers or {})
        self.new_key = new_key or (lambda: uuid.uuid4().hex)
        self.on_attempt = on_attempt

    def with_options(self, **changes: Any):
        """A copy sharing the connection pool, with ``key``, ``policy``, ``sleep`` or
        ``on_attempt`` changed (a vendor's key, a per-flow hook)."""
        unknown = set(changes) - {"key", "policy", "sleep", "on_attempt", "new_key"}
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__, **changes)
        return other

    def with_key(self, key: str):
        """The same connection pool under another API key (a vendor's, an admin's)."""
        return self.with_options(key=key)

    def _observe(self, call: Call, number: int, t0: float, response, error) -> None:
        if self.on_attempt is not None:
            self.on_attempt(Attempt(call, number, t0, time.monotonic(), response, error))

    def _headers(self, call: Call) -> dict[str, str]:
        headers = {**self.extra_headers, **call.headers}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        if call.json is not None:
            headers["Content-Type"] = "application/json"
        if call.method == "POST":
            if call.idempotency_key is None:
                call.idempotency_key = self.new_key()
            headers["Idempotency-Key"] = call.idempotency_key
        return headers

    def _judge(self, call: Call, response: httpx.Response | None,
               error: Exception | None) -> tuple[Exception | None, float | None]:
        """(the error of this try or None, Retry-After seconds); raises a final error."""
        if response is None:
            assert error is not None
            if not call.retry:
                raise error
            return error, None
        if response.status_code < 300:
            return None, None
        failure = ApiError.from_response(response.status_code, response.content,
                                         response.headers)
        if not call.retry or not self.policy.retryable_status(failure.status, failure.code):
            raise failure
        return failure, failure.retry_after

    def _exhausted(self, call: Call, tries: int, last: Exception, waits: list[float]):
        return RetryExhausted(call.method, call.path, tries, last, waits, call.idempotency_key)


TRANSPORT_ERRORS = (httpx.TransportError,)


class Client(_Base):
    """The synchronous client. ``sleep`` is injectable (tests pass a recorder)."""

    def __init__(self, base_url: str, key: str | None = None, *,
                 policy: RetryPolicy | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 headers: Mapping[str, str] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 new_key: Callable[[], str] | None = None,
                 on_attempt: Callable[[Attempt], None] | None = None,
                 http: httpx.Client | None = None) -> None:
        super().__init__(base_url, key, policy, headers, new_key, on_attempt)
        self.sleep = sleep
        self.http = http or httpx.Client(base_url=self.base_url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def pages(self, path: str, params: dict[str, Any] | None = None):
        """Every row of a list route (``{"data": [...], "nextCursor"}``), page after page,
        following ``nextCursor`` as ``startingAfter`` until it is null."""
        cursor = None
        while True:
            page = self.request("GET", path, params=_page_params(params, cursor))
            yield from page["data"]
            cursor = page.get("nextCursor")
            if cursor is None:
                return

    def _run(self, call: Call):
        headers = self._headers(call)
        waits: list[float] = []
        last: Exception | None = None
        retry_after: float | None = None
        for attempt in range(self.policy.attempts if call.retry else 1):
            if attempt:
                waits.append(self.policy.delay(attempt - 1, retry_after))
                self.sleep(waits[-1])
            response, error, t0 = None, None, time.monotonic()
            try:
                response = self.http.request(
                    call.method, call.path, headers=headers, params=call.params,
                    content=None if call.json is None else msgspec.json.encode(call.json))
            except TRANSPORT_ERRORS as exc:
                error = exc
            self._observe(call, attempt + 1, t0, response, error)
            last, retry_after = self._judge(call, response, error)
            if last is None:
                return _decode(call, response)
        raise self._exhausted(call, len(waits) + 1, last, waits)


def _page_params(params: dict[str, Any] | None, cursor: str | None) -> dict[str, Any]:
    out = {k: v for k, v in (params or {}).items() if v is not None}
    if cursor is not None:
        out["startingAfter"] = cursor
    return out


class AsyncClient(_Base):
    """The asynchronous client (every route method is a coroutine)."""

    def __init__(self, base_url: str, key: str | None = None, *,
                 policy: RetryPolicy | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 headers: Mapping[str, str] | None = None,
                 sleep: Callable[[float], Any] = asyncio.sleep,
                 new_key: Callable[[], str] | None = None,
                 on_attempt: Callable[[Attempt], None] | None = None,
                 http: httpx.AsyncClient | None = None,
                 limits: httpx.Limits | None = None) -> None:
        super().__init__(base_url, key, policy, headers, new_key, on_attempt)
        self.sleep = sleep
        self.http = http or httpx.AsyncClient(base_url=self.base_url, timeout=timeout,
                                              limits=limits or httpx.Limits())

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def pages(self, path: str, params: dict[str, Any] | None = None):
        """Every row of a list route, page after page (an async iterator)."""
        cursor = None
        while True:
            page = await self.request("GET", path, params=_page_params(params, cursor))
            for row in page["data"]:
                yield row
            cursor = page.get("nextCursor")
            if cursor is None:
                return

    async def _run(self, call: Call):
        headers = self._headers(call)
        waits: list[float] = []
        last: Exception | None = None
        retry_after: float | None = None
        for attempt in range(self.policy.attempts if call.retry else 1):
            if attempt:
                waits.append(self.policy.delay(attempt - 1, retry_after))
                await self.sleep(waits[-1])
            response, error, t0 = None, None, time.monotonic()
            try:
                response = await self.http.request(
                    call.method, call.path, headers=headers, params=call.params,
                    content=None if call.json is None else msgspec.json.encode(call.json))
            except TRANSPORT_ERRORS as exc:
                error = exc
            self._observe(call, attempt + 1, t0, response, error)
            last, retry_after = self._judge(call, response, error)
            if last is None:
                return _decode(call, response)
        raise self._exhausted(call, len(waits) + 1, last, waits)
