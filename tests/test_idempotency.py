"""Idempotency keys against a real Redis: first, replay, mismatch, in progress, expiry."""

from __future__ import annotations

import asyncio

import pytest

from engine.errors import IdempotencyInProgress, IdempotencyMismatch, ValidationError
from engine.idempotency import IdempotencyStore, StoredResponse, fingerprint
from tests.conftest import snapshot
from tests.timing import around, until_server_ms

CREATE = fingerprint("POST", "/v1/reservations", {"resourceId": "room-a", "start": 1})
OTHER = fingerprint("POST", "/v1/reservations", {"resourceId": "room-a", "start": 2})
BODY = '{"reservationId":"rsv_1_01J0000000000000000000000","state":"HELD","note":"caf\u00e9"}'


def make_store(access, keys, settings, **changes) -> IdempotencyStore:
    return IdempotencyStore(access, keys, settings.replace(**changes))


async def test_first_request_proceeds_then_same_request_replays(access, keys, settings, redis):
    store = make_store(access, keys, settings)
    assert await store.begin("p1", "key-1", CREATE) is None
    async with around(redis) as w:
        assert await store.complete("p1", "key-1", CREATE, 201, BODY.encode()) is True
    replay = await store.begin("p1", "key-1", CREATE)
    assert replay == StoredResponse(201, BODY)
    assert replay.body_bytes == BODY.encode()
    # Kept for idempotency_ttl_ms (24 h by default) from the instant it completed.
    expires_at = await redis.pexpiretime(keys.idempotency("p1", "key-1"))
    assert w.before_ms + 86_400_000 <= expires_at <= w.after_ms + 86_400_000
    # A second completion (a retried write) never changes what is replayed.
    assert await store.complete("p1", "key-1", CREATE, 500, "oops") is False
    assert await store.begin("p1", "key-1", CREATE) == StoredResponse(201, BODY)


async def test_same_key_different_request_is_a_mismatch(access, keys, settings, redis, prefix):
    store = make_store(access, keys, settings)
    await store.begin("p1", "key-1", CREATE)
    with pytest.raises(IdempotencyMismatch):  # while the first is running
        await store.begin("p1", "key-1", OTHER)
    await store.complete("p1", "key-1", CREATE, 201, BODY)
    before = await snapshot(redis, prefix)
    with pytest.raises(IdempotencyMismatch) as caught:  # after it completed
        await store.begin("p1", "key-1", OTHER)
    assert caught.value.code == "IDEMPOTENCY_KEY_MISMATCH"
    with pytest.raises(IdempotencyMismatch):
        await store.complete("p1", "key-1", OTHER, 201, "{}")
    assert await store.abandon("p1", "key-1", OTHER) is False
    assert await snapshot(redis, prefix) == before


async def test_same_request_while_running_is_in_progress(access, keys, settings, redis):
    store = make_store(access, keys, settings, idempotency_lock_ms=60_000)
    async with around(redis) as w:
        await store.begin("p1", "key-1", CREATE)
    locked_until = await redis.pexpiretime(keys.idempotency("p1", "key-1"))
    assert w.before_ms + 60_000 <= locked_until <= w.after_ms + 60_000
    async with around(redis) as w:
        with pytest.raises(IdempotencyInProgress) as caught:
            await store.begin("p1", "key-1", CREATE)
    assert caught.value.retryable
    # The wait is what is left of the lock at the instant the script ran.
    assert locked_until - w.after_ms <= caught.value.retry_after_ms \
        <= locked_until - w.before_ms


async def test_keys_are_per_partner(access, keys, settings):
    store = make_store(access, keys, settings)
    assert await store.begin("p1", "key-1", CREATE) is None
    assert await store.begin("p2", "key-1", OTHER) is None  # not a mismatch: other partner


async def test_concurrent_duplicates_exactly_one_proceeds(access, keys, settings):
    store = make_store(access, keys, settings)

    async def attempt():
        try:
            return await store.begin("p1", "dup", CREATE)
        except IdempotencyInProgress as busy:
            return busy

    results = await asyncio.gather(*(attempt() for _ in range(50)))
    assert results.count(None) == 1
    busy = [r for r in results if r is not None]
    assert len(busy) == 49 and all(isinstance(r, IdempotencyInProgress) for r in busy)

    # Once the winner completes, every duplicate replays its response.
    await store.complete("p1", "dup", CREATE, 201, BODY)
    replays = await asyncio.gather(*(store.begin("p1", "dup", CREATE) for _ in range(50)))
    assert replays == [StoredResponse(201, BODY)] * 50


async def test_abandon_frees_the_key_for_a_retry(access, keys, settings):
    store = make_store(access, keys, settings)
    await store.begin("p1", "key-1", CREATE)
    assert await store.abandon("p1", "key-1", CREATE) is True
    assert await store.begin("p1", "key-1", CREATE) is None
    await store.complete("p1", "key-1", CREATE, 201, BODY)
    assert await store.abandon("p1", "key-1", CREATE) is False  # completed: kept
    assert await store.begin("p1", "key-1", CREATE) == StoredResponse(201, BODY)


