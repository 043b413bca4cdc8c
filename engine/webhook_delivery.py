"""Webhook delivery (issue 14): the worker's loop that sends the outbox's deliveries.

Runs beside the commit-queue drain in each worker process (jobs/worker.py) and never
blocks it: the drain only inserts delivery rows in its own transaction
(engine/webhook_events.py); this loop claims due rows with a lease (``FOR UPDATE SKIP
LOCKED``, so several workers share the work and never send one attempt twice) and sends
them with httpx, ``webhook_concurrency`` at a time, at most ``webhook_endpoint_concurrency``
per endpoint (a hanging receiver holds only its own slots).

Order: a delivery is due only when no earlier version of the same reservation is pending
for the same endpoint, and every earlier version of the reservation is recorded in
``reservation_history`` (a later version committed by another consumer first waits for
the earlier one's row), so one reservation's events reach an endpoint in version order.

Signing: Standard Webhooks (``standardwebhooks``): ``webhook-id`` is the delivery's, the
same on every retry; ``webhook-timestamp`` the attempt's; ``webhook-signature`` one ``v1,``
signature per live secret (during a rotation, the new and the previous one).

Outcomes per attempt: 2xx delivered; network error, timeout, 408, 429 and 5xx retried after
the schedule's next delay (jittered, and never before a ``Retry-After``); any other status
is final (``failed``); after the schedule's last delay the delivery is ``dead`` and the
endpoint flagged. An endpoint whose deliveries have failed without a success for
``webhook_disable_after_s`` is disabled, and its owner's other endpoints get a
``webhook_endpoint.disabled`` event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import asyncpg
import httpx
from standardwebhooks.webhooks import Webhook

from engine import metrics
from engine.settings import Settings, webhook_retry_schedule
from engine.webhook_events import emit_owner_event
from engine.webhook_service import private_target

log = logging.getLogger("slotguard.webhooks")

LEASE_MARGIN_MS = 30_000
MAX_RETRY_AFTER_S = 86_400.0
USER_AGENT = "slotguard-webhooks/1"

_CLAIM = """
WITH due AS (
    SELECT d.id FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id
    WHERE d.status = 'pending' AND d.next_attempt_at <= clock_timestamp()
      AND (d.leased_until IS NULL OR d.leased_until < clock_timestamp())
      AND NOT e.disabled
      AND NOT (d.endpoint_id = ANY($3::text[]))
      AND (d.reservation_id IS NULL OR (
            NOT EXISTS (SELECT 1 FROM webhook_deliveries p
                        WHERE p.endpoint_id = d.endpoint_id
                          AND p.reservation_id = d.reservation_id
                          AND p.status = 'pending' AND p.version < d.version)
            AND (SELECT count(*) FROM reservation_history h
                 WHERE h.reservation_id = d.reservation_id AND h.version < d.version)
                >= d.version - 1))
    ORDER BY d.next_attempt_at, d.event_position
    LIMIT $1
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE webhook_deliveries d
SET leased_until = clock_timestamp() + $2 * interval '1 millisecond'
FROM due, webhook_endpoints e, webhook_events ev
WHERE d.id = due.id AND e.id = d.endpoint_id AND ev.position = d.event_position
RETURNING d.id, d.webhook_id, d.attempts, d.endpoint_id, e.url, e.secret,
          CASE WHEN e.previous_secret_expires_at > clock_timestamp() THEN e.previous_secret END,
          ev.payload::text, d.event_position
"""

_RELEASE = "UPDATE webhook_deliveries SET leased_until = NULL WHERE id = ANY($1::text[])"

# $1 id, $2 status, $3 attempts, $4 next attempt delay (s), $5 status code, $6 latency ms,
# $7 error
_RECORD = """
UPDATE webhook_deliveries SET
    status = $2, attempts = $3, leased_until = NULL,
    next_attempt_at = CASE WHEN $2 = 'pending'
                           THEN clock_timestamp() + $4 * interval '1 second'
                           ELSE next_attempt_at END,
    last_status_code = $5, last_latency_ms = $6, last_error = $7,
    last_attempt_at = clock_timestamp(),
    delivered_at = CASE WHEN $2 = 'delivered' THEN clock_timestamp() ELSE delivered_at END
WHERE id = $1
"""
# A success, in one round trip: the delivery and the end of the endpoint's failing run.
_DELIVERED = f"""
WITH d AS ({_RECORD.strip()}
    RETURNING endpoint_id)
UPDATE webhook_endpoints SET failing_since = NULL
WHERE id = (SELECT endpoint_id FROM d) AND failing_since IS NOT NULL
"""
# A failure: the endpoint's failing run starts (if it has not); a dead delivery flags it;
# failing for longer than $3 s disables it.
_ENDPOINT_FAILED = """
UPDATE webhook_endpoints SET
    failing_since = coalesce(failing_since, clock_timestamp()),
    flagged_at = CASE WHEN $2 THEN clock_timestamp() ELSE flagged_at END,
    disabled = disabled OR coalesce(failing_since, clock_timestamp())
                           <= clock_timestamp() - $3 * interval '1 second',
    disabled_reason = CASE WHEN NOT disabled AND coalesce(failing_since, clock_timestamp())
                                    <= clock_timestamp() - $3 * interval '1 second'
                           THEN 'failing since ' || coalesce(failing_since, clock_timestamp())
                           ELSE disabled_reason END
WHERE id = $1
RETURNING disabled, owner_kind, owner_id, url, disabled_reason
"""


@dataclass(frozen=True, slots=True)
class Due:
    id: str
    webhook_id: str
    attempts: int
    endpoint_id: str
    url: str
    secret: str
    previous_secret: str | None
    body: str
    position: int


@dataclass(frozen=True, slots=True)
class Result:
    status: str  # delivered | pending (retry) | failed | dead
    code: int | None
    latency_ms: int
    error: str | None
    delay_s: float = 0.0


def signature(secrets: list[str], webhook_id: str, at: datetime, body: str) -> str:
    """The ``webhook-signature`` header: one ``v1,<base64>`` per secret, space-separated."""
    return " ".join(Webhook(s).sign(webhook_id, at, body) for s in secrets)


def retry_after_s(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) as seconds from now."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class Dispatcher:
    def __init__(self, pool: asyncpg.Pool, settings: Settings,
                 client: httpx.AsyncClient | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self.schedule = webhook_retry_schedule(settings.webhook_retry_schedule_s)
        self.client = client or httpx.AsyncClient(
            follow_redirects=False, headers={"user-agent": USER_AGENT},
            limits=httpx.Limits(max_connections=settings.webhook_concurrency * 2,
                                max_keepalive_connections=settings.webhook_concurrency))
        self._own_client = client is None
        self.inflight: dict[str, int] = {}  # endpoint id -> attempts in flight here
        self.tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()  # an attempt finished: a slot is free

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._own_client:
            await self.client.aclose()

    # ---- the loop -----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Claim and send until ``stop`` is set; never exits on an error."""
        interval = self.settings.webhook_poll_ms / 1000
        try:
            while not stop.is_set():
                try:
                    claimed = await self.claim_and_start()
                except Exception as exc:  # Postgres away: try again after the interval
                    log.warning("webhook claim failed: %r", exc)
                    claimed = 0
                if claimed:
                    continue  # more may be due at once
                # Until the poll interval passes, a slot frees up, or we are stopped.
                self._wake.clear()
                waits = [asyncio.ensure_future(stop.wait()),
                         asyncio.ensure_future(self._wake.wait())]
                await asyncio.wait(waits, timeout=interval,
                                   return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
        finally:
            await self.close()

    async def claim_and_start(self) -> int:
        """Claim what is due (up to the free slots) and start sending it; the number."""
        free = self.settings.webhook_concurrency - len(self.tasks)
        if free <= 0:
            return 0
        cap = self.settings.webhook_endpoint_concurrency
        busy = [e for e, n in self.inflight.items() if n >= cap]
        lease_ms = self.settings.webhook_timeout_ms + LEASE_MARGIN_MS
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_CLAIM, free, lease_ms, busy)
        started, excess = 0, []
        for row in rows:
            due = Due(*row)
            if self.inflight.get(due.endpoint_id, 0) >= cap:
                excess.append(due.id)
                continue
            self.inflight[due.endpoint_id] = self.inflight.get(due.endpoint_id, 0) + 1
            task = asyncio.create_task(self._deliver(due))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            started += 1
        if excess:
            async with self.pool.acquire() as conn:
                await conn.execute(_RELEASE, excess)
        return started

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Send everything due now and wait for it (tests and tools)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            claimed = await self.claim_and_start()
            if self.tasks:
                await asyncio.wait(self.tasks, timeout=max(0.0, deadline - time.monotonic()))
            elif not claimed:
                return

    # ---- one attempt --------------------------------------------------------------------
    async def _deliver(self, due: Due) -> None:
        try:
            result = await self.attempt(due)
            await self._record(due, result)
        except Exception:
            log.exception("webhook delivery %s failed unexpectedly", due.id)
        finally:
            self._wake.set()
            left = self.inflight.get(due.endpoint_id, 1) - 1
            if left:
                self.inflight[due.endpoint_id] = left
            else:
                self.inflight.pop(due.endpoint_id, None)

    async def attempt(self, due: Due) -> Result:
        """Send one signed attempt and decide what it means (no database write)."""
        attempts = due.attempts + 1
        if not self.settings.webhook_allow_private and await private_target(due.url):
            return Result("failed", None, 0, "the URL resolves to a private address")
        now = datetime.now(timezone.utc)
        secrets = [due.secret] + ([due.previous_secret] if due.previous_secret else [])
        headers = {
            "content-type": "application/json",
            "webhook-id": due.webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature(secrets, due.webhook_id, now, due.body),
        }
        started = time.perf_counter()
        code, error, retry_after = None, None, None
        try:
            response = await self.client.post(
                due.url, content=due.body.encode(), headers=headers,
                timeout=self.settings.webhook_timeout_ms / 1000)
            code = response.status_code
            retry_after = retry_after_s(response.headers.get("retry-after"), time.time())
        except httpx.TimeoutException:
            error = "timeout"
        except (httpx.HTTPError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        latency_ms = int((time.perf_counter() - started) * 1000)
        metrics.WEBHOOK_ATTEMPT_SECONDS.observe(latency_ms / 1000)
        if code is not None and 200 <= code < 300:
            return Result("delivered", code, latency_ms, None)
        retryable = code is None or code in (408, 429) or code >= 500
        if not retryable:
            return Result("failed", code, latency_ms, error or f"HTTP {code}")
        if attempts > len(self.schedule):
            return Result("dead", code, latency_ms, error or f"HTTP {code}")
        delay = self.schedule[attempts - 1] * random.uniform(0.9, 1.1)
        if retry_after is not None and code in (429, 503):
            delay = max(delay, retry_after)
        return Result("pending", code, latency_ms, error or f"HTTP {code}", delay)

    async def _record(self, due: Due, result: Result) -> None:
        outcome = {"delivered": "success", "pending": "retry"}.get(result.status, "final")
        metrics.WEBHOOK_ATTEMPTS.labels(outcome=outcome).inc()
        if result.status != "pending":
            metrics.WEBHOOK_DELIVERIES.labels(outcome=result.status).inc()
        if result.status == "dead":
            metrics.WEBHOOK_DEAD_DELIVERIES.inc()
        args = (due.id, result.status, due.attempts + 1, result.delay_s, result.code,
                result.latency_ms, result.error)
        async with self.pool.acquire() as conn:
            if result.status == "delivered":
                await conn.execute(_DELIVERED, *args)
                return
            async with conn.transaction():
                await conn.execute(_RECORD, *args)
                was_disabled = await conn.fetchval(
                    "SELECT disabled FROM webhook_endpoints WHERE id = $1 FOR UPDATE",
                    due.endpoint_id)
                row = await conn.fetchrow(_ENDPOINT_FAILED, due.endpoint_id,
                                          result.status == "dead",
                                          self.settings.webhook_disable_after_s)
                if row is not None and row[0] and not was_disabled:
                    metrics.WEBHOOK_ENDPOINTS_DISABLED.inc()
                    log.warning("webhook endpoint %s disabled: %s", due.endpoint_id, row[4])
                    at_ms = int(time.time() * 1000)
                    await emit_owner_event(
                        conn, "webhook_endpoint.disabled",
                        f"disabled:{due.endpoint_id}:{at_ms}", row[1], row[2], at_ms,
                        {"endpointId": due.endpoint_id, "url": row[3], "reason": row[4]})
