"""The payment orchestrator (issue 12): dual authorization, capture at commit, compensation.

Bookkeeping first, always: a row of ``payment_intents`` (the attempt, its idempotency key
``{operation}-{reservationId}-{attempt}``) is written before the provider is called, every
call is journalled in ``payment_calls`` before it is made, and a capture marks its row
``capturing`` (attempt + 1) before calling out. A local Stripe-compatible server ignores
``Idempotency-Key``, so these rows alone must prevent a double charge: a row found
``capturing`` (a worker died mid-call, or the answer was lost) is looked up at the provider
before anything is captured again, and a reservation's commit decision
(``payment_commits``: captured | failed) is written before it is acted on, so a redelivery
continues the same decision instead of starting a new one.

Capture order at commit (the seed's): revalidate (the reservation still COMMIT_IN_PROGRESS,
no live booking in the way, the authorizations inside their capture window), capture the
vendor's deposit, capture the requester's price; only then may the commit queue write the
booking row and set COMMITTED. Compensation (matrix 7a/7b/7c): whatever is still only
authorized is cancelled, whatever was captured is refunded, the reservation ends
FAILED_COMMIT (or FAILED_AVAILABILITY_CHANGED when revalidation failed), and an audit row
``payment.compensation`` records what was done.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from engine import clock
from engine.errors import (
    EngineError,
    InvalidPaymentMethod,
    NotFound,
    PaymentDeclined,
    PaymentProviderError,
    TerminalState,
)
from engine.payments.provider import (
    Declined,
    Fatal,
    Intent,
    InvalidMethod,
    PaymentProvider,
    ProviderError,
    Retryable,
)

log = logging.getLogger("slotguard.payments")

ROLES = ("vendor", "requester")
LIVE = ("calling", "requires_action", "requires_capture", "capturing", "succeeded")
AUTH_ACTIONS = {"vendor": ("vendor-authorization", "vendor-authorization-failed"),
                "requester": ("requester-authorization", "requester-authorization-failed")}

_COLUMNS = """reservation_id, role, attempt, idempotency_key, partner_id, vendor_id, amount,
    currency, stripe_account_id, payment_method_id, intent_id, status, next_action,
    authorized_at, capture_attempts, captured_at, capture_id, canceled_at, refunded_amount,
    refund_id, last_error, created_at, updated_at"""


@dataclass(slots=True)
class PaymentRow:
    reservation_id: str
    role: str
    attempt: int
    idempotency_key: str
    partner_id: str
    vendor_id: str
    amount: int
    currency: str
    stripe_account_id: str | None
    payment_method_id: str
    intent_id: str | None
    status: str
    next_action: Any
    authorized_at: datetime | None
    capture_attempts: int
    captured_at: datetime | None
    capture_id: str | None
    canceled_at: datetime | None
    refunded_amount: int
    refund_id: str | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime

    def updated_at_or_created(self) -> datetime:
        return self.updated_at or self.created_at

    @classmethod
    def of(cls, row) -> PaymentRow:
        values = dict(row)
        if isinstance(values.get("next_action"), str):
            values["next_action"] = orjson.loads(values["next_action"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Authorized:
    """What an authorization call answers: the row as it ended, and the reservation when
    its transition ran."""

    row: PaymentRow
    reservation: Any = None


@dataclass(frozen=True, slots=True)
class CommitVerdict:
    """The payment side of one commit: ``book`` (both captured, the booking may be
    written) or the action that ends the reservation and why."""

    book: bool
    action: str | None = None  # fail-commit | availability-changed
    reason: str | None = None


def _now() -> datetime:
    return datetime.fromtimestamp(clock.now_ms() / 1000, UTC)


def idempotency_key(operation: str, reservation_id: str, attempt: int) -> str:
    """The seed's format: ``{operation}-{reservationId}-{attempt}``."""
    return f"{operation}-{reservation_id}-{attempt}"


