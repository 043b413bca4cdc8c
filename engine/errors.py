"""Business outcomes of the Lua scripts and the engine's typed errors.

Scripts answer business outcomes as negative integers; :class:`Outcome` names them, and
:data:`ERRORS` (used through :func:`error_for`) is the one table from a script's reply to the
engine error it means (``error()`` in Lua is for bugs only). The names reach the scripts
generated (``--@include @outcomes`` expands to :func:`lua_outcomes`), so a script returns
``{OUTCOME.CONFLICT, ...}``, never a bare number. Every engine error carries a stable machine
``code`` that the API puts in its error envelope unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import Any


class Outcome(IntEnum):
    OK = 1
    CONFLICT = -1
    INVALID = -2
    HOLD_ID_REUSED = -3
    NOT_FOUND = -4
    NOT_OWNER = -5
    EXTENSION_LIMIT = -6
    MAX_DURATION = -7
    INVALID_TRANSITION = -8
    VERSION_MISMATCH = -9
    HOLD_LOST = -10
    TERMINAL = -11
    RATE_LIMITED = -12
    CAP_EXCEEDED = -13
    IDEMPOTENCY_MISMATCH = -14
    IDEMPOTENCY_IN_PROGRESS = -15
    EXPIRED = -16
    NOT_DUE = -17
    NOT_READY = -18
    FOREIGN_RESOURCE = -19
    # Pooled holds (issue 16, pool): -30 .. -34.
    POOL_FULL = -30
    MULTI_RESOURCE = -31
    # Hold transfer and waitlist handoff (issue 16, waitlist helper: -35 .. -39).
    TRANSFER_TOKEN_INVALID = -35
    TRANSFER_TOKEN_USED = -36
    TRANSFER_WRONG_PARTNER = -37
    TRANSFER_TO_SELF = -38
    WAITLIST_NOT_WAITING = -39
    # Availability engine (issue 13): -25 .. -29.
    RULES_STALE = -25
    AVAILABILITY_CHANGED = -26
    SLOT_REFUSED = -27
    # Partner-readable details (issue 17): -45 .. -49.
    EXTEND_NOT_LATER = -45


class EngineError(Exception):
    """Base of every typed engine error. ``details`` is JSON-safe."""

    code = "ENGINE_ERROR"
    retryable = False

    def __init__(self, message: str, *, details: dict[str, Any] | None = None,
                 retry_after_ms: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details = details or {}
        self.retry_after_ms = retry_after_ms


class ValidationError(EngineError):
    code = "VALIDATION_ERROR"


class UnknownResource(EngineError):
    code = "UNKNOWN_RESOURCE"


class NotFound(EngineError):
    code = "NOT_FOUND"


class HoldConflict(EngineError):
    """The slot (or a unit of its buffers) is held or booked by someone else."""

    code = "SLOT_UNAVAILABLE"

    def __init__(self, message: str, *, holder: str, unit: int, booked: bool,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.holder = holder
        self.unit = unit
        self.booked = booked


class HoldIdReused(EngineError):
    code = "HOLD_ID_REUSED"


class NotOwner(EngineError):
    code = "NOT_OWNER"


class ExtensionLimit(EngineError):
    code = "EXTENSION_LIMIT"


class MaxHoldDuration(EngineError):
    code = "MAX_HOLD_DURATION"


class InvalidTransition(EngineError):
    code = "INVALID_TRANSITION"


class TerminalState(EngineError):
    code = "RESERVATION_TERMINAL"


class ReservationExpired(EngineError):
    """The reservation's deadline passed; it is now EXPIRED (or FAILED_VENDOR_TIMEOUT)."""

    code = "RESERVATION_EXPIRED"


class CommitInProgress(EngineError):
    code = "COMMIT_IN_PROGRESS"


class VersionMismatch(EngineError):
    code = "VERSION_MISMATCH"


class HoldLost(EngineError):
    """The reservation's hold no longer owns every unit (mandatory revalidation failed)."""

    code = "HOLD_LOST"


class RateLimited(EngineError):
    code = "RATE_LIMITED"
    retryable = True


class CapExceeded(EngineError):
    code = "HOLD_CAP_EXCEEDED"
    retryable = True


class IdempotencyMismatch(EngineError):
    code = "IDEMPOTENCY_KEY_MISMATCH"


class IdempotencyInProgress(EngineError):
    code = "IDEMPOTENCY_KEY_IN_PROGRESS"
    retryable = True


class PaymentRequired(EngineError):
    """The vendor requires payment and no payment provider is configured yet."""

    code = "PAYMENT_PROVIDER_UNAVAILABLE"


