"""Webhook delivery (issue 14): the worker's loop that sends the outbox's deliveries.

Runs beside the commit-queue drain in each worker process (jobs/worker.py) and never
blocks it: the drain only inserts delivery rows in its own transaction
(engine/webhook_events.py); this loop claims due rows with a lease (``FOR UPDATE SKIP
LOCKED``, so several workers share the work and never send one attempt twice) and sends
them, ``webhook_concurrency`` at a time, at most
``webhook_endpoint_concurrency`` per endpoint (a hanging receiver holds only its own slots).

Throughput (measured in benchmarks/RESULTS.md, "Events out"):

- One shared aiohttp session (its C HTTP parser; a keep-alive pool per host, HTTP/1.1, no
  cookies, no redirects) for every attempt: httpx cost ~15x the CPU per request here.
- Claims lease many due deliveries per query: per endpoint at most
  ``webhook_endpoint_concurrency`` attempts in flight and up to ``PIPELINE`` times that
  leased (queued locally, started as slots free, without a round trip each). An attempt
  starts only while its lease still covers it (else the row is handed back), so a lease
  never runs out under a send.
- Outcomes are written in batches (group commit): an attempt's slot frees when it ends,
  its outcome joins the batch being collected while the previous one is written; the
  successes of a batch are one ``UPDATE … FROM unnest``; failures (rare) keep their own
  transaction (the endpoint's failing run, flag, disabling). Claims and writes each keep
  a pool connection.
- The loop wakes on new deliveries (a ``NOTIFY`` from the outbox insert, migration 0016,
  on a connection of its own), on a free slot, and at the latest every
  ``webhook_poll_ms`` (retries come due by time; the fallback if notifications are lost).

Order: a delivery is due only when no earlier version of the same reservation is pending
for the same endpoint, and every earlier version of the reservation is recorded in
``reservation_history`` (a later version committed by another consumer first waits for
the earlier one's row), so one reservation's events reach an endpoint in version order. A
sent delivery stays ``pending`` (leased) until its outcome is written, so the next version
is not claimed before. Different reservations to one endpoint go concurrently.

Signing: Standard Webhooks (``standardwebhooks``): ``webhook-id`` is the delivery's, the
same on every retry; ``webhook-timestamp`` the attempt's; ``webhook-signature`` one ``v1,``
signature per live secret (during a rotation, the new and the previous one).

Private targets (unless ``webhook_allow_private``): an IP-literal URL is checked before the
attempt, a host name when a connection is opened (the session's resolver refuses private
addresses, so what is checked is what is connected to); a refusal is final (``failed``). A
name that does not resolve is a network error (retried).

Outcomes per attempt: 2xx delivered; network error, timeout, 408, 429 and 5xx retried after
the schedule's next delay (jittered, and never before a ``Retry-After``); any other status
is final (``failed``); after the schedule's last delay the delivery is ``dead`` and the
endpoint flagged. An endpoint whose deliveries have failed without a success for
``webhook_disable_after_s`` is disabled, and its owner's other endpoints get a
``webhook_endpoint.disabled`` event.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import aiohttp
import asyncpg
from aiohttp.abc import AbstractResolver, ResolveResult
from standardwebhooks.webhooks import Webhook

from engine import metrics
from engine.db import _libpq_url
from engine.settings import Settings, webhook_retry_schedule
from engine.webhook_events import emit_owner_event
from engine.webhook_service import refused_address

log = logging.getLogger("slotguard.webhooks")

LEASE_MARGIN_MS = 30_000
MAX_RETRY_AFTER_S = 86_400.0
# Per endpoint, at most this many slots' worth of attempts in flight and queued (leased):
# deep enough that a claim's round trip overlaps the sends even when Postgres answers
# slower than the receiver (4: ~450/s to one endpoint at load 8-10, 8: ~670/s; see
# RESULTS.md); per process, this many times webhook_concurrency.
PIPELINE = 8
LISTEN_RETRY_S = 5.0  # a failed LISTEN connection is tried again after this
OUTCOME_BATCH = 500  # outcomes per write at most
MAX_RESPONSE_BYTES = 65_536  # read (and drop) at most this much of a response body
USER_AGENT = "slotguard-webhooks/1"
PRIVATE_REFUSAL = "the URL resolves to a private address"
# Migration 0016: an insert into webhook_deliveries notifies this channel, its payload the
# table's schema (each deployment's, and each test's, dispatcher wakes for its own).
NOTIFY_CHANNEL = "slotguard_webhooks"

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
# A batch of successes, in one round trip: the deliveries and the end of their endpoints'
# failing runs. $1 ids, $2 attempts, $3 status codes, $4 latencies (ms).
_DELIVERED = """
WITH d AS (
    UPDATE webhook_deliveries d SET
        status = 'delivered', attempts = x.attempts, leased_until = NULL,
        last_status_code = x.code, last_latency_ms = x.latency_ms, last_error = NULL,
        last_attempt_at = clock_timestamp(), delivered_at = clock_timestamp()
    FROM unnest($1::text[], $2::int[], $3::int[], $4::int[])
         AS x(id, attempts, code, latency_ms)
    WHERE d.id = x.id
    RETURNING d.endpoint_id
)
UPDATE webhook_endpoints SET failing_since = NULL
WHERE id IN (SELECT endpoint_id FROM d) AND failing_since IS NOT NULL
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