class PaymentOrchestrator:
    def __init__(self, provider: PaymentProvider, pool: asyncpg.Pool, reservations,
                 settings) -> None:
        self.provider = provider
        self.pool = pool
        self.reservations = reservations  # engine.reservations.ReservationEngine
        self.settings = settings

    # ---- rows ---------------------------------------------------------------------------
    async def rows(self, reservation_id: str) -> list[PaymentRow]:
        async with self.pool.acquire() as conn:
            found = await conn.fetch(f"SELECT {_COLUMNS} FROM payment_intents "
                                     "WHERE reservation_id = $1 ORDER BY role, attempt",
                                     reservation_id)
        return [PaymentRow.of(r) for r in found]

    async def live_rows(self, reservation_ids: list[str]) -> dict[str, dict[str, PaymentRow]]:
        """reservation id -> role -> its live row (one per role at most)."""
        if not reservation_ids:
            return {}
        async with self.pool.acquire() as conn:
            found = await conn.fetch(
                f"SELECT {_COLUMNS} FROM payment_intents WHERE reservation_id = ANY($1::text[])"
                " AND status <> ALL($2::text[])", reservation_ids, ["failed", "canceled"])
        out: dict[str, dict[str, PaymentRow]] = {}
        for r in found:
            row = PaymentRow.of(r)
            out.setdefault(row.reservation_id, {})[row.role] = row
        return out

    async def _update(self, row: PaymentRow, **values: Any) -> PaymentRow:
        values["updated_at"] = _now()
        if "next_action" in values and values["next_action"] is not None:
            values["next_action"] = orjson.dumps(values["next_action"]).decode()
        names = list(values)
        sets = ", ".join(f"{n} = ${i + 4}" + ("::jsonb" if n == "next_action" else "")
                         for i, n in enumerate(names))
        async with self.pool.acquire() as conn:
            found = await conn.fetchrow(
                f"UPDATE payment_intents SET {sets} WHERE reservation_id = $1 AND role = $2 "
                f"AND attempt = $3 RETURNING {_COLUMNS}",
                row.reservation_id, row.role, row.attempt, *values.values())
        return PaymentRow.of(found)

    async def _call(self, row: PaymentRow, operation: str, key: str, call):
        """One provider call, journalled before it is made and completed after."""
        async with self.pool.acquire() as conn:
            call_id = await conn.fetchval(
                "INSERT INTO payment_calls (reservation_id, role, operation, idempotency_key, "
                "intent_id) VALUES ($1, $2, $3, $4, $5) RETURNING id",
                row.reservation_id, row.role, operation, key, row.intent_id)
        outcome, error = "ok", None
        try:
            return await call
        except ProviderError as exc:
            outcome, error = type(exc).__name__.lower(), exc.message[:500]
            raise
        except Exception as exc:
            outcome, error = "error", repr(exc)[:500]
            raise
        finally:
            try:
                async with self.pool.acquire() as conn:
                    await conn.execute("UPDATE payment_calls SET finished_at = now(), "
                                       "outcome = $2, error = $3 WHERE id = $1",
                                       call_id, outcome, error)
            except Exception:  # the journal line stays unfinished: an interrupted call
                log.warning("could not finish the journal line of %s", key)

    async def _retrying(self, make_call):
        """Bounded exponential backoff with ±20 % jitter on Retryable errors only."""
        attempts = self.settings.payment_retry_attempts
        delay = self.settings.payment_retry_base_ms / 1000
        cap = self.settings.payment_retry_max_ms / 1000
        for attempt in range(1, attempts + 1):
            try:
                return await make_call(attempt)
            except Retryable:
                if attempt == attempts:
                    raise
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, cap)
        raise AssertionError("unreachable")

    # ---- authorization -------------------------------------------------------------------
    async def authorize(self, reservation, vendor, role: str, payment_method: str) -> Authorized:
        """Create (or resume) the role's manual-capture PaymentIntent and move the
        reservation on when it is authorized. ``reservation`` is the engine's Reservation
        (state checked by the caller), ``vendor`` the directory's Vendor (its terms)."""
        rid = reservation.reservation_id
        amount = vendor.deposit_amount if role == "vendor" else vendor.price_amount
        account = vendor.stripe_account_id if role == "requester" else None
        row, created = await self._claim(reservation, vendor, role, amount, account,
                                         payment_method)
        if row.status == "calling" and not created and \
                (_now() - row.updated_at_or_created()).total_seconds() * 1000 \
                < 2 * self.settings.stripe_timeout_ms:
            # Another request is calling Stripe for this role right now.
            from engine.errors import IdempotencyInProgress

            raise IdempotencyInProgress("an authorization of this reservation is in progress",
                                        details={"reservationId": rid, "role": role},
                                        retry_after_ms=1000, code="PAYMENT_IN_PROGRESS")
        if row.status in ("requires_capture", "succeeded"):
            # Authorized earlier; the transition may not have run (a crash, a lost answer).
            return Authorized(row, await self._advance(row))
        if row.status == "requires_action":
            # A re-poll: the payer may have finished 3-D Secure since (the webhook may not
            # have arrived); the intent at the provider decides.
            try:
                intent = await self._call(row, "retrieve", f"retrieve-{row.intent_id}",
                                          self.provider.retrieve(row.intent_id,
                                                                 stripe_account=account))
            except ProviderError:
                return Authorized(row)  # still waiting, as far as we know
            if intent.status == "requires_action":
                return Authorized(row)
            if intent.status in ("requires_payment_method", "canceled"):
                row = await self._update(row, status="failed", next_action=None,
                                         last_error=f"3-D Secure: intent {intent.status}")
                moved = await self._fail_auth(row, "authentication_failed")
                raise PaymentDeclined("the payment was not authenticated", details={
                    "reservationId": rid, "role": role,
                    "state": getattr(getattr(moved, "state", None), "value", None)})
            return await self._record_intent(row, intent)
        metadata = {"reservation_id": rid, "partner_id": reservation.partner_id,
                    "attempt": str(row.attempt), "role": role}
        try:
            intent = await self._call(row, "auth", row.idempotency_key, self.provider.authorize(
                amount=row.amount, currency=row.currency, payment_method=payment_method,
                metadata=metadata, idempotency_key=row.idempotency_key, stripe_account=account))
        except Declined as exc:
            row = await self._update(row, status="failed", last_error=f"{exc.code}: "
                                     f"{exc.message}"[:500])
            moved = await self._fail_auth(row, exc.code or "card_declined")
            raise PaymentDeclined("the card was declined", details={
                "reservationId": rid, "role": role, "declineCode": exc.code,
                "state": getattr(getattr(moved, "state", None), "value", None)}) from None
        except InvalidMethod as exc:
            await self._update(row, status="failed", last_error=exc.message[:500])
            raise InvalidPaymentMethod("the payment method is unknown or cannot be used",
                                       details={"field": "paymentMethodId",
                                                "reservationId": rid}) from None
        except Fatal as exc:
            await self._update(row, status="failed", last_error=exc.message[:500])
            raise PaymentProviderError(f"the payment provider refused: {exc.message}",
                                       details={"reservationId": rid}) from None
        except Retryable as exc:
            # Unknown whether the intent exists: the row stays 'calling' and a retry uses the
            # same idempotency key (Stripe answers the first intent again).
            await self._update(row, last_error=exc.message[:500])
            raise PaymentProviderError("the payment provider is unavailable; try again",
                                       details={"reservationId": rid},
                                       retry_after_ms=1000) from None
        return await self._record_intent(row, intent)

    async def _claim(self, reservation, vendor, role, amount, account,
                     payment_method) -> tuple[PaymentRow, bool]:
        """The role's live row, or a new attempt's row written before any call."""
        rid = reservation.reservation_id
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"pay:{rid}")
                live = await conn.fetchrow(
                    f"SELECT {_COLUMNS} FROM payment_intents WHERE reservation_id = $1 AND "
                    "role = $2 AND status <> ALL($3::text[])", rid, role,
                    ["failed", "canceled"])
                if live is not None:
                    return PaymentRow.of(live), False
                attempt = 1 + (await conn.fetchval(
                    "SELECT coalesce(max(attempt), 0) FROM payment_intents "
                    "WHERE reservation_id = $1 AND role = $2", rid, role))
                key = idempotency_key(f"{role}-auth", rid, attempt)
                found = await conn.fetchrow(
                    f"""INSERT INTO payment_intents (reservation_id, role, attempt,
                        idempotency_key, partner_id, vendor_id, amount, currency,
                        stripe_account_id, payment_method_id)
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {_COLUMNS}""",
                    rid, role, attempt, key, reservation.partner_id, vendor.id, amount,
                    vendor.currency, account, payment_method)
        return PaymentRow.of(found), True

    async def _record_intent(self, row: PaymentRow, intent: Intent) -> Authorized:
        if intent.status == "requires_capture":
            row = await self._update(row, intent_id=intent.id, status="requires_capture",
                                     authorized_at=_now(), next_action=None)
            return Authorized(row, await self._advance(row))
        if intent.status == "requires_action":
            row = await self._update(row, intent_id=intent.id, status="requires_action",
                                     next_action=intent.next_action or {})
            return Authorized(row)
        # Anything else (requires_payment_method after a failed attempt): no money held.
        row = await self._update(row, intent_id=intent.id, status="failed",
                                 last_error=f"intent {intent.status}")
        await self._fail_auth(row, f"intent_{intent.status}")
        raise PaymentDeclined("the payment was not authorized",
                              details={"reservationId": row.reservation_id, "role": row.role})

    async def _advance(self, row: PaymentRow):
        """The reservation's authorization transition for an authorized row; an intent whose
        reservation can no longer take it (expired, cancelled meanwhile) is released."""
        action = AUTH_ACTIONS[row.role][0]
        try:
            moved = await self.reservations.act(
                row.reservation_id, action, actor="system" if row.role == "vendor" else "system",
                metadata={"paymentIntentId": row.intent_id, "role": row.role},
                with_record=True, wait_cap=False)
            return moved.reservation
        except EngineError as exc:
            current = await self.reservations.get(row.reservation_id)
            if current is not None and _moved_past(current.state.value, row.role):
                return current  # an earlier call (or the webhook) already moved it on
            await self.release(row, reason=f"reservation cannot be authorized: {exc.code}")
            raise

    async def _fail_auth(self, row: PaymentRow, reason: str):
        """The role's authorization failed: FAILED_*_AUTH, and whatever was authorized
        (the vendor's deposit when the requester's card fails) is cancelled."""
        moved = None
        try:
            moved = (await self.reservations.act(
                row.reservation_id, AUTH_ACTIONS[row.role][1], actor="system", reason=reason,
                metadata={"role": row.role}, with_record=True, wait_cap=False)).reservation
        except EngineError as exc:
            log.info("authorization failure of %s not recorded: %s", row.reservation_id,
                     exc.code)
        for other in (await self.live_rows([row.reservation_id])).get(row.reservation_id,
                                                                       {}).values():
            await self.release(other, reason=f"{row.role} authorization failed")
        return moved

    async def release(self, row: PaymentRow, *, reason: str) -> PaymentRow:
        """Cancel an intent that holds money but was never captured (idempotent)."""
        if row.status in ("failed", "canceled", "succeeded") or row.intent_id is None:
            if row.status in ("calling",) and row.intent_id is None:
                return await self._update(row, status="failed", last_error=reason[:500])
            return row
        account = row.stripe_account_id

        async def cancel(n: int):
            key = idempotency_key(f"{row.role}-cancel", row.reservation_id, n)
            return await self._call(row, "cancel", key, self.provider.cancel(
                row.intent_id, idempotency_key=key, stripe_account=account))

        try:
            await self._retrying(cancel)
        except (Fatal, InvalidMethod, Declined):
            intent = await self.provider.retrieve(row.intent_id, stripe_account=account)
            if intent.status == "succeeded":
                return await self._update(row, status="succeeded", captured_at=_now())
            if intent.status != "canceled":
                raise
        return await self._update(row, status="canceled", canceled_at=_now(),
                                  last_error=row.last_error or reason[:500], next_action=None)

    # ---- inbound events (3-D Secure) ---------------------------------------------------
    async def intent_event(self, intent: Intent, succeeded: bool) -> str:
        """A verified webhook's PaymentIntent: ``amount_capturable_updated`` (authorized)
        or ``payment_failed``. Answers what was done."""
        async with self.pool.acquire() as conn:
            found = await conn.fetchrow(f"SELECT {_COLUMNS} FROM payment_intents "
                                        "WHERE intent_id = $1", intent.id)
        if found is None:
            return "unknown_intent"
        row = PaymentRow.of(found)
        if succeeded:
            if row.status != "requires_action":
                return "already_" + row.status
            row = await self._update(row, status="requires_capture", authorized_at=_now(),
                                     next_action=None)
            try:
                await self._advance(row)
            except EngineError as exc:
                return f"released: {exc.code}"
            return "authorized"
        if row.status not in ("requires_action", "calling"):
            return "already_" + row.status
        row = await self._update(row, status="failed", next_action=None,
                                 last_error="payment_failed (webhook)")
        await self._fail_auth(row, "payment_failed")
        return "failed"

    # ---- capture at commit -------------------------------------------------------------
    async def capture_commits(self, reservation_ids: list[str],
                              paying: set[str] = frozenset()) -> dict[str, CommitVerdict]:
        """For the reservations committed in a batch: the payment verdict of every one that
        has payments or whose record says its vendor requires payment (``paying``: one with
        no authorization at all fails, never books free); free ones are not in the answer
        and book as before."""
        by_id = {rid: rid for rid in reservation_ids}
        rows = await self.live_rows(list(by_id))
        async with self.pool.acquire() as conn:
            decided = dict(await conn.fetch(
                "SELECT reservation_id, outcome FROM payment_commits "
                "WHERE reservation_id = ANY($1::text[])", list(by_id)))
            failed_rows = {r[0] for r in await conn.fetch(
                "SELECT DISTINCT reservation_id FROM payment_intents "
                "WHERE reservation_id = ANY($1::text[])", list(by_id))}
        paid = set(rows) | set(decided) | failed_rows | (set(paying) & set(by_id))
        verdicts = await asyncio.gather(*(
            self._capture_one(by_id[rid], rows.get(rid, {}), decided.get(rid))
            for rid in paid))
        return dict(zip(paid, verdicts))

    async def _capture_one(self, rid: str, rows: dict[str, PaymentRow],
                           decided: str | None) -> CommitVerdict:
        if decided == "captured":
            return CommitVerdict(True)
        if decided == "failed":
            reason = await self._decision_reason(rid)
            await self.compensate(rid, reason)
            return CommitVerdict(False, *_verdict_of(reason))
        # Revalidate: authorizations present and fresh, the slot still ours.
        reason = None
        if set(rows) != set(ROLES) or any(r.status not in ("requires_capture", "capturing",
                                                           "succeeded")
                                          for r in rows.values()):
            reason = "authorization_missing"
        else:
            oldest = min(r.authorized_at or r.created_at for r in rows.values())
            if clock.now_ms() - oldest.timestamp() * 1000 > \
                    self.settings.payment_capture_window_ms:
                reason = "authorization_expired"
        if reason is None and await self._slot_taken(rid):
            reason = "availability_changed"
        if reason is None:
            current = await self.reservations.get(rid)
            if current is not None and current.state.value != "COMMIT_IN_PROGRESS":
                reason = f"state_{current.state.value.lower()}"
        if reason is not None:
            return await self._decide_failed(rid, reason)
        # Capture: vendor first, then requester (the seed's order).
        for role in ROLES:
            try:
                rows[role] = await self.capture(rows[role])
            except ProviderError as exc:
                return await self._decide_failed(
                    rid, f"{role}_capture_failed: {type(exc).__name__}: {exc.message}"[:400])
        async with self.pool.acquire() as conn:
            await conn.execute("INSERT INTO payment_commits (reservation_id, outcome) "
                               "VALUES ($1, 'captured') ON CONFLICT DO NOTHING", rid)
            outcome = await conn.fetchval("SELECT outcome FROM payment_commits "
                                          "WHERE reservation_id = $1", rid)
        if outcome != "captured":  # a concurrent delivery decided otherwise
            reason = await self._decision_reason(rid)
            await self.compensate(rid, reason)
            return CommitVerdict(False, *_verdict_of(reason))
        return CommitVerdict(True)

    async def _slot_taken(self, rid: str) -> bool:
        """A live booking overlaps the reservation's block (from its Postgres snapshot; a
        snapshot not written yet leaves the check to the exclusion constraint, after which
        a refused booking is refunded)."""
        async with self.pool.acquire() as conn:
            return bool(await conn.fetchval(
                """SELECT EXISTS (SELECT 1 FROM reservations s JOIN resources x
                       ON x.id = s.resource_id JOIN bookings b ON b.resource_key = x.key
                       WHERE s.id = $1 AND b.cancelled_at IS NULL AND b.reservation_id <> $1
                       AND tstzrange(b.block_start, b.block_end, '[)') &&
                           tstzrange(s.block_start, s.block_end, '[)'))""", rid))

    async def annotate_booking(self, rid: str, booking_id: str) -> None:
        """After COMMITTED: ``metadata.booking_id`` on both intents (the seed's external
        reference). Best effort: a failure is journalled and logged, the booking stands."""
        for row in await self.rows(rid):
            if row.status != "succeeded" or row.intent_id is None:
                continue
            metadata = {"reservation_id": rid, "partner_id": row.partner_id,
                        "attempt": str(row.attempt), "role": row.role,
                        "booking_id": booking_id}
            try:
                await self._call(row, "annotate", f"annotate-{row.intent_id}",
                                 self.provider.annotate(row.intent_id, metadata=metadata,
                                                        stripe_account=row.stripe_account_id))
            except ProviderError as exc:
                log.warning("booking id not written to %s: %s", row.intent_id, exc.message)

    async def refuse_booking(self, rid: str) -> None:
        """Both captured, then the booking was refused (the slot was taken meanwhile): the
        decision turns to failed and everything captured is refunded."""
        async with self.pool.acquire() as conn:
            await conn.execute("UPDATE payment_commits SET outcome = 'failed', "
                               "reason = 'availability_changed' WHERE reservation_id = $1", rid)
        await self.compensate(rid, "availability_changed")

    async def _decision_reason(self, rid: str) -> str:
        async with self.pool.acquire() as conn:
            return await conn.fetchval("SELECT reason FROM payment_commits "
                                       "WHERE reservation_id = $1", rid) or "failed"

    async def _decide_failed(self, rid: str, reason: str) -> CommitVerdict:
        async with self.pool.acquire() as conn:
            await conn.execute("INSERT INTO payment_commits (reservation_id, outcome, reason) "
                               "VALUES ($1, 'failed', $2) ON CONFLICT DO NOTHING", rid, reason)
            outcome, reason = await conn.fetchrow(
                "SELECT outcome, reason FROM payment_commits WHERE reservation_id = $1", rid)
        if outcome == "captured":
            return CommitVerdict(True)
        await self.compensate(rid, reason or "failed")
        return CommitVerdict(False, *_verdict_of(reason or "failed"))

    async def capture(self, row: PaymentRow) -> PaymentRow:
        """Capture one authorized intent exactly once: each attempt is recorded
        (``capturing``, attempt + 1) before the call, and an interrupted one is looked up
        at the provider before another is made."""
        account = row.stripe_account_id

        async def attempt_capture(n: int) -> PaymentRow:
            nonlocal row
            if row.status == "succeeded":
                return row
            if row.status == "capturing" or n > 1:
                # An earlier attempt may have gone through (crash, lost answer, 5xx after
                # the fact): ask before capturing again.
                intent = await self._call(row, "retrieve", f"retrieve-{row.intent_id}",
                                          self.provider.retrieve(row.intent_id,
                                                                 stripe_account=account))
                if intent.status == "succeeded":
                    row = await self._update(row, status="succeeded", captured_at=_now(),
                                             capture_id=intent.latest_charge)
                    return row
                if intent.status != "requires_capture":
                    raise Fatal(f"the intent is {intent.status}", code=intent.status)
            async with self.pool.acquire() as conn:
                found = await conn.fetchrow(
                    f"""UPDATE payment_intents SET status = 'capturing',
                        capture_attempts = capture_attempts + 1, updated_at = now()
                        WHERE reservation_id = $1 AND role = $2 AND attempt = $3
                        RETURNING {_COLUMNS}""", row.reservation_id, row.role, row.attempt)
            row = PaymentRow.of(found)
            key = idempotency_key(f"{row.role}-capture", row.reservation_id,
                                  row.capture_attempts)
            try:
                intent = await self._call(row, "capture", key, self.provider.capture(
                    row.intent_id, idempotency_key=key, stripe_account=account))
            except ProviderError as exc:
                row = await self._update(row, last_error=f"capture: {exc.message}"[:500])
                raise
            row = await self._update(row, status="succeeded", captured_at=_now(),
                                     capture_id=intent.latest_charge, last_error=None)
            return row

        return await self._retrying(attempt_capture)

    async def compensate(self, rid: str, reason: str) -> dict[str, Any]:
        """Undo a failed commit's payments (idempotent): cancel what is only authorized,
        refund what was captured; one ``payment.compensation`` audit row."""
        done: dict[str, Any] = {}
        for row in await self.rows(rid):
            if row.status in ("requires_capture", "requires_action", "calling"):
                row = await self.release(row, reason=reason)
                done[row.role] = "canceled"
            elif row.status == "capturing":
                intent = await self.provider.retrieve(row.intent_id,
                                                      stripe_account=row.stripe_account_id)
                if intent.status == "succeeded":
                    row = await self._update(row, status="succeeded", captured_at=_now(),
                                             capture_id=intent.latest_charge)
                else:
                    row = await self._update(row, status="requires_capture")
                    row = await self.release(row, reason=reason)
                    done[row.role] = "canceled"
            if row.status == "succeeded":
                await self.refund_to(row, row.amount, "compensation")
                done[row.role] = "refunded"
            elif row.status == "canceled" and row.role not in done:
                done[row.role] = "canceled"
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                first = await conn.fetchval(
                    "UPDATE payment_commits SET compensated_at = now() WHERE reservation_id = $1"
                    " AND compensated_at IS NULL RETURNING reservation_id", rid)
                if first is not None:
                    await _audit(conn, f"{rid}:compensation", rid, "payment.compensation",
                                 {"reason": reason, "payments": done})
        return done

    async def refund_to(self, row: PaymentRow, target: int, why: str) -> PaymentRow:
        """Make the refunded total of a captured intent ``target`` (minor units), once:
        the target is recorded before any call, and what the provider already refunded
        (an earlier call whose answer was lost) is asked before refunding the rest."""
        target = min(target, row.amount)
        async with self.pool.acquire() as conn:
            found = await conn.fetchrow(
                f"""UPDATE payment_intents SET refunded_amount = greatest(refunded_amount, $4),
                    updated_at = now() WHERE reservation_id = $1 AND role = $2 AND attempt = $3
                    RETURNING {_COLUMNS}""", row.reservation_id, row.role, row.attempt, target)
        row = PaymentRow.of(found)
        account = row.stripe_account_id

        async def call(n: int):
            done = await self._call(row, "refunded", f"refunded-{row.intent_id}",
                                    self.provider.refunded(row.intent_id,
                                                           stripe_account=account))
            if done >= target:
                return None
            async with self.pool.acquire() as conn:
                attempt = 1 + await conn.fetchval(
                    "SELECT count(*) FROM payment_calls WHERE reservation_id = $1 AND role = $2"
                    " AND operation = 'refund'", row.reservation_id, row.role)
            key = idempotency_key(f"{row.role}-refund", row.reservation_id, attempt)
            return await self._call(row, "refund", key, self.provider.refund(
                row.intent_id, amount=target - done, idempotency_key=key,
                stripe_account=account,
                metadata={"reservation_id": row.reservation_id, "reason": why}))

        refund_id = await self._retrying(call)
        if refund_id is not None:
            row = await self._update(row, refund_id=refund_id)
        return row

    # ---- reconciliation ----------------------------------------------------------------
    async def release_orphans(self, state_of) -> dict[str, int]:
        """Cancel authorizations whose reservation ended without a commit (cancelled,
        expired, failed) and flag stale ones (older than the capture window).
        ``state_of(reservation_id)`` answers the reservation's state or None when unknown."""
        async with self.pool.acquire() as conn:
            found = await conn.fetch(
                f"""SELECT {_COLUMNS} FROM payment_intents p WHERE status IN
                    ('requires_capture', 'requires_action') AND NOT EXISTS (SELECT 1 FROM
                    payment_commits c WHERE c.reservation_id = p.reservation_id
                    AND c.outcome = 'captured')""")
        released = stale = 0
        window = self.settings.payment_capture_window_ms
        for record in found:
            row = PaymentRow.of(record)
            state = await state_of(row.reservation_id)
            aged = clock.now_ms() - row.created_at.timestamp() * 1000 > window
            ended = state is not None and state not in LIVE_STATES
            if ended or aged:
                await self.release(row, reason="orphaned authorization" if ended
                                   else "stale authorization")
                if aged and not ended:
                    stale += 1
                    try:
                        await self.reservations.act(row.reservation_id, "cancel",
                                                    actor="system",
                                                    reason="authorization outlived its window")
                    except EngineError:
                        pass
                released += 1
        return {"released": released, "stale": stale}


