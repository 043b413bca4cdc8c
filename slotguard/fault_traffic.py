"""Partners driving the HTTP API concurrently while faults happen; every call is recorded.

Each flow is what a partner does: create a reservation (``Idempotency-Key``), the vendor
confirms (the vendor's policy waives payment, so both authorizations are passed through and
recorded by the engine), then the partner commits (about 70 %) or cancels. Calls go through
the partner client (:mod:`slotguard.client`): a step that gets no answer, a 5xx, a 429 or a
409 in-progress is retried (same ``Idempotency-Key``) with a short pause, as a real partner
would, until it gets a definite answer or the traffic stops. Every request and its answer (or the
transport error) goes into :attr:`Traffic.history`, which the invariant checker reads whole.

Slots come from a window that slides with the flow count, so partners keep contending for
the same units at a steady rate instead of filling the calendar and getting only 409s.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx

from slotguard.client import ApiError, AsyncClient, Attempt, RetryExhausted, RetryPolicy
from slotguard.fault_harness import UNIT_MINUTES, VENDOR

T0_MS = 1_924_992_000_000  # 2031-01-01T00:00:00Z
UNIT_MS = UNIT_MINUTES * 60_000
WINDOW_UNITS = 32  # units a flow may start in, from its window's start
WINDOW_STEP_FLOWS = 1  # the window moves one unit every this many flows
RETRY_PAUSE_S = 0.2
REQUEST_TIMEOUT_S = 10.0


@dataclass(slots=True)
class Call:
    """One request and its answer. ``status`` is None when no answer came (``error``)."""

    flow: int
    partner: str
    action: str  # create | vendor-confirmation | commit | cancel
    rid: str | None
    t0: float  # monotonic, request sent
    t1: float  # monotonic, answer (or error) received
    status: int | None = None
    state: str | None = None
    code: str | None = None
    error: str | None = None
    slot: tuple[int, int] | None = None  # [start, end) in ms, on creates

    @property
    def definite(self) -> bool:
        """A definite answer: the request surely took effect (2xx) or surely did not (4xx)."""
        return self.status is not None and self.status < 500 and self.status != 429


def accepted_commits(calls: list[Call]) -> set[str]:
    """Reservations whose commit was accepted: 202 (in progress), or 200 when the worker
    had already finished it by the time the answer was written."""
    return {c.rid for c in calls if c.action == "commit" and c.status in (200, 202)}


def iso(ms: int) -> str:
    from api.validation import format_time

    return format_time(ms)


class Traffic:
    def __init__(self, base_url: str, partner_keys: dict[str, str], vendor_key: str, *,
                 concurrency: int = 6, commit_ratio: float = 0.7, seed: int = 11) -> None:
        self.base_url = base_url
        self.partner_keys = partner_keys
        self.vendor_key = vendor_key
        self.concurrency = concurrency
        self.commit_ratio = commit_ratio
        self.random = random.Random(seed)
        self.history: list[Call] = []
        self._flows = 0

    # ---- what the history says ---------------------------------------------------------
    def accepted_commits(self) -> set[str]:
        return accepted_commits(self.history)

    def created(self) -> set[str]:
        return {c.rid for c in self.history if c.action == "create" and c.status == 201}

    def count(self, action: str, status: int | None = None) -> int:
        return sum(1 for c in self.history
                   if c.action == action and (status is None or c.status == status))

    # ---- driving -----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        # The partner client's retry loop (slotguard/client.py), with a flat short pause
        # and no bound on tries: a step is retried until a definite answer or the stop.
        policy = RetryPolicy(attempts=10**9, base_delay_s=RETRY_PAUSE_S,
                             max_delay_s=RETRY_PAUSE_S, rng=random.Random(self.random.random()))

        async def pause(seconds: float) -> None:
            try:
                await asyncio.wait_for(stop.wait(), seconds)
            except TimeoutError:
                return
            raise _Stopped

        limits = httpx.Limits(max_connections=self.concurrency * 2)
        async with AsyncClient(self.base_url, timeout=REQUEST_TIMEOUT_S, limits=limits,
                               policy=policy, sleep=pause) as client:
            await asyncio.gather(*(self._partner_loop(client, stop)
                                   for _ in range(self.concurrency)))

    def start(self) -> None:
        """Run in the background until :meth:`stop`."""
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.run(self._stop))

    async def stop(self) -> None:
        self._stop.set()
        await self._task

    async def wait_commits(self, more: int, timeout_s: float = 120.0) -> bool:
        """Wait until ``more`` commits beyond those accepted now are accepted; False if the
        bound passed first."""
        target = len(self.accepted_commits()) + more
        deadline = time.monotonic() + timeout_s
        while len(self.accepted_commits()) < target:
            if time.monotonic() > deadline or self._task.done():
                return False
            await asyncio.sleep(0.05)
        return True

    async def wait_failures(self, more: int, timeout_s: float = 120.0) -> bool:
        """Wait until ``more`` calls without a definite answer were recorded from now."""
        target = sum(1 for c in self.history if not c.definite) + more
        deadline = time.monotonic() + timeout_s
        while sum(1 for c in self.history if not c.definite) < target:
            if time.monotonic() > deadline or self._task.done():
                return False
            await asyncio.sleep(0.05)
        return True

    async def _partner_loop(self, client: AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._flow(client, stop)

    async def _flow(self, client: AsyncClient, stop: asyncio.Event) -> None:
        flow = self._flows
        self._flows += 1
        partner = self.random.choice(sorted(self.partner_keys))
        start = T0_MS + (flow // WINDOW_STEP_FLOWS
                         + self.random.randrange(WINDOW_UNITS)) * UNIT_MS
        end = start + self.random.randint(1, 4) * UNIT_MS
        as_partner = client.with_key(self.partner_keys[partner])
        created = await self._call(
            as_partner, flow, partner, "create", None, (start, end),
            lambda c: c.create_reservation(vendor_id=VENDOR, slot_start_time=iso(start),
                                           slot_end_time=iso(end), requester_id=f"req-{flow}",
                                           idempotency_key=f"flow-{flow}"))
        if created is None or created.status != 201:
            return
        rid = created.rid
        confirmed = await self._call(client.with_key(self.vendor_key), flow, partner,
                                     "vendor-confirmation", rid, None,
                                     lambda c: c.vendor_confirmation(rid))
        if confirmed is None or confirmed.status != 200 or stop.is_set():
            return
        last = "commit" if self.random.random() < self.commit_ratio else "cancel"
        await self._call(as_partner, flow, partner, last, rid, None,
                         lambda c: c.act(rid, last))

    async def _call(self, client: AsyncClient, flow: int, partner: str, action: str,
                    rid: str | None, slot: tuple[int, int] | None, send) -> Call | None:
        """One logical call through the client, every try recorded; the last try's record
        (None when the traffic stopped before the first)."""
        tries: list[Call] = []

        def record(attempt: Attempt) -> None:
            call = Call(flow, partner, action, rid, t0=attempt.t0, t1=attempt.t1, slot=slot)
            if attempt.response is not None:
                call.status = attempt.response.status_code
                payload = _json(attempt.response)
                error = payload.get("error") if isinstance(payload.get("error"), dict) else None
                call.code = error.get("code") if error else None
                call.state = payload.get("state")
                call.rid = call.rid or payload.get("reservationId")
            else:
                call.error = type(attempt.error).__name__
            self.history.append(call)
            tries.append(call)

        try:
            await send(client.with_options(on_attempt=record))
        except (ApiError, RetryExhausted, _Stopped):
            pass  # recorded: a definite refusal, or no definite answer before the stop
        return tries[-1] if tries else None


class _Stopped(Exception):
    """The traffic stopped while a call waited to retry."""


def _json(response: httpx.Response) -> dict:
    try:
        payload = response.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}