class NotReady(EngineError):
    """Redis lost its data and the booked markers are not rehydrated yet: try again soon."""

    code = "NOT_READY"
    retryable = True


class UnsafeRedis(EngineError):
    """Redis would evict keys under memory pressure: an evicted hold is a double booking."""

    code = "UNSAFE_REDIS_CONFIG"


class ModifyCrossShard(EngineError):
    """A move to a resource under another shard's hash tag: one script cannot hold both
    (multi-resource tags are a later step of issue 16)."""

    code = "MODIFY_CROSS_SHARD"


# ---- resource groups and pooled holds (issue 16, pool) -----------------------------------
class PoolFull(EngineError):
    """No member of the resource group is free for the whole slot (checked atomically over
    every member in one script: never reported while a member is free)."""
    code = "POOL_FULL"


class GroupNotColocated(EngineError):
    """A group's members live under different shard hash tags, so one script cannot choose
    among them: re-key the vendor (``slotguard rekey``)."""
    code = "GROUP_NOT_COLOCATED"


class ModifyMultiResource(EngineError):
    """A reservation of several items is not moved (modify moves one resource's hold)."""
    code = "MODIFY_MULTI_RESOURCE"


class LiveHoldsOnResource(EngineError):
    """A re-key was refused: a resource it would move still has live holds."""
    code = "LIVE_HOLDS"


# ---- hold transfer and waitlist handoff (issue 16) -----------------------------------------
class TransferTokenInvalid(NotFound):
    """No live transfer offer of this reservation matches the token (unknown, expired, or
    the reservation changed hands since the offer): answered as not found, so a token that
    fails tells nothing about the reservation."""

    code = "TRANSFER_TOKEN_INVALID"


class TransferTokenUsed(EngineError):
    """The acceptance token was already used (a token is good for one transfer)."""

    code = "TRANSFER_TOKEN_USED"


class TransferWrongPartner(EngineError):
    """The offer names another partner than the caller."""

    code = "TRANSFER_WRONG_PARTNER"


class TransferToSelf(EngineError):
    """The holder cannot accept (or address) a transfer of its own hold."""

    code = "TRANSFER_TO_SELF"


class WaitlistNotWaiting(EngineError):
    """The waitlist entry is no longer waiting (fulfilled, expired or withdrawn)."""

    code = "WAITLIST_ENTRY_NOT_WAITING"


# ---- partner-readable details (issue 17) ---------------------------------------------
class ExtendNotLater(EngineError):
    """An extension whose ``now + ttlMs`` is not after the current deadline: refused, and
    no extension is spent."""

    code = "EXTEND_NOT_LATER"


def _extend_not_later(reply: list, ctx: dict) -> EngineError:
    from engine.times import format_time

    deadline, requested = int(reply[1]), int(reply[2])
    return ExtendNotLater(
        "the extension would not move the deadline later; nothing was spent",
        details={**ctx["details"], "expiresAt": format_time(deadline),
                 "requestedExpiresAt": format_time(requested)})


class NotDue(EngineError):
    """The reaper asked to expire a reservation whose deadline has not passed."""

    code = "NOT_DUE"


# ---- Payments (issue 12) ------------------------------------------------------------------
class PaymentError(EngineError):
    """Base of the payment errors (engine/payments/)."""

    code = "PAYMENT_ERROR"


class PaymentDeclined(PaymentError):
    """The card was declined (402); the reservation moved to FAILED_*_AUTH."""

    code = "PAYMENT_DECLINED"


class InvalidPaymentMethod(PaymentError):
    """The payment method is unknown or unusable (400); nothing changed."""

    code = "INVALID_PAYMENT_METHOD"


class PaymentNotRequired(PaymentError):
    """A payment call on a vendor that requires no payment (409)."""

    code = "PAYMENT_NOT_REQUIRED"


class PaymentTermsIncomplete(PaymentError):
    """The vendor requires payment but states no price, deposit or currency (409)."""

    code = "PAYMENT_TERMS_INCOMPLETE"


class PaymentProviderError(PaymentError):
    """The provider failed or could not be reached; retryable (503)."""

    code = "PAYMENT_PROVIDER_ERROR"
    retryable = True


class InvalidWebhook(PaymentError):
    """An inbound Stripe event whose signature does not verify (400)."""

    code = "INVALID_WEBHOOK_SIGNATURE"


# ---- availability engine (issue 13) ------------------------------------------------------
class SlotRefused(EngineError):
    """The vendor's availability rules refuse the slot (outside hours, busy, tentative, in
    the past, inside the minimum notice, beyond the horizon, in a buffer):
    ``details.reasons`` lists why, from engine/availability.py REASONS."""

    code = "SLOT_UNAVAILABLE"