def reservation_state(engine, pool):
    """``state_of`` for :meth:`PaymentOrchestrator.release_orphans`: the live Redis record's
    state, else the Postgres snapshot's, else None (unknown: left alone)."""

    async def state_of(reservation_id: str) -> str | None:
        try:
            found = await engine.get(reservation_id)
        except Exception:
            found = None
        if found is not None:
            return found.state.value
        async with pool.acquire() as conn:
            return await conn.fetchval("SELECT state FROM reservations WHERE id = $1",
                                       reservation_id)

    return state_of


LIVE_STATES = {"HELD", "AWAITING_VENDOR_CONFIRMATION", "CONFIRMED_BY_VENDOR",
               "AWAITING_VENDOR_AUTH", "VENDOR_AUTHORIZED", "AWAITING_REQUESTER_AUTH",
               "AUTHORIZED_BOTH", "COMMIT_IN_PROGRESS", "COMMITTED"}


def _moved_past(state: str, role: str) -> bool:
    after_vendor = {"VENDOR_AUTHORIZED", "AWAITING_REQUESTER_AUTH", "AUTHORIZED_BOTH",
                    "COMMIT_IN_PROGRESS", "COMMITTED"}
    if role == "vendor":
        return state in after_vendor
    return state in {"AUTHORIZED_BOTH", "COMMIT_IN_PROGRESS", "COMMITTED"}


