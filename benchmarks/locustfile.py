"""Partner flows for Locust users (``pip install -e '.[bench]'`` brings locust).

    SLOTGUARD_PARTNER_KEY=sg_live_... SLOTGUARD_VENDOR_KEY=sg_live_... \\
        locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000

Every request goes through the typed partner client (:mod:`slotguard.client`): the same
routes, ``Idempotency-Key`` per logical call reused on retry, and backoff honouring
``Retry-After``. Each try is reported to Locust as its own request (name = the route), so a
429 or 503 shows up in Locust's failures even when the retry then succeeded.

Environment:

- ``SLOTGUARD_PARTNER_KEY`` (required), ``SLOTGUARD_PARTNER2_KEY`` (a second partner for the
  conflict flow; default the first), ``SLOTGUARD_VENDOR`` (default ``demo-vendor``, the one
  ``slotguard up`` creates), ``SLOTGUARD_VENDOR_KEY`` (its key: confirm and authorize; without
  it the walk stops at the vendor's step and cancels), ``SLOTGUARD_UNIT_MINUTES`` (default 15),
  ``SLOTGUARD_LOCUST_DAYS_AHEAD`` (slots start that many days ahead, default 30).

The flows are plain functions of :class:`slotguard.client.Client` objects, importable (and
tested) without locust: :func:`walk` (create → vendor-confirmation → authorizations when the
vendor asks for payment → commit), :func:`conflict` (two partners race for one slot: one
wins, the other gets a typed 409), :func:`create_cancel`.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass

from slotguard.client import Client, Conflict, RetryPolicy

MINUTE_MS = 60_000
DAY_MS = 86_400_000


def iso(ms: int) -> str:
    from api.validation import format_time

    return format_time(ms)


@dataclass
class Slots:
    """Random slots of one vendor, on its unit grid, ``days_ahead`` days from now."""

    unit_minutes: int = 15
    days_ahead: int = 30
    span_days: int = 60
    rng: random.Random = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.rng = self.rng or random.Random()
        day = (int(time.time() * 1000) // DAY_MS + self.days_ahead) * DAY_MS
        self.first_ms = day
        self.units = self.span_days * DAY_MS // (self.unit_minutes * MINUTE_MS)

    def pick(self, units: int = 2) -> tuple[str, str]:
        unit_ms = self.unit_minutes * MINUTE_MS
        start = self.first_ms + self.rng.randrange(self.units - units) * unit_ms
        return iso(start), iso(start + units * unit_ms)


# ---- the flows (plain functions: Locust users below, tests import them) ---------------------
def walk(partner: Client, vendor: Client | None, vendor_id: str, slot: tuple[str, str]):
    """Create → vendor-confirmation → (authorizations, when the vendor requires payment) →
    commit. Answers the last Reservation (None when the create lost a conflict). Without
    a vendor client a hold awaiting the vendor is cancelled instead."""
    try:
        created = partner.create_reservation(vendor_id=vendor_id, slot_start_time=slot[0],
                                             slot_end_time=slot[1], requester_id="locust")
    except Conflict:
        return None
    rid, state = created.reservation_id, created.state
    if state == "AWAITING_VENDOR_CONFIRMATION":
        if vendor is None:
            return partner.cancel(rid, reason="no vendor key in this run")
        state = vendor.vendor_confirmation(rid).state
    if state == "AWAITING_VENDOR_AUTH" and vendor is not None:
        state = vendor.vendor_authorization(rid, outcome="authorized").state
    if state == "AWAITING_REQUESTER_AUTH":
        state = partner.requester_authorization(rid, outcome="authorized").state
    if state != "AUTHORIZED_BOTH":
        return partner.get_reservation(rid)
    return partner.commit(rid)


def conflict(first: Client, second: Client, vendor_id: str, slot: tuple[str, str]):
    """Two partners race for one slot, one after the other: (the winner's creation, the
    loser's Conflict). The winner then cancels, leaving the slot free."""
    body = dict(vendor_id=vendor_id, slot_start_time=slot[0], slot_end_time=slot[1],
                requester_id="locust")
    won = first.create_reservation(**body)
    try:
        second.create_reservation(**body)
    except Conflict as lost:
        first.cancel(won.reservation_id, reason="conflict flow done")
        return won, lost
    raise AssertionError("two partners were both given one slot")


def create_cancel(partner: Client, vendor_id: str, slot: tuple[str, str]):
    """Create and cancel at once (placement and release; None when the slot was taken)."""
    try:
        created = partner.create_reservation(vendor_id=vendor_id, slot_start_time=slot[0],
                                             slot_end_time=slot[1], requester_id="locust")
    except Conflict:
        return None
    return partner.cancel(created.reservation_id, reason="locust create-cancel")


# ---- Locust users (only under locust) --------------------------------------------------------
# ``import locust`` monkey-patches the whole process for gevent; the users are defined only
# when locust is already running this file, so importing the flows (tests, scripts) never
# patches anything.
if "locust" in sys.modules:
    from locust import User, between, task

    def _route_name(call) -> str:
        path = call.path
        if path.startswith("/v1/reservations/"):
            rest = path.split("/")[4:]
            return "/v1/reservations/{id}" + "".join(f"/{p}" for p in rest)
        return path

    class PartnerUser(User):
        """One partner integration: mostly walks, some create-cancel, some conflicts."""

        wait_time = between(0.05, 0.5)

        def on_start(self) -> None:
            env = os.environ
            key = env.get("SLOTGUARD_PARTNER_KEY")
            if not key:
                raise RuntimeError("set SLOTGUARD_PARTNER_KEY (a partner API key)")
            self.vendor_id = env.get("SLOTGUARD_VENDOR", "demo-vendor")
            self.slots = Slots(int(env.get("SLOTGUARD_UNIT_MINUTES", "15")),
                               int(env.get("SLOTGUARD_LOCUST_DAYS_AHEAD", "30")))
            policy = RetryPolicy(attempts=5, base_delay_s=0.5, max_delay_s=10)
            self.partner = Client(self.host, key, policy=policy, on_attempt=self._report)
            self.partner2 = self.partner.with_key(env.get("SLOTGUARD_PARTNER2_KEY", key))
            vendor_key = env.get("SLOTGUARD_VENDOR_KEY")
            self.vendor = self.partner.with_key(vendor_key) if vendor_key else None

        def on_stop(self) -> None:
            self.partner.close()

        def _report(self, attempt) -> None:
            response, error = attempt.response, attempt.error
            if response is not None and response.status_code >= 400 \
                    and response.status_code != 409:
                error = RuntimeError(f"{response.status_code} {response.text[:120]}")
            self.environment.events.request.fire(
                request_type=attempt.call.method, name=_route_name(attempt.call),
                response_time=(attempt.t1 - attempt.t0) * 1000,
                response_length=len(response.content) if response is not None else 0,
                exception=error, context={})

        @task(6)
        def walk_to_commit(self) -> None:
            walk(self.partner, self.vendor, self.vendor_id, self.slots.pick())

        @task(2)
        def create_and_cancel(self) -> None:
            create_cancel(self.partner, self.vendor_id, self.slots.pick())

        @task(1)
        def two_partners_one_slot(self) -> None:
            try:
                conflict(self.partner, self.partner2, self.vendor_id, self.slots.pick())
            except Conflict:
                pass  # the slot was already taken by another user: the race was lost early