async def test_a_crashed_request_blocks_only_for_the_lock(access, keys, settings, redis):
    # While the lock lives (a minute here, so no check races its end) a retry is told to
    # wait for exactly what is left of it.
    store = make_store(access, keys, settings, idempotency_lock_ms=60_000)
    async with around(redis) as w:
        await store.begin("p1", "key-1", CREATE)  # ... and never completes
    locked_until = await redis.pexpiretime(keys.idempotency("p1", "key-1"))
    assert w.before_ms + 60_000 <= locked_until <= w.after_ms + 60_000
    async with around(redis) as w:
        with pytest.raises(IdempotencyInProgress) as busy:
            await store.begin("p1", "key-1", CREATE)
    assert locked_until - w.after_ms <= busy.value.retry_after_ms \
        <= locked_until - w.before_ms
    # Once the lock's expiry is past on the server's clock, the key is free again.
    store = make_store(access, keys, settings, idempotency_lock_ms=100)
    await store.begin("p1", "key-2", CREATE)  # ... and never completes
    locked_until = await redis.pexpiretime(keys.idempotency("p1", "key-2"))
    await until_server_ms(redis, locked_until + 1)
    assert await store.begin("p1", "key-2", CREATE) is None


async def test_records_expire_after_the_configured_ttl(access, keys, settings, redis):
    store = make_store(access, keys, settings, idempotency_ttl_ms=1_000)
    await store.begin("p1", "key-1", CREATE)
    async with around(redis) as w:
        await store.complete("p1", "key-1", CREATE, 201, BODY)
    expires_at = await redis.pexpiretime(keys.idempotency("p1", "key-1"))
    assert w.before_ms + 1_000 <= expires_at <= w.after_ms + 1_000
    async with around(redis) as w:
        replay = await store.begin("p1", "key-1", CREATE)
    # Replayed while it lives (Redis keeps a key until its clock is past the expiry); only
    # a client stalled past that instant may find it gone.
    if w.after_ms <= expires_at:
        assert replay == StoredResponse(201, BODY)
    else:
        assert replay in (StoredResponse(201, BODY), None)
    await until_server_ms(redis, expires_at + 1)
    assert await redis.exists(keys.idempotency("p1", "key-1")) == 0
    # The key is free again: even a different request may use it now.
    assert await store.begin("p1", "key-1", OTHER) is None


async def test_completion_after_the_lock_expired_is_still_stored(access, keys, settings,
                                                                  redis):
    store = make_store(access, keys, settings, idempotency_lock_ms=50)
    await store.begin("p1", "key-1", CREATE)
    await until_server_ms(redis, await redis.pexpiretime(keys.idempotency("p1", "key-1")) + 1)
    assert await store.complete("p1", "key-1", CREATE, 201, BODY) is True
    assert await store.begin("p1", "key-1", CREATE) == StoredResponse(201, BODY)


@pytest.mark.parametrize("bad_key", [
    "", "x" * 256, "tab\there", "new\nline", "caf\u00e9", "\x00", "\x7f",
])
async def test_bad_keys_are_rejected_before_any_write(access, keys, settings, redis, prefix,
                                                      bad_key):
    store = make_store(access, keys, settings)
    await store.begin("p1", "good", CREATE)
    before = await snapshot(redis, prefix)
    with pytest.raises(ValidationError):
        await store.begin("p1", bad_key, CREATE)
    with pytest.raises(ValidationError):
        await store.complete("p1", bad_key, CREATE, 201, BODY)
    with pytest.raises(ValidationError):
        await store.abandon("p1", bad_key, CREATE)
    assert await snapshot(redis, prefix) == before


async def test_longest_and_widest_keys_are_accepted(access, keys, settings):
    store = make_store(access, keys, settings)
    printable = "".join(chr(c) for c in range(0x20, 0x7F))
    for key in ("k" * 255, printable, "{sg:0}:u:room-a:1"):
        assert await store.begin("p1", key, CREATE) is None
        await store.complete("p1", key, CREATE, 200, "{}")
        assert await store.begin("p1", key, CREATE) == StoredResponse(200, "{}")


@pytest.mark.parametrize(("op", "partner", "fp", "status", "body"), [
    ("begin", "bad partner", CREATE, None, None),
    ("begin", "p1", "not-a-sha256", None, None),
    ("begin", "p1", CREATE.upper(), None, None),
    ("complete", "p1", CREATE, 42, "{}"),
    ("complete", "p1", CREATE, 201, b"\xff\xfe"),  # not UTF-8 text
])
async def test_bad_arguments_are_rejected_before_any_write(access, keys, settings, redis, prefix,
                                                           op, partner, fp, status, body):
    store = make_store(access, keys, settings)
    with pytest.raises(ValidationError):
        if op == "begin":
            await store.begin(partner, "key-1", fp)
        else:
            await store.complete(partner, "key-1", fp, status, body)
    assert await snapshot(redis, prefix) == {}


def test_fingerprint_is_canonical():
    a = fingerprint("post", "/v1/reservations", {"b": [1, 2], "a": {"y": 1, "x": "\u00e9"}})
    b = fingerprint("POST", "/v1/reservations", {"a": {"x": "\u00e9", "y": 1}, "b": [1, 2]})
    assert a == b and len(a) == 64
    assert a != fingerprint("POST", "/v1/reservations", {"a": {"x": "\u00e9", "y": 1},
                                                         "b": [2, 1]})
    assert a != fingerprint("POST", "/v1/other", {"a": {"x": "\u00e9", "y": 1}, "b": [1, 2]})
    assert a != fingerprint("PUT", "/v1/reservations", {"a": {"x": "\u00e9", "y": 1},
                                                         "b": [1, 2]})
    # JSON types stay distinct: 1 and "1" are different requests.
    assert fingerprint("POST", "/p", {"n": 1}) != fingerprint("POST", "/p", {"n": "1"})