class PrivateAddress(OSError):
    """A webhook host resolved to a private, loopback or link-local address."""


def literal_refused(url: str) -> bool:
    """The URL names a refused target without a lookup: a non-global IP literal (the
    session's resolver never sees those) or a ``*.localhost`` name (RFC 6761; such names
    need not resolve). Other names, ``localhost`` too, are checked by the resolver."""
    host = (urlsplit(url).hostname or "").lower()
    if host.endswith(".localhost"):
        return True
    try:
        return refused_address(ipaddress.ip_address(host.split("%")[0]))
    except ValueError:
        return False


class PublicResolver(AbstractResolver):
    """aiohttp's threaded resolver, refusing names with a private address among theirs."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if any(refused_address(ipaddress.ip_address(r["host"].split("%")[0])) for r in found):
            raise PrivateAddress(f"{host} resolves to a private address")
        return found

    async def close(self) -> None:
        await self._inner.close()


def _private_refusal(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, PrivateAddress):
            return True
        if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error,
                                                                        PrivateAddress):
            return True
        exc = exc.__cause__
    return False


class HeldConnection:
    """A pool connection kept between queries, one query at a time; a connection that
    broke goes back to the pool (which replaces it) and the next query takes another."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.conn = None
        self.lock = asyncio.Lock()

    async def run(self, work):
        async with self.lock:
            if self.conn is None:
                self.conn = await self.pool.acquire()
            try:
                return await work(self.conn)
            except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError,
                    asyncio.TimeoutError):
                await self._release()
                raise

    async def _release(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                await self.pool.release(conn, timeout=5)
            except Exception:  # noqa: BLE001  (a broken connection: the pool drops it)
                pass

    async def close(self) -> None:
        async with self.lock:
            await self._release()


class Dispatcher:
    def __init__(self, pool: asyncpg.Pool, settings: Settings,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self.schedule = webhook_retry_schedule(settings.webhook_retry_schedule_s)
        self.session = session
        self._own_session = session is None
        self.timeout_s = settings.webhook_timeout_ms / 1000
        # a queued attempt waits at most PIPELINE - 1 rounds of its endpoint's slots
        self.lease_ms = (PIPELINE + 1) * settings.webhook_timeout_ms + LEASE_MARGIN_MS
        self.inflight: dict[str, int] = {}  # endpoint id -> attempts in flight here
        self.queued: dict[str, deque[tuple[Due, float]]] = {}  # leased, not yet started
        self.tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()  # a slot freed, a notification, an outcome written
        self._claim_due = True  # a reason to claim now (else wait for one or the poll)
        self._last_claim = 0.0  # time.monotonic() of the last claim
        self._skipped: set[str] = set()  # endpoints the last claim left out (busy)
        # Outcomes waiting for the writer (group commit), and the writer.
        self._outcomes: list[tuple[Due, Result]] = []
        self._writer: asyncio.Task | None = None
        self._listener: asyncpg.Connection | None = None
        self._closing = False
        self._listen_after = 0.0  # time.monotonic() before which no LISTEN is retried
        # Claims and outcome writes each keep a pool connection (no acquire and reset
        # round trip per query); they run concurrently.
        self._claims = HeldConnection(pool)
        self._writes = HeldConnection(pool)
        # Round trips to Postgres and attempts, for the log line at close (benchmarks).
        self.queries = 0
        self.attempts = 0

    # ---- HTTP -----------------------------------------------------------------------------
    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            connector = aiohttp.TCPConnector(
                # in-flight attempts are bounded by the slots above; no per-host cap (two
                # endpoints on one host must not share one), idle keep-alive kept 30 s
                limit=self.settings.webhook_concurrency, limit_per_host=0,
                keepalive_timeout=30, ttl_dns_cache=10,
                resolver=None if self.settings.webhook_allow_private else PublicResolver())
            self.session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                headers={"user-agent": USER_AGENT}, auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self.session

    async def close(self) -> None:
        self._closing = True  # no attempt starts and no write begins from here on
        while self.tasks:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        queued = [due.id for q in self.queued.values() for due, _ in q]
        self.queued.clear()
        if queued:  # hand them back now rather than when their lease runs out
            try:
                await self._execute(_RELEASE, queued)
            except Exception as exc:
                log.warning("webhook release at close failed: %r", exc)
        await self._unlisten()
        await self._claims.close()
        await self._writes.close()
        if self._own_session and self.session is not None:
            await self.session.close()
        log.info("webhook dispatcher: %s attempts, %s Postgres round trips",
                 self.attempts, self.queries)

    # ---- wake-ups -------------------------------------------------------------------------
    def _notified(self, _conn, _pid, _channel, schema: str) -> None:
        if schema == self.settings.db_schema:
            self._claim_due = True
            self._wake.set()

    async def _listen(self) -> None:
        """A connection of its own LISTENing for new deliveries (best effort: the poll
        interval covers a lost connection, and it is re-opened on the next round)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        self._listener = None
        if time.monotonic() < self._listen_after:
            return  # it failed a moment ago (Postgres away?): the poll covers until then
        self._listen_after = time.monotonic() + LISTEN_RETRY_S
        try:
            conn = await asyncpg.connect(_libpq_url(self.settings.database_url), timeout=5)
            await conn.add_listener(NOTIFY_CHANNEL, self._notified)
            self._listener = conn
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
            log.warning("webhook LISTEN failed (polling only): %r", exc)

    async def _unlisten(self) -> None:
        if self._listener is not None:
            try:
                await self._listener.close(timeout=5)
            except Exception:  # noqa: BLE001  (closing what may be broken)
                self._listener.terminate()
            self._listener = None

    # ---- the loop -----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Claim and send until ``stop`` is set; never exits on an error."""
        interval = self.settings.webhook_poll_ms / 1000
        try:
            while not stop.is_set():
                await self._listen()
                self._wake.clear()
                try:
                    await self.claim_and_start()
                except Exception as exc:  # Postgres away: try again after the interval
                    log.warning("webhook claim failed: %r", exc)
                    self._claim_due = False
                    self._last_claim = time.monotonic()
                if self._claim_due and self._claim_limit():
                    continue  # more may be due at once
                # Until the poll interval passes, a slot frees up, a notification comes, or
                # we are stopped.
                waits = [asyncio.ensure_future(stop.wait()),
                         asyncio.ensure_future(self._wake.wait())]
                done, _ = await asyncio.wait(waits, timeout=interval,
                                             return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
                if not done:
                    self._claim_due = True
        finally:
            await self.close()

    def _work(self, endpoint_id: str) -> int:
        return self.inflight.get(endpoint_id, 0) + len(self.queued.get(endpoint_id, ()))

    def _busy(self, endpoint_id: str) -> bool:
        """The endpoint has half its pipeline (``PIPELINE`` / 2 slots' worth of attempts)
        in flight or queued: claim none for it now. It takes up to a full pipeline, so a
        claim's round trip is made while the attempts queued earlier go out, not in
        between."""
        half = PIPELINE // 2 * self.settings.webhook_endpoint_concurrency
        return self._work(endpoint_id) >= half

    def _claim_limit(self) -> int:
        """How many rows a claim may lease now (0: too few to be worth a round trip)."""
        concurrency = self.settings.webhook_concurrency
        queued = sum(map(len, self.queued.values()))
        # what is in flight, queued, or sent and not yet written counts against the budget
        # (a slow Postgres slows the claims instead of piling up outcomes); one claim takes
        # at most one endpoint's slots' worth (an endpoint that is not busy takes them all)
        per_claim = PIPELINE // 2 * self.settings.webhook_endpoint_concurrency
        limit = min(PIPELINE * concurrency - len(self.tasks) - queued - len(self._outcomes),
                    per_claim)
        return limit if limit >= max(1, min(concurrency // 4, per_claim)) else 0

    async def claim_and_start(self) -> int:
        """Start what is queued, claim what is due (per endpoint up to its slots and as
        many queued) and start it; the number claimed."""
        self._start_queued()
        if time.monotonic() - self._last_claim >= self.settings.webhook_poll_ms / 1000:
            self._claim_due = True  # retries come due by time: poll even while busy
        limit = self._claim_limit()
        if not self._claim_due or not limit:
            return 0
        self._last_claim = time.monotonic()
        # the lease runs from the query's clock_timestamp(): count it from before the query
        deadline = self._last_claim + self.lease_ms / 1000
        busy = [e for e in set(self.inflight) | set(self.queued) if self._busy(e)]
        rows = await self._fetch(_CLAIM, limit, self.lease_ms, busy)
        self._skipped = set(busy)
        excess = []
        cap = self.settings.webhook_endpoint_concurrency
        for row in rows:
            due = Due(*row)
            if self._work(due.endpoint_id) >= PIPELINE * cap:  # its slots and queue are full
                excess.append(due.id)
                continue
            self.queued.setdefault(due.endpoint_id, deque()).append((due, deadline))
        # More may be due at once after a full claim, unless its endpoints are all busy now
        # (then they claim again when they are not; other endpoints at the poll)
        claimed = {row[3] for row in rows}
        self._claim_due = len(rows) >= limit and not all(map(self._busy, claimed))
        self._skipped |= {e for e in claimed if self._busy(e)}
        if excess:
            await self._execute(_RELEASE, excess)
        self._start_queued()
        return len(rows) - len(excess)

    def _start_queued(self) -> None:
        """Start queued attempts while their endpoint and the process have free slots; an
        attempt whose lease no longer covers it goes back to the table."""
        if self._closing:
            return
        cap = self.settings.webhook_endpoint_concurrency
        room = self.settings.webhook_concurrency - len(self.tasks)
        stale = []
        for endpoint_id in list(self.queued):
            q = self.queued[endpoint_id]
            while q and room > 0 and self.inflight.get(endpoint_id, 0) < cap:
                due, lease_deadline = q.popleft()
                if time.monotonic() + self.timeout_s + 1 > lease_deadline:
                    stale.append(due.id)
                    continue
                self.inflight[endpoint_id] = self.inflight.get(endpoint_id, 0) + 1
                task = asyncio.create_task(self._deliver(due))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                room -= 1
            if not q:
                del self.queued[endpoint_id]
        if stale:
            task = asyncio.create_task(self._execute(_RELEASE, stale))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Send everything due now and wait for it (tests and tools)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._claim_due = True
            claimed = await self.claim_and_start()
            pending = set(self.tasks)
            if self._writer is not None and not self._writer.done():
                pending.add(self._writer)
            if pending:
                await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            elif not claimed and not self.queued:
                return

    # ---- Postgres -------------------------------------------------------------------------
    async def _fetch(self, query: str, *args) -> list:
        self.queries += 1
        return await self._claims.run(lambda conn: conn.fetch(query, *args))

    async def _execute(self, query: str, *args) -> None:
        self.queries += 1
        await self._claims.run(lambda conn: conn.execute(query, *args))

    # ---- one attempt --------------------------------------------------------------------
    async def _deliver(self, due: Due) -> None:
        result = None
        try:
            result = await self.attempt(due)
        except Exception:
            log.exception("webhook delivery %s failed unexpectedly", due.id)
        finally:
            # The slot frees when the attempt ends; its outcome is written by the writer.
            # The row stays pending (leased) until then, so the reservation's next version
            # is not claimed before it.
            left = self.inflight.get(due.endpoint_id, 1) - 1
            if left:
                self.inflight[due.endpoint_id] = left
            else:
                self.inflight.pop(due.endpoint_id, None)
            if due.endpoint_id in self._skipped and not self._busy(due.endpoint_id):
                self._skipped.discard(due.endpoint_id)
                self._claim_due = True  # its due rows were left out: claim them now
            if result is not None:
                self._record(due, result)
            self._start_queued()  # the next queued attempt now, not after a claim in flight
            self._wake.set()

    async def attempt(self, due: Due) -> Result:
        """Send one signed attempt and decide what it means (no database write)."""
        self.attempts += 1
        attempts = due.attempts + 1
        if not self.settings.webhook_allow_private and literal_refused(due.url):
            return Result("failed", None, 0, PRIVATE_REFUSAL)
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
            async with self._session().post(due.url, data=due.body.encode(), headers=headers,
                                            allow_redirects=False) as response:
                code = response.status
                retry_after = retry_after_s(response.headers.get("retry-after"), time.time())
                # read a small body to its end (the connection is kept alive); a big one
                # is cut off (the connection is closed instead)
                read = 0
                while read <= MAX_RESPONSE_BYTES:
                    chunk = await response.content.readany()
                    if not chunk:
                        break
                    read += len(chunk)
        except TimeoutError:
            if code is None:
                error = "timeout"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if _private_refusal(exc):
                return Result("failed", None, 0, PRIVATE_REFUSAL)
            if code is None:
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

    # ---- outcomes (group commit) --------------------------------------------------------
    def _record(self, due: Due, result: Result) -> None:
        """Count the attempt and queue its outcome for the writer."""
        outcome = {"delivered": "success", "pending": "retry"}.get(result.status, "final")
        metrics.WEBHOOK_ATTEMPTS.labels(outcome=outcome).inc()
        if result.status != "pending":
            metrics.WEBHOOK_DELIVERIES.labels(outcome=result.status).inc()
        if result.status == "dead":
            metrics.WEBHOOK_DEAD_DELIVERIES.inc()
        self._outcomes.append((due, result))
        if self._closing:
            return  # an attempt cancelled by close (its lease runs out: it is sent again)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_outcomes())

    async def _write_outcomes(self) -> None:
        """Write the outcomes collected so far in one batch, then those collected while it
        was written, until none is left (group commit)."""
        while self._outcomes:
            batch = self._outcomes[:OUTCOME_BATCH]
            del self._outcomes[:OUTCOME_BATCH]
            try:
                await self._write(batch)
            except Exception as exc:  # their leases run out: they are sent again
                log.warning("writing %s webhook outcomes failed: %r", len(batch), exc)
            # the reservations' next versions (and the endpoints) may be due now
            self._claim_due = True
            self._wake.set()

    async def _write(self, batch: list[tuple[Due, Result]]) -> None:
        delivered = [(d, r) for d, r in batch if r.status == "delivered"]
        others = [(d, r) for d, r in batch if r.status != "delivered"]
        await self._writes.run(lambda conn: self._write_on(conn, delivered, others))

    async def _write_on(self, conn: asyncpg.Connection, delivered: list, others: list) -> None:
        if delivered:
            self.queries += 1
            await conn.execute(_DELIVERED, [d.id for d, _ in delivered],
                               [d.attempts + 1 for d, _ in delivered],
                               [r.code for _, r in delivered],
                               [r.latency_ms for _, r in delivered])
        for due, result in others:
            await self._record_failure(conn, due, result)

    async def _record_failure(self, conn: asyncpg.Connection, due: Due,
                              result: Result) -> None:
        args = (due.id, result.status, due.attempts + 1, result.delay_s, result.code,
                result.latency_ms, result.error)
        self.queries += 5  # BEGIN, 3 statements, COMMIT
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
