"""Rate limits, hold caps and reputation against a real Redis (the Lua is what is tested)."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

import pytest
import redis.asyncio as aioredis

from engine.access import RedisAccess
from engine.errors import CapExceeded, HoldConflict, NotFound, RateLimited, ValidationError
from engine.keys import KeySpace
from engine.limits import Limits, place_with_cap
from tests.conftest import REDIS_URL, snapshot

T0 = 1_893_456_000_000  # 2030-01-01T00:00Z, on every unit grid
M = 60_000


def make_limits(access, keys, settings, **changes) -> Limits:
    return Limits(access, keys, settings.replace(**changes))


async def server_ms(redis) -> int:
    sec, usec = await redis.time()
    return sec * 1000 + usec // 1000


async def outcome(coro):
    """'ok' or the retry_after_ms of a RateLimited / CapExceeded refusal."""
    try:
        await coro
        return "ok"
    except (RateLimited, CapExceeded) as refused:
        return refused


# ---- GCRA ------------------------------------------------------------------------------

async def test_burst_passes_at_once_then_refused_for_one_interval(access, keys, settings):
    # 600/min: one request per 100 ms once the burst of 5 is spent.
    limits = make_limits(access, keys, settings, partner_rate_per_minute=600,
                         partner_rate_burst=5)
    started = time.monotonic()
    results = await asyncio.gather(*(outcome(limits.check_partner_rate("p1"))
                                     for _ in range(6)))
    elapsed_ms = (time.monotonic() - started) * 1000
    assert results[:5] == ["ok"] * 5  # one pipelined batch: the script runs in call order
    refused = results[5]
    assert isinstance(refused, RateLimited)
    assert refused.retry_after_ms <= 100
    assert refused.retry_after_ms >= 100 - elapsed_ms - 1
    assert refused.details["retryAfterMs"] == refused.retry_after_ms

    # Still refused just before the wait is over, admitted right after it.
    await asyncio.sleep(max(0, refused.retry_after_ms - 60) / 1000)
    with pytest.raises(RateLimited) as early:
        await limits.check_partner_rate("p1")
    assert early.value.retry_after_ms <= 60
    await asyncio.sleep(early.value.retry_after_ms / 1000)
    assert await limits.check_partner_rate("p1") == 0
    with pytest.raises(RateLimited) as again:
        await limits.check_partner_rate("p1")
    # A whole interval again (less whatever the loop took between the two calls).
    assert 50 <= again.value.retry_after_ms <= 100


async def test_remaining_counts_down_and_key_lives_until_full_recovery(access, keys, settings,
                                                                        redis):
    limits = make_limits(access, keys, settings, partner_rate_per_minute=60,
                         partner_rate_burst=4)  # 1 s per request
    remaining = await asyncio.gather(*(limits.check_partner_rate("p1") for _ in range(4)))
    assert remaining == [3, 2, 1, 0]
    # Fully rested again 4 s later: the key must not outlive that, nor vanish before it.
    pttl = await redis.pttl(keys.partner_rate("p1"))
    assert 3_900 < pttl <= 4_000


async def test_sustained_rate_is_the_configured_rate(access, keys, settings, redis):
    # 6000/min = one per 10 ms after a burst of 3. The burst is also the jitter tolerance:
    # a request that polls a little late does not lose its turn, so hammering for ~0.4 s
    # lets through 3 + elapsed / 10, the elapsed time read on the server's clock (which the
    # script uses); a little slack for the first and last call's time on the wire.
    limits = make_limits(access, keys, settings, partner_rate_per_minute=6_000,
                         partner_rate_burst=3)
    await access.load_scripts()
    passed = 0
    server_started = await server_ms(redis)
    started = time.monotonic()
    while time.monotonic() - started < 0.4:
        try:
            await limits.check_partner_rate("p1")
            passed += 1
        except RateLimited as refused:
            assert 1 <= refused.retry_after_ms <= 10
    expected = 3 + (await server_ms(redis) - server_started) // 10
    # Never more than the configured rate allows (exact). Never far fewer either; but a
    # client stalled longer than the burst's 30 ms (a loaded 2-core CI machine) loses
    # turns it did not ask for, so the lower bound has room for such stalls.
    assert expected // 2 <= passed <= expected


async def test_concurrent_tasks_exactly_burst_pass(access, keys, settings):
    # 1/min: nothing refills during the test, so exactly the burst may pass.
    limits = make_limits(access, keys, settings, partner_rate_per_minute=1,
                         partner_rate_burst=37)
    results = await asyncio.gather(*(outcome(limits.check_partner_rate("p1"))
                                     for _ in range(300)))
    assert results.count("ok") == 37
    refusals = [r for r in results if r != "ok"]
    assert all(isinstance(r, RateLimited) for r in refusals)
    assert all(55_000 < r.retry_after_ms <= 60_000 for r in refusals)


def _hammer(prefix: str, partner: str, tasks: int, out) -> None:
    async def main() -> int:
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            from engine.settings import Settings
            settings = Settings(key_prefix=prefix, partner_rate_per_minute=1,
                                partner_rate_burst=50)
            limits = Limits(RedisAccess(client), KeySpace(prefix, 4), settings)
            results = await asyncio.gather(*(outcome(limits.check_partner_rate(partner))
                                             for _ in range(tasks)))
            return results.count("ok")
        finally:
            await client.aclose()

    out.put(asyncio.run(main()))


async def test_several_processes_exactly_burst_pass(prefix):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(prefix, "p1", 40, out)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        await asyncio.to_thread(proc.join, 60)
        assert proc.exitcode == 0
    passed = [out.get(timeout=5) for _ in procs]
    assert sum(passed) == 50


async def test_partner_and_ip_limiters_are_separate(access, keys, settings):
    limits = make_limits(access, keys, settings, partner_rate_per_minute=1,
                         partner_rate_burst=1, ip_rate_per_minute=1, ip_rate_burst=2)
    await limits.check_partner_rate("p1")
    with pytest.raises(RateLimited):
        await limits.check_partner_rate("p1")
    await limits.check_partner_rate("p2")  # another partner has its own limiter
    await limits.check_ip_rate("2001:db8::1")
    await limits.check_ip_rate("2001:0db8:0:0::0001")  # same address, same limiter
    with pytest.raises(RateLimited):
        await limits.check_ip_rate("2001:db8::1")
    await limits.check_ip_rate("192.0.2.7")


async def test_zero_rate_is_unlimited_and_writes_nothing(access, keys, settings, redis, prefix):
    limits = make_limits(access, keys, settings, partner_rate_per_minute=0,
                         ip_rate_per_minute=0, partner_rate_burst=1, ip_rate_burst=1)
    for _ in range(50):
        assert await limits.check_partner_rate("p1") is None
        assert await limits.check_ip_rate("192.0.2.1") is None
    assert await snapshot(redis, prefix) == {}


@pytest.mark.parametrize("bad", ["", "not-an-ip", "192.0.2.300", "{sg:0}"])
async def test_bad_ip_rejected_before_any_write(access, keys, settings, redis, prefix, bad):
    limits = make_limits(access, keys, settings)
    with pytest.raises(ValidationError):
        await limits.check_ip_rate(bad)
    assert await snapshot(redis, prefix) == {}


@pytest.mark.parametrize("bad", ["", "a}b", "x" * 65, "p 1"])
async def test_bad_partner_rejected_before_any_write(access, keys, settings, redis, prefix,
                                                     bad):
    limits = make_limits(access, keys, settings)
    with pytest.raises(ValidationError):
        await limits.check_partner_rate(bad)
    with pytest.raises(ValidationError):
        await limits.acquire_cap(bad, "h1", ttl_ms=1_000)
    assert await snapshot(redis, prefix) == {}


async def test_script_refuses_bad_arguments(access, keys):
    key = keys.partner_rate("p1")
    for args in ([0, 1, 1], [60, 0, 1], [60, 2, 3], [60, 2, 0], ["x", 1, 1]):
        reply = await access.call("rate_limit", [key], args)
        assert int(reply[0]) == -2, args


# ---- hold caps --------------------------------------------------------------------------

async def test_cap_refuses_past_max_until_the_earliest_expiry(access, keys, settings, redis):
    limits = make_limits(access, keys, settings, partner_max_live_holds=3)
    now = await server_ms(redis)
    await limits.acquire_cap("p1", "h1", now + 20_000)
    await limits.acquire_cap("p1", "h2", now + 5_000)
    assert await limits.acquire_cap("p1", "h3", ttl_ms=30_000) == 3
    with pytest.raises(CapExceeded) as refused:
        await limits.acquire_cap("p1", "h4", ttl_ms=30_000)
    # The earliest entry (h2) leaves 5 s after `now`.
    assert 4_900 <= refused.value.retry_after_ms <= 5_001
    assert refused.value.details["maxLiveHolds"] == 3
    assert await limits.live_holds("p1") == 3
    # Re-acquiring an id that holds a slot is not a new hold: never refused, counted once.
    assert await limits.acquire_cap("p1", "h1", ttl_ms=40_000) == 3
    assert (await limits.reputation("p1"))["placed"] == 3


async def test_cap_recovers_when_holds_expire(access, keys, settings, redis):
    limits = make_limits(access, keys, settings, partner_max_live_holds=2)
    await limits.acquire_cap("p1", "h1", ttl_ms=150)
    await limits.acquire_cap("p1", "h2", ttl_ms=150)
    with pytest.raises(CapExceeded) as refused:
        await limits.acquire_cap("p1", "h3", ttl_ms=150)
    assert 100 <= refused.value.retry_after_ms <= 151
    await asyncio.sleep(refused.value.retry_after_ms / 1000)
    await limits.acquire_cap("p1", "h3", ttl_ms=150)
    await limits.acquire_cap("p1", "h4", ttl_ms=150)
    assert await limits.live_holds("p1") == 2
    # Once every entry has expired the set itself is gone (nothing left for an idle partner).
    await asyncio.sleep(0.2)
    assert await limits.live_holds("p1") == 0
    assert await redis.exists(keys.partner_holds("p1")) == 0


async def test_release_frees_a_slot_once(access, keys, settings):
    limits = make_limits(access, keys, settings, partner_max_live_holds=2)
    await limits.acquire_cap("p1", "h1", ttl_ms=60_000)
    await limits.acquire_cap("p1", "h2", ttl_ms=60_000)
    with pytest.raises(CapExceeded):
        await limits.acquire_cap("p1", "h3", ttl_ms=60_000)
    assert await limits.release_cap("p1", "h1") is True
    assert await limits.release_cap("p1", "h1") is False
    await limits.acquire_cap("p1", "h3", ttl_ms=60_000)
    with pytest.raises(CapExceeded):
        await limits.acquire_cap("p1", "h4", ttl_ms=60_000)


async def test_touch_moves_expiry_and_never_re_adds(access, keys, settings, redis, prefix):
    limits = make_limits(access, keys, settings, partner_max_live_holds=5)
    await limits.acquire_cap("p1", "h1", ttl_ms=100)
    await limits.touch_cap("p1", "h1", await server_ms(redis) + 60_000)
    await asyncio.sleep(0.15)
    assert await limits.live_holds("p1") == 1
    assert await redis.pttl(keys.partner_holds("p1")) > 59_000  # set lives as long as h1
    await limits.release_cap("p1", "h1")
    before = await snapshot(redis, prefix)
    with pytest.raises(NotFound):
        await limits.touch_cap("p1", "h1", await server_ms(redis) + 60_000)
    assert await snapshot(redis, prefix) == before
    assert await limits.live_holds("p1") == 0


async def test_reputation_counts_placed_and_committed_once(access, keys, settings):
    limits = make_limits(access, keys, settings, partner_max_live_holds=10)
    assert await limits.reputation("p1") == {"placed": 0, "committed": 0, "ratio": None}
    for i in range(4):
        await limits.acquire_cap("p1", f"h{i}", ttl_ms=60_000)
    assert await limits.release_cap("p1", "h0", committed=True)
    assert not await limits.release_cap("p1", "h0", committed=True)  # retried: not twice
    await limits.release_cap("p1", "h1")  # cancelled
    assert await limits.reputation("p1") == {"placed": 4, "committed": 1, "ratio": 0.25}
    assert await limits.reputation("p2") == {"placed": 0, "committed": 0, "ratio": None}


async def test_zero_cap_never_refuses_but_still_counts(access, keys, settings):
    limits = make_limits(access, keys, settings, partner_max_live_holds=0)
    for i in range(30):
        await limits.acquire_cap("p1", f"h{i}", ttl_ms=60_000)
    assert await limits.live_holds("p1") == 30
    assert (await limits.reputation("p1"))["placed"] == 30


async def test_concurrent_acquires_never_exceed_the_cap(access, keys, settings):
    limits = make_limits(access, keys, settings, partner_max_live_holds=7)
    results = await asyncio.gather(*(outcome(limits.acquire_cap("p1", f"h{i}", ttl_ms=60_000))
                                     for i in range(100)))
    assert results.count("ok") == 7
    assert await limits.live_holds("p1") == 7


async def test_acquire_validates_before_writing(access, keys, settings, redis, prefix):
    limits = make_limits(access, keys, settings)
    for kwargs in ({}, {"expires_at_ms": 5, "ttl_ms": 5}, {"ttl_ms": 0}, {"ttl_ms": -1},
                   {"expires_at_ms": 1_000}):  # an expiry long past
        with pytest.raises(ValidationError):
            await limits.acquire_cap("p1", "h1", **kwargs)
    assert await snapshot(redis, prefix) == {}


# ---- cap + hold: two slots, compensation ------------------------------------------------

async def test_conflicting_placements_leak_no_cap_slot(access, keys, settings, holds, redis):
    limits = make_limits(access, keys, settings, partner_max_live_holds=1_000)
    results = await asyncio.gather(
        *(place_with_cap(limits, holds, "p1", "room-a", T0, T0 + 60 * M) for _ in range(100)),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1
    assert len(losers) == 99 and all(isinstance(e, HoldConflict) for e in losers)
    winner = winners[0]
    assert await limits.live_holds("p1") == 1
    entries = await redis.zrange(keys.partner_holds("p1"), 0, -1, withscores=True)
    assert entries == [(winner.hold_id, float(winner.expires_at_ms))]
    # Compensated attempts do not count as placed.
    assert (await limits.reputation("p1"))["placed"] == 1


async def test_cap_applies_across_resources_and_frees_on_release(access, keys, settings, holds):
    limits = make_limits(access, keys, settings, partner_max_live_holds=2)
    first = await place_with_cap(limits, holds, "p1", "room-a", T0, T0 + 30 * M)
    await place_with_cap(limits, holds, "p1", "suite-1", T0, T0 + 86_400_000)
    with pytest.raises(CapExceeded):
        await place_with_cap(limits, holds, "p1", "room-b", T0, T0 + 30 * M)
    # The refused attempt placed no hold.
    await holds.place("room-b", T0, T0 + 30 * M)
    await holds.release(first.hold_id, first.fence_token)
    await limits.release_cap("p1", first.hold_id)
    await place_with_cap(limits, holds, "p1", "room-a", T0 + 60 * M, T0 + 90 * M)
    assert await limits.live_holds("p1") == 2


async def test_cap_slot_expires_with_its_hold(access, keys, settings, holds):
    limits = make_limits(access, keys, settings, partner_max_live_holds=1)
    hold = await place_with_cap(limits, holds, "p1", "room-a", T0, T0 + 30 * M, ttl_ms=150)
    with pytest.raises(CapExceeded) as refused:
        await place_with_cap(limits, holds, "p1", "room-a", T0 + 60 * M, T0 + 90 * M)
    assert refused.value.retry_after_ms <= 151  # the real expiry, not the provisional one
    await asyncio.sleep(0.2)
    assert await holds.read(hold.hold_id) is None
    await place_with_cap(limits, holds, "p1", "room-a", T0, T0 + 30 * M)


class _LostConnection:
    """A HoldEngine whose place lands the hold, then loses the reply."""

    def __init__(self, holds) -> None:
        self._holds = holds
        self.keys = holds.keys
        self.settings = holds.settings

    async def place(self, *args, **kwargs):
        await self._holds.place(*args, **kwargs)
        raise ConnectionError("connection lost after the hold landed")


async def test_unknown_outcome_keeps_the_provisional_slot_until_it_expires(access, keys,
                                                                            settings, holds):
    limits = make_limits(access, keys, settings, partner_max_live_holds=1)
    with pytest.raises(ConnectionError):
        await place_with_cap(limits, _LostConnection(holds), "p1", "room-a", T0, T0 + 30 * M,
                             ttl_ms=100, provisional_margin_ms=100)
    # The hold did land: its slot must still count, or the cap would be bypassed.
    with pytest.raises(CapExceeded) as refused:
        await limits.acquire_cap("p1", "other", ttl_ms=1_000)
    assert 150 <= refused.value.retry_after_ms <= 201
    await asyncio.sleep((refused.value.retry_after_ms + 20) / 1000)
    assert await limits.live_holds("p1") == 0
    await limits.acquire_cap("p1", "other", ttl_ms=1_000)


# ---- script headers -----------------------------------------------------------------------

MY_SCRIPTS = {  # script -> the keys its caller passes, in KEYS order
    "rate_limit": lambda k: [k.partner_rate("p1")],
    "cap_acquire": lambda k: [k.partner_holds("p1"), k.partner_reputation("p1")],
    "cap_touch": lambda k: [k.partner_holds("p1")],
    "cap_release": lambda k: [k.partner_holds("p1"), k.partner_reputation("p1")],
    "partner_usage": lambda k: [k.partner_holds("p1"), k.partner_reputation("p1")],
    "idempotency_begin": lambda k: [k.idempotency("p1", "a{b}c")],
    "idempotency_complete": lambda k: [k.idempotency("p1", "a{b}c"), k.idempotency_refused("p1")],
    "idempotency_abandon": lambda k: [k.idempotency("p1", "a{b}c")],
}


@pytest.mark.parametrize("name", sorted(MY_SCRIPTS))
def test_script_headers_document_keys_and_share_one_slot(name, keys):
    from engine.scripts import scripts

    script = scripts()[name]
    passed = MY_SCRIPTS[name](keys)
    assert sorted(script.keys) == list(range(1, len(passed) + 1))
    assert "Returns:" in script.header and "Errors (negative integers):" in script.header
    assert sorted(script.argv) == list(range(1, len(script.argv) + 1))
    # Redis Cluster hashes the first {...} of a key: every key of one call shares it.
    tags = {key[key.index("{") + 1: key.index("}", key.index("{"))] for key in passed}
    assert len(tags) == 1