def _verdict_of(reason: str) -> tuple[str, str]:
    if reason == "availability_changed":
        return "availability-changed", "the slot was booked meanwhile"
    return "fail-commit", reason


async def _audit(conn, event_id: str, reservation_id: str, action: str,
                 metadata: dict[str, Any]) -> None:
    await conn.execute(
        """INSERT INTO audit_log (event_id, tenant_id, reservation_id, resource_id, action,
               actor, at, metadata)
           SELECT $1, r.partner_id, $2, r.resource_id, $3, 'system', now(), $4::jsonb
           FROM (SELECT $2::text AS id) x LEFT JOIN reservations r ON r.id = x.id
           ON CONFLICT (event_id) DO NOTHING""",
        event_id, reservation_id, action, orjson.dumps(metadata).decode())


def payment_state(rows: list[PaymentRow]) -> dict[str, Any] | None:
    """The seed's PaymentState (camelCase) from a reservation's rows (latest per role)."""
    if not rows:
        return None
    latest: dict[str, PaymentRow] = {}
    for row in rows:
        if row.role not in latest or row.attempt > latest[row.role].attempt:
            latest[row.role] = row
    state: dict[str, Any] = {"vendorCaptureAttempts": 0, "requesterCaptureAttempts": 0}
    errors = []
    for role, row in latest.items():
        status = {"calling": "processing", "capturing": "requires_capture",
                  "failed": "requires_payment_method"}.get(row.status, row.status)
        state[f"{role}PaymentIntentId"] = row.intent_id
        state[f"{role}PaymentIntentStatus"] = status
        state[f"{role}AuthorizedAt"] = _iso(row.authorized_at)
        state[f"{role}CaptureId"] = row.capture_id
        state[f"{role}CaptureAttempts"] = row.capture_attempts
        state[f"{role}NextAction"] = row.next_action
        state[f"{role}Amount"] = row.amount
        state[f"{role}RefundedAmount"] = row.refunded_amount
        state["currency"] = row.currency
        if row.last_error:
            errors.append((row.created_at, row.last_error))
    state["lastCaptureError"] = next((e for _, e in sorted(errors, reverse=True)
                                      if e.startswith("capture")), None)
    return state


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


__all__ = ["PaymentOrchestrator", "PaymentRow", "CommitVerdict", "payment_state",
           "idempotency_key", "NotFound", "TerminalState"]
