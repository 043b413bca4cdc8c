"""Time in tests, without sleeping to an edge.

Lua scripts read Redis ``TIME``. A test cannot know the instant a script ran at, only that
it lies between two ``TIME`` reads taken around the call (:func:`around`); assertions on a
returned deadline, a ``retry_after_ms`` or a ``PTTL`` are ranges computed from that window,
so a stalled client widens the range instead of failing the test. Waiting for something to
expire is waiting until the server's clock has passed the deadline the server returned
(:func:`until_server_ms`), never a sleep of a guessed length. Everything else waits on a
condition with a generous bound (:func:`eventually`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


async def server_us(redis) -> int:
    sec, usec = await redis.time()
    return sec * 1_000_000 + usec


async def server_ms(redis) -> int:
    return await server_us(redis) // 1000


@dataclass
class Window:
    """Server instants (ms) read before and after a call: the call ran at some t in
    [before_ms, after_ms]."""

    before_us: int = 0
    after_us: int = 0

    @property
    def before_ms(self) -> int:
        return self.before_us // 1000

    @property
    def after_ms(self) -> int:
        return self.after_us // 1000


class around:  # noqa: N801 (used as ``async with around(redis) as w``)
    """``async with around(redis) as window:`` reads the server clock before and after."""

    def __init__(self, redis) -> None:
        self.redis = redis
        self.window = Window()

    async def __aenter__(self) -> Window:
        self.window.before_us = await server_us(self.redis)
        return self.window

    async def __aexit__(self, *exc) -> None:
        self.window.after_us = await server_us(self.redis)


async def until_server_ms(redis, deadline_ms: int) -> int:
    """Wait until the server's clock reads ``deadline_ms`` or later; returns its reading.

    Redis expires a key set with ``PXAT x`` once its clock is past ``x``, so a test that
    needs a key gone waits for ``x + 1``.
    """
    while True:
        now = await server_ms(redis)
        if now >= deadline_ms:
            return now
        await asyncio.sleep(min(deadline_ms - now, 100) / 1000)


async def eventually(condition: Callable[[], Awaitable[bool]], *, timeout_s: float = 30.0,
                     what: str = "condition") -> None:
    """Poll ``condition`` until true; fail only after a generous ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s} s"
        await asyncio.sleep(0.02)
