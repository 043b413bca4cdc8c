"""HoldEngine against a real Redis: placement, conflicts, buffers, expiry, extend, fencing."""

from __future__ import annotations

import asyncio

import pytest

from engine.errors import (
    ExtensionLimit,
    HoldConflict,
    MaxHoldDuration,
    NotFound,
    NotOwner,
    UnknownResource,
    ValidationError,
)
from tests.conftest import snapshot
from tests.timing import around, until_server_ms

T0 = 1_893_456_000_000  # 2030-01-01T00:00Z, on every unit grid
M = 60_000


async def test_place_read_release(holds, redis, keys):
    hold = await holds.place("room-a", T0, T0 + 60 * M, owner="p1")
    assert (hold.first_unit, hold.last_unit) == (T0 // (15 * M), T0 // (15 * M) + 3)
    for i in range(hold.first_unit, hold.last_unit + 1):
        assert await redis.get(keys.unit("room-a", i)) == hold.hold_id
    read = await holds.read(hold.hold_id)
    assert read == hold
    await holds.release(hold.hold_id, hold.fence_token)
    assert await holds.read(hold.hold_id) is None
    for i in range(hold.first_unit, hold.last_unit + 1):
        assert await redis.get(keys.unit("room-a", i)) is None
    # The slot is free again.
    await holds.place("room-a", T0, T0 + 60 * M)


async def test_conflict_names_holder_and_changes_nothing(holds, redis, prefix):
    first = await holds.place("room-a", T0, T0 + 60 * M)
    before = await snapshot(redis, prefix)
    with pytest.raises(HoldConflict) as caught:
        # Overlaps only on the last unit: all-or-nothing must leave no partial keys.
        await holds.place("room-a", T0 + 45 * M, T0 + 120 * M)
    assert caught.value.holder == first.hold_id
    assert caught.value.details["conflictingReservationId"] == first.hold_id
    assert await snapshot(redis, prefix) == before


async def test_touching_intervals_do_not_collide(holds):
    await holds.place("room-a", T0, T0 + 30 * M)
    await holds.place("room-a", T0 + 30 * M, T0 + 60 * M)
    await holds.place("room-a", T0 - 30 * M, T0)


async def test_buffers_count_toward_collision(holds):
    # room-b has 15 min buffers on both sides.
    await holds.place("room-b", T0, T0 + 30 * M)
    with pytest.raises(HoldConflict):
        await holds.place("room-b", T0 + 30 * M, T0 + 60 * M)  # touches, but buffers overlap
    with pytest.raises(HoldConflict):
        await holds.place("room-b", T0 - 30 * M, T0)
    # Far enough that the buffers only touch.
    await holds.place("room-b", T0 + 60 * M, T0 + 90 * M)
    await holds.place("room-b", T0 - 60 * M, T0 - 30 * M)


async def test_nights_as_units(holds):
    day = 86_400_000
    await holds.place("suite-1", T0, T0 + 3 * day)
    with pytest.raises(HoldConflict):
        await holds.place("suite-1", T0 + 2 * day, T0 + 4 * day)
    await holds.place("suite-1", T0 + 3 * day, T0 + 4 * day)


@pytest.mark.parametrize(
    ("resource", "start", "end", "error"),
    [
        ("room-a", T0, T0, ValidationError),  # empty
        ("room-a", T0 + 60 * M, T0, ValidationError),  # end before start
        ("room-a", T0 + 1, T0 + 15 * M, ValidationError),  # misaligned start
        ("room-a", T0, T0 + 20 * M, ValidationError),  # misaligned end
        ("room-a", T0, T0 + 700 * 15 * M, ValidationError),  # more than max units
        ("no-such-room", T0, T0 + 15 * M, UnknownResource),
    ],
)
async def test_bad_input_rejected_before_any_write(holds, redis, prefix, resource, start,
                                                   end, error):
    before = await snapshot(redis, prefix)
    with pytest.raises(error):
        await holds.place(resource, start, end)
    assert await snapshot(redis, prefix) == before


async def test_expiry_frees_units(holds, redis, keys):
    async with around(redis) as w:
        hold = await holds.place("room-a", T0, T0 + 30 * M, ttl_ms=80)
    assert w.before_ms + 80 <= hold.expires_at_ms <= w.after_ms + 80
    # Every unit key (and the record) expires at the instant the call returned.
    for unit in range(hold.first_unit, hold.last_unit + 1):
        assert await redis.pexpiretime(keys.unit("room-a", unit)) == hold.expires_at_ms
    assert await redis.pexpiretime(keys.hold(hold.hold_id)) == hold.expires_at_ms
    await until_server_ms(redis, hold.expires_at_ms + 1)  # Redis expires a key once past it
    assert await holds.read(hold.hold_id) is None
    assert await redis.get(keys.unit("room-a", hold.first_unit)) is None
    await holds.place("room-a", T0, T0 + 30 * M)


async def test_extend_moves_every_unit_and_is_capped(holds, redis, keys, settings):
    engine = holds
    # Times chosen so that no verdict depends on how fast the client is: the first ttl
    # outlasts the second's start, an over-long extension is over the cap from any instant,
    # and the last allowed one fits unless 15 s pass between placing and extending.
    engine.settings = settings.replace(max_extensions=2, max_hold_total_ms=60_000)
    hold = await engine.place("room-a", T0, T0 + 30 * M, ttl_ms=30_000)
    async with around(redis) as w:
        extended = await engine.extend(hold.hold_id, hold.fence_token, ttl_ms=40_000)
    assert extended.expires_at_ms > hold.expires_at_ms
    assert w.before_ms + 40_000 <= extended.expires_at_ms <= w.after_ms + 40_000
    assert extended.extensions == 1
    for i in range(hold.first_unit, hold.last_unit + 1):
        assert await redis.pexpiretime(keys.unit("room-a", i)) == extended.expires_at_ms
    with pytest.raises(MaxHoldDuration):
        await engine.extend(hold.hold_id, hold.fence_token, ttl_ms=120_000)
    again = await engine.extend(hold.hold_id, hold.fence_token, ttl_ms=45_000)
    assert again.expires_at_ms >= extended.expires_at_ms and again.extensions == 2
    with pytest.raises(ExtensionLimit):
        await engine.extend(hold.hold_id, hold.fence_token, ttl_ms=45_000)


async def test_only_the_owner_may_release_or_extend(holds):
    hold = await holds.place("room-a", T0, T0 + 30 * M)
    with pytest.raises(NotOwner):
        await holds.release(hold.hold_id, hold.fence_token + 1)
    with pytest.raises(NotOwner):
        await holds.extend(hold.hold_id, hold.fence_token + 1)
    with pytest.raises(NotFound):
        await holds.release("hld_0_01ARZ3NDEKTSV4RRFFQ69G5FAV", 1)
    with pytest.raises(NotFound):
        await holds.release("not-an-id", 1)
    assert await holds.read(hold.hold_id) == hold


async def test_fencing_tokens_strictly_increase(holds):
    tokens = []
    for n in range(20):
        hold = await holds.place("room-a", T0 + n * 15 * M, T0 + (n + 1) * 15 * M)
        tokens.append(hold.fence_token)
        if n % 3 == 0:
            await holds.release(hold.hold_id, hold.fence_token)
    assert tokens == sorted(set(tokens))


async def test_retry_of_a_landed_hold_is_not_a_conflict(holds, keys):
    hold_id = keys.new_hold_id("room-a")
    first = await holds.place("room-a", T0, T0 + 30 * M, hold_id=hold_id)
    again = await holds.place("room-a", T0, T0 + 30 * M, hold_id=hold_id)
    assert again == first
    with pytest.raises(Exception):
        await holds.place("room-a", T0 + 30 * M, T0 + 60 * M, hold_id=hold_id)


async def test_concurrent_identical_requests_one_winner(holds):
    results = await asyncio.gather(
        *(holds.place("room-a", T0, T0 + 60 * M) for _ in range(200)), return_exceptions=True
    )
    winners = [r for r in results if not isinstance(r, Exception)]
    assert len(winners) == 1
    assert all(isinstance(r, HoldConflict) for r in results if isinstance(r, Exception))
    assert {r.holder for r in results if isinstance(r, HoldConflict)} == {winners[0].hold_id}


def test_ids_refuse_a_trailing_newline():
    """`$` in a regex admits a final newline; reservation and hold ids must not."""
    from engine.keys import KeySpace

    ks = KeySpace("", 16)
    with pytest.raises(ValueError):
        ks.shard_of_id("rsv_1_01ARZ3NDEKTSV4RRFFQ69G5FAV\n")
    assert ks.shard_of_id("rsv_1_01ARZ3NDEKTSV4RRFFQ69G5FAV") == 1
