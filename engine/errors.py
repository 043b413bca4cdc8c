"""Business outcomes of the Lua scripts and the engine's typed errors.

Scripts answer business outcomes as negative integers; :class:`Outcome` is the one table
that maps them (``error()`` in Lua is for bugs only). Every engine error carries a stable
machine ``code`` that the API puts in its error envelope unchanged.
"""

from __future__ import annotations

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