class RulesStale(EngineError):
    """The hold script saw a newer revision of the vendor's availability rules than the
    caller checked the slot against; the caller reloads them and tries again."""

    code = "AVAILABILITY_RULES_STALE"
    retryable = True

    def __init__(self, message: str, *, revision: str, details: dict[str, Any] | None = None
                 ) -> None:
        super().__init__(message, details=details, retry_after_ms=100)
        self.revision = revision


class UnsupportedCalendarType(EngineError):
    """A calendar import whose body is not ``text/calendar``."""

    code = "UNSUPPORTED_MEDIA_TYPE"


class AvailabilityChanged(EngineError):
    """Revalidation: the reservation's slot became unavailable (a busy block or new hours
    over it); the reservation is now FAILED_AVAILABILITY_CHANGED."""

    code = "FAILED_AVAILABILITY_CHANGED"


# ---- the one table: script reply -> error ------------------------------------------------
# Each entry builds the error from the reply (``reply[0]`` is the code, the rest is what the
# script's header documents) and the caller's context: ``subject`` ("hold" or
# "reservation"), ``details`` (the ids the caller knows) and, where a reply needs it,
# ``resource_id``, ``op``, ``max_live``. Nothing else maps a code to an error.
def _conflict(reply: list, ctx: dict) -> EngineError:
    from engine.lifecycle import BOOKED_PREFIX

    holder, unit = str(reply[1]), int(reply[2])
    booked = holder.startswith(BOOKED_PREFIX)
    holder_id = holder[len(BOOKED_PREFIX):] if booked else holder
    return HoldConflict(
        "the slot is already held" if not booked else "the slot is already booked",
        holder=holder_id, unit=unit, booked=booked,
        details={"resourceId": ctx.get("resource_id"), "conflictingReservationId": holder_id,
                 "conflictingUnit": unit, "booked": booked})


def _invalid_transition(reply: list, ctx: dict) -> EngineError:
    state, op = str(reply[1]), ctx.get("op")
    details = {**ctx["details"], "state": state, "action": op}
    if state == "COMMIT_IN_PROGRESS" and op == "cancel":
        return CommitInProgress("the commit is under way and cannot be cancelled",
                                details=details)
    return InvalidTransition(f"{op} is not allowed in state {state}", details=details)


def _ended(cls: type[EngineError], message: str) -> Callable[[list, dict], EngineError]:
    def build(reply: list, ctx: dict) -> EngineError:
        return cls(message, details={**ctx["details"], "state": str(reply[1]),
                                     "version": int(reply[2])})
    return build


def _plain(cls: type[EngineError], message: str) -> Callable[[list, dict], EngineError]:
    return lambda reply, ctx: cls(message.format(subject=ctx.get("subject", "reservation")),
                                  details=dict(ctx["details"]))


def _retry_after(cls: type[EngineError], message: str, extra: Callable[[dict], dict]):
    def build(reply: list, ctx: dict) -> EngineError:
        retry_after_ms = int(reply[1])
        return cls(message.format(**ctx), details={**ctx["details"], **extra(ctx),
                                                   "retryAfterMs": retry_after_ms},
                   retry_after_ms=retry_after_ms)
    return build


def _in_progress(reply: list, ctx: dict) -> EngineError:
    pttl = int(reply[1])
    return IdempotencyInProgress("a request with this idempotency key is still in progress",
                                 details=dict(ctx["details"]),
                                 retry_after_ms=pttl if pttl > 0 else None)


