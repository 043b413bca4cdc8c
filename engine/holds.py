"""Hold primitives the reservation engine shares: the booked-marker prefix (its home is
engine/lifecycle.py), a CONFLICT reply as its error, and script calls retried on transient
connection errors (idempotent scripts only).

The plain capacity-1 ``HoldEngine`` that used to live here serves only tests and the
benchmarks (its throughput is the baseline the API is measured against): it lives in
``benchmarks/holds.py``. Production holds are reservations (engine/reservations.py).
"""

from __future__ import annotations

import asyncio

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.access import RedisAccess
from engine.errors import HoldConflict, error_for
from engine.lifecycle import BOOKED_PREFIX

__all__ = ["BOOKED_PREFIX", "call_with_retry", "conflict_from_reply"]
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, asyncio.TimeoutError)


def conflict_from_reply(reply: list, resource_id: str) -> HoldConflict:
    """A CONFLICT reply as its error (the one table in engine/errors.py decides)."""
    error = error_for(reply, resource_id=resource_id)
    assert isinstance(error, HoldConflict), reply
    return error


async def call_with_retry(access: RedisAccess, name: str, keys, args, attempts: int = 3):
    """Call a script, retrying transient connection errors.

    Only idempotent scripts go through here: a retried call that already landed answers
    as the first one would have (scripts recognise their own hold token).
    """
    for attempt in range(attempts):
        try:
            return await access.call(name, keys, args)
        except _TRANSIENT:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.01 * 2**attempt)
    raise AssertionError("unreachable")
