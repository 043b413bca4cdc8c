"""The Python side's clock, in one place so tests can swap it.

Lua scripts read Redis ``TIME`` and never take the time from the caller; this module is for
the decisions Python makes on its own (cache lifetimes, a response's ``computedAt``, the
reconciliation cut-off). Modules call ``clock.now_ms()`` / ``clock.monotonic()`` instead of
the ``time`` module, as redis-py's ``lock.py`` imports ``time as mod_time`` so that its tests
can replace it: a test runs ``with clock.use(ManualClock()) as fake:`` and moves time with
``fake.advance(seconds)`` instead of sleeping to an edge.

Durations that are only measured and reported (``time.perf_counter`` around a call) stay on
the ``time`` module: nothing is decided from them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time, Unix epoch milliseconds."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes backwards (for lifetimes)."""


class SystemClock:
    """The real clocks: ``time.time`` and ``time.monotonic``."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to (tests).

    ``advance(seconds)`` moves both the wall clock and the monotonic clock; ``set_ms``
    moves the wall clock alone (which may jump, as a real one can); the monotonic clock
    never goes backwards.
    """

    def __init__(self, now_ms: int = 1_893_456_000_000, monotonic: float = 1_000.0) -> None:
        self._now_ms = int(now_ms)
        self._monotonic = float(monotonic)

    def now_ms(self) -> int:
        return self._now_ms

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock never goes backwards")
        self._monotonic += seconds
        self._now_ms += round(seconds * 1000)

    def set_ms(self, now_ms: int) -> None:
        self._now_ms = int(now_ms)


_current: Clock = SystemClock()

C = TypeVar("C", bound=Clock)


def now_ms() -> int:
    """Wall-clock milliseconds of the current clock."""
    return _current.now_ms()


def monotonic() -> float:
    """Monotonic seconds of the current clock."""
    return _current.monotonic()


def current() -> Clock:
    return _current


@contextmanager
def use(clock: C) -> Iterator[C]:
    """Make ``clock`` the process's clock for the ``with`` block (tests only)."""
    global _current
    previous, _current = _current, clock
    try:
        yield clock
    finally:
        _current = previous