ERRORS: dict[Outcome, Callable[[list, dict], EngineError]] = {
    Outcome.CONFLICT: _conflict,
    Outcome.INVALID: lambda reply, ctx: ValidationError(
        str(reply[1]) if len(reply) > 1 else "invalid request", details=dict(ctx["details"])),
    Outcome.HOLD_ID_REUSED: _plain(HoldIdReused, "{subject} id already names another {subject}"),
    Outcome.NOT_FOUND: _plain(NotFound, "{subject} not found"),
    Outcome.NOT_OWNER: _plain(NotOwner, "the fencing token does not own this {subject}"),
    Outcome.EXTENSION_LIMIT: _plain(ExtensionLimit,
                                    "the {subject} was extended the maximum number of times"),
    Outcome.MAX_DURATION: _plain(MaxHoldDuration,
                                 "the extension would exceed the maximum hold time"),
    Outcome.INVALID_TRANSITION: _invalid_transition,
    Outcome.VERSION_MISMATCH: lambda reply, ctx: VersionMismatch(
        "the reservation changed since that version",
        details={**ctx["details"], "currentVersion": int(reply[1])}),
    Outcome.HOLD_LOST: _ended(HoldLost, "the hold no longer owns its slot; the reservation "
                                        "failed"),
    Outcome.TERMINAL: lambda reply, ctx: TerminalState(
        f"the reservation is {reply[1]}, a terminal state",
        details={**ctx["details"], "state": str(reply[1])}),
    Outcome.RATE_LIMITED: _retry_after(RateLimited, "too many requests", lambda ctx: {}),
    Outcome.CAP_EXCEEDED: _retry_after(
        CapExceeded, "the partner already has {max_live} live holds",
        lambda ctx: {"maxLiveHolds": ctx.get("max_live")}),
    Outcome.IDEMPOTENCY_MISMATCH: _plain(
        IdempotencyMismatch, "this idempotency key was already used for a different request"),
    Outcome.IDEMPOTENCY_IN_PROGRESS: _in_progress,
    Outcome.EXPIRED: _ended(ReservationExpired, "the reservation's deadline passed"),
    Outcome.NOT_DUE: _plain(NotDue, "not due yet"),
    Outcome.FOREIGN_RESOURCE: lambda reply, ctx: ValidationError(
        "the resource does not belong to the reservation's vendor",
        code="RESOURCE_VENDOR_MISMATCH",
        details={**ctx["details"], "field": "resourceId", "resourceId": ctx.get("resource_id")}),
    Outcome.POOL_FULL: lambda reply, ctx: PoolFull(
        "no member of the resource group is free for the whole slot",
        details={**ctx["details"], "members": int(reply[1])}),
    Outcome.MULTI_RESOURCE: lambda reply, ctx: ModifyMultiResource(
        "a multi-resource reservation cannot be moved", details=dict(ctx["details"])),
    # Hold transfer and waitlist handoff (issue 16).
    Outcome.TRANSFER_TOKEN_INVALID: lambda reply, ctx: TransferTokenInvalid(
        "no live transfer offer of this reservation matches the token",
        details=dict(ctx["details"])),
    Outcome.TRANSFER_TOKEN_USED: _plain(TransferTokenUsed,
                                        "this acceptance token was already used"),
    Outcome.TRANSFER_WRONG_PARTNER: _plain(TransferWrongPartner,
                                           "the transfer offer is addressed to another partner"),
    Outcome.TRANSFER_TO_SELF: _plain(TransferToSelf,
                                     "the partner already holds this reservation"),
    Outcome.WAITLIST_NOT_WAITING: lambda reply, ctx: WaitlistNotWaiting(
        f"the waitlist entry is {reply[1]}, no longer waiting",
        details={**ctx["details"], "state": str(reply[1])}),
    Outcome.RULES_STALE: lambda reply, ctx: RulesStale(
        "the vendor's availability rules changed", revision=str(reply[1]),
        details=dict(ctx["details"])),
    Outcome.AVAILABILITY_CHANGED: lambda reply, ctx: AvailabilityChanged(
        f"the slot became unavailable ({reply[4]}); the reservation failed",
        details={**ctx["details"], "state": str(reply[1]), "version": int(reply[2]),
                 "reasons": [r for r in str(reply[4]).split(",") if r]}),
    Outcome.SLOT_REFUSED: lambda reply, ctx: SlotRefused(
        "the vendor's availability refuses this slot",
        details={**ctx["details"], "reasons": str(reply[1]).split(",")}),
    Outcome.EXTEND_NOT_LATER: _extend_not_later,
    Outcome.NOT_READY: lambda reply, ctx: NotReady(
        "booked markers are being restored; try again shortly",
        details=dict(ctx["details"]), retry_after_ms=1000),
}


def error_for(reply: list, *, details: dict[str, Any] | None = None,
              **context: Any) -> EngineError:
    """The engine error a script's non-OK ``reply`` means (see :data:`ERRORS`)."""
    try:
        code = Outcome(int(reply[0]))
        build = ERRORS[code]
    except (ValueError, KeyError):
        return ValidationError(f"unexpected script reply {reply[:2]!r}",
                               details=dict(details or {}))
    return build(reply, {**context, "details": details or {}})


def lua_outcomes() -> str:
    """The outcome names as a Lua table, included by the scripts (``--@include @outcomes``)."""
    lines = ["-- Generated from engine/errors.py Outcome; do not edit by hand.",
             "local OUTCOME = {"]
    lines += [f"  {o.name} = {o.value}," for o in Outcome]
    lines.append("}")
    return "\n".join(lines) + "\n"
