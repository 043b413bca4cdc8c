"""Rate limits, hold caps and reputation against a real Redis (the Lua is what is tested)."""

from __future__ import annotations

import asyncio
import multiprocessing

import pytest
import redis.asyncio as aioredis

from engine.access import RedisAccess
from engine.errors import CapExceeded, HoldConflict, NotFound, RateLimited, ValidationError
from engine.keys import KeySpace
from engine.limits import Limits, place_with_cap
from tests.conftest import REDIS_URL, snapshot
from tests.timing import around, server_ms, server_us, until_server_ms

T0 = 1_893_456_000_000  # 2030-01-01T00:00Z, on every unit grid
M = 60_000


def make_limits(access, keys, settings, **changes) -> Limits:
    return Limits(access, keys, settings.replace(**changes))


async def outcome(coro):
    """'ok' or the retry_after_ms of a RateLimited / CapExceeded refusal."""
    try:
        await coro
        return "ok"
    except (RateLimited, CapExceeded) as refused:
        return refused


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# A check that needs the client to act before a deadline runs in rounds on fresh keys: a
# round is abandoned only when the server's clock shows the client stalled past that
# deadline (so the other answer would have been right), never because a check failed.
ROUNDS = 5
STALLED = "the client stalled past the deadline in every round"


# ---- GCRA ------------------------------------------------------------------------------

class Gcra:
    """GCRA itself, holding each reply of one limiter to the instant the script ran at.

    The script reads Redis TIME; the test only knows that instant lies in the window of two
    TIME reads around the call, and reads the limiter's theoretical arrival time (the key,
    integer microseconds) before and after. Every reply must be what GCRA gives for some
    instant of the window, and where the whole window lies on one side of the edge the
    verdict is forced: a slow client widens a range, it never fails the check.
    """

    def __init__(self, redis, limits: Limits, partner: str, rate_per_minute: int,
                 burst: int) -> None:
        self.redis, self.limits, self.partner = redis, limits, partner
        self.key = limits.keys.partner_rate(partner)
        self.interval = (2 * 60_000_000 + rate_per_minute) // (2 * rate_per_minute)  # us
        self.burst_offset = self.interval * burst
        self.admitted = self.refused = 0
        self.forced = {"admitted": 0, "refused": 0}  # verdicts the window alone decided

    async def tat(self) -> int | None:
        value = await self.redis.get(self.key)
        return None if value is None else int(value)

    async def call(self, cost: int = 1):
        tat0 = await self.tat()
        async with around(self.redis) as w:
            try:
                result = await self.limits.check_partner_rate(self.partner, cost)
            except RateLimited as refused:
                result = refused
        tat1 = await self.tat()
        b, a = w.before_us, w.after_us
        step = self.interval * cost
        # Admitted at `now` iff now >= max(tat0, now) + step - burst_offset.
        allow_at = None if tat0 is None else tat0 + step - self.burst_offset
        if isinstance(result, RateLimited):
            self.refused += 1
            assert allow_at is not None and allow_at > b, "refused a request it had to admit"
            if a < allow_at:
                self.forced["refused"] += 1
            latest = min(a, allow_at - 1)  # it ran before allow_at
            assert ceil_div(allow_at - latest, 1000) <= result.retry_after_ms \
                <= ceil_div(allow_at - b, 1000), (result.retry_after_ms, allow_at, b, a)
            assert result.details["retryAfterMs"] == result.retry_after_ms
            assert tat1 in (tat0, None)  # a refusal writes nothing (the key may expire)
            return result
        self.admitted += 1
        assert allow_at is None or allow_at <= a, "admitted a request it had to refuse"
        if allow_at is None or allow_at <= b:
            self.forced["admitted"] += 1
        # remaining = floor((burst_offset - step - max(tat0 - now, 0)) / interval)
        lag_hi = 0 if tat0 is None else max(tat0 - b, 0)
        lag_lo = 0 if tat0 is None else max(tat0 - a, 0)
        assert (self.burst_offset - step - lag_hi) // self.interval <= result \
            <= (self.burst_offset - step - lag_lo) // self.interval, (result, tat0, b, a)
        if tat1 is not None:  # (a stalled test may find it already expired: fully rested)
            base = tat1 - step  # = max(tat0, now)
            assert max(tat0 or b, b) <= base <= max(tat0 or a, a), (tat0, tat1, b, a)
        return result


async def test_burst_passes_at_once_then_refused_for_one_interval(access, keys, settings,
                                                                  redis):
    # 60/min: one request per second once the burst of 5 is spent. Each round runs on a
    # fresh limiter; a round is repeated only if the machine stalled so long (a whole
    # second) that the server's clock alone could not force each verdict, never because
    # a check failed.
    limits = make_limits(access, keys, settings, partner_rate_per_minute=60,
                         partner_rate_burst=5)
    for round_ in range(5):
        partner = f"p{round_}"
        async with around(redis) as w:
            results = await asyncio.gather(*(outcome(limits.check_partner_rate(partner))
                                             for _ in range(6)))
        assert results[:5] == ["ok"] * 5  # a rested limiter passes its burst, always
        sixth = results[5]
        # The sixth may only pass if a whole interval (1 s) went by within the batch.
        assert isinstance(sixth, RateLimited) or w.after_us - w.before_us >= 1_000_000
        if isinstance(sixth, RateLimited):
            # It waits for the first request's interval to end: one interval at most, and
            # shorter only by as much as the server's clock moved during the batch.
            assert ceil_div(1_000_000 - (w.after_us - w.before_us), 1000) \
                <= sixth.retry_after_ms <= 1_000
            assert sixth.details["retryAfterMs"] == sixth.retry_after_ms

        # From here every reply is held to GCRA for the instant it ran at.
        gcra = Gcra(redis, limits, partner, 60, 5)
        tat = await gcra.tat()
        early = await gcra.call()  # still inside the interval: refused
        edge_ms = ceil_div(tat - 4 * gcra.interval, 1000)  # when one request may pass again
        await until_server_ms(redis, edge_ms + 1)
        assert await gcra.call() == 0  # right after the interval: admitted, no room left
        again = await gcra.call()  # and the next one waits a whole interval again
        if isinstance(sixth, RateLimited) and gcra.forced == {"admitted": 1, "refused": 2}:
            break
    else:
        pytest.fail("no round in which the server's clock forced every verdict")
    assert isinstance(early, RateLimited) and isinstance(again, RateLimited)
    assert again.retry_after_ms <= 1_000


async def test_remaining_counts_down_and_key_lives_until_full_recovery(access, keys, settings,
                                                                        redis):
    limits = make_limits(access, keys, settings, partner_rate_per_minute=60,
                         partner_rate_burst=4)  # 1 s per request
    async with around(redis) as w:
        remaining = await asyncio.gather(*(limits.check_partner_rate("p1")
                                           for _ in range(4)))
    assert remaining[0] == 3
    # Exactly [3, 2, 1, 0] unless a whole interval passed within the batch.
    assert remaining == [3, 2, 1, 0] or w.after_us - w.before_us >= 1_000_000
    # Fully rested again 4 s after the first request: the key must not outlive that, nor
    # vanish before it. Its expiry (absolute, server clock) is the TAT rounded up to a ms.
    tat_us = int(await redis.get(keys.partner_rate("p1")))
    assert w.before_us + 4_000_000 <= tat_us <= w.after_us + 4_000_000
    expires_at = await redis.pexpiretime(keys.partner_rate("p1"))
    assert ceil_div(tat_us, 1000) - 2 <= expires_at <= ceil_div(tat_us, 1000) + 1


async def test_sustained_rate_is_the_configured_rate(access, keys, settings, redis):
    # 600/min = one per 100 ms after a burst of 3. The client calls as fast as it can for
    # at least a second of the server's clock (the one the script uses); each reply is held
    # to GCRA for its instant, and the total to the configured rate.
    limits = make_limits(access, keys, settings, partner_rate_per_minute=600,
                         partner_rate_burst=3)
    await access.load_scripts()
    gcra = Gcra(redis, limits, "p1", 600, 3)
    started = await server_us(redis)
    while (await server_us(redis) - started < 1_000_000
           or gcra.admitted <= 3 or gcra.refused == 0):
        assert await server_us(redis) - started < 30_000_000, "never hit the limit"
        await gcra.call()
    ended = await server_us(redis)
    # Never more than the configured rate allows, exactly: the burst, plus one request per
    # whole interval of server time. Never fewer: every refusal was checked to be due.
    assert gcra.admitted <= 3 + (ended - started) // gcra.interval


async def test_concurrent_tasks_exactly_burst_pass(access, keys, settings, redis):
    # 1/min: nothing refills during the test, so exactly the burst may pass.
    limits = make_limits(access, keys, settings, partner_rate_per_minute=1,
                         partner_rate_burst=37)
    async with around(redis) as w:
        results = await asyncio.gather(*(outcome(limits.check_partner_rate("p1"))
                                         for _ in range(300)))
    assert results.count("ok") == 37
    refusals = [r for r in results if r != "ok"]
    assert all(isinstance(r, RateLimited) for r in refusals)
    # Each waits for the first request's minute to end, less what the server's clock moved
    # during the calls.
    shortest = ceil_div(60_000_000 - (w.after_us - w.before_us), 1000)
    assert all(shortest <= r.retry_after_ms <= 60_000 for r in refusals)


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
        await asyncio.to_thread(proc.join, 300)  # generous: spawn + imports, loaded machine
        assert proc.exitcode == 0
    passed = [out.get(timeout=60) for _ in procs]
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
    async with around(redis) as w:
        with pytest.raises(CapExceeded) as refused:
            await limits.acquire_cap("p1", "h4", ttl_ms=30_000)
    # The earliest entry (h2) leaves at now + 5 s: the wait runs until just past it, from
    # the instant the script ran.
    assert now + 5_001 - w.after_ms <= refused.value.retry_after_ms <= now + 5_001 - w.before_ms
    assert refused.value.details["maxLiveHolds"] == 3
    assert await limits.live_holds("p1") == 3
    # Re-acquiring an id that holds a slot is not a new hold: never refused, counted once.
    assert await limits.acquire_cap("p1", "h1", ttl_ms=40_000) == 3
    assert (await limits.reputation("p1"))["placed"] == 3


async def test_cap_recovers_when_holds_expire(access, keys, settings, redis):
    limits = make_limits(access, keys, settings, partner_max_live_holds=2)
    for round_ in range(ROUNDS):
        partner = f"p{round_}"
        holds_key = keys.partner_holds(partner)
        async with around(redis) as taken:
            await limits.acquire_cap(partner, "h1", ttl_ms=1_000)
            await limits.acquire_cap(partner, "h2", ttl_ms=1_000)
        h1 = int(await redis.zscore(holds_key, "h1"))
        assert taken.before_ms + 1_000 <= h1 <= taken.after_ms + 1_000  # expiry = now + ttl
        async with around(redis) as w:
            third = await outcome(limits.acquire_cap(partner, "h3", ttl_ms=1_000))
        if w.after_ms > h1:
            continue  # stalled past h1's expiry: a free slot would be right; another round
        assert isinstance(third, CapExceeded)
        # A slot frees just after h1's expiry (h1 was taken first: the earliest).
        assert h1 + 1 - w.after_ms <= third.retry_after_ms <= h1 + 1 - w.before_ms
        break
    else:
        pytest.fail(STALLED)
    # Both are pruned once the server's clock is past their expiry.
    await until_server_ms(redis, int(await redis.zscore(holds_key, "h2")) + 1)
    assert await limits.acquire_cap(partner, "h3", ttl_ms=1_000) == 1  # live after the call
    assert await limits.acquire_cap(partner, "h4", ttl_ms=1_000) == 2
    # Once every entry has expired the set itself is gone (nothing left for an idle partner):
    # it lives until just after its last entry.
    last = int(await redis.zscore(holds_key, "h4"))
    assert await redis.pexpiretime(holds_key) == last + 1
    await until_server_ms(redis, last + 2)
    assert await limits.live_holds(partner) == 0
    assert await redis.exists(holds_key) == 0


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
    holds_key = keys.partner_holds("p1")
    for round_ in range(ROUNDS):
        await limits.acquire_cap("p1", "h1", ttl_ms=1_000)
        await limits.acquire_cap("p1", "h2", ttl_ms=1_000)
        first_expiry = int(await redis.zscore(holds_key, "h1"))
        moved_to = await server_ms(redis) + 60_000
        try:
            await limits.touch_cap("p1", "h1", moved_to)
            break
        except NotFound:  # only right if the client stalled past h1's expiry
            assert await server_ms(redis) > first_expiry
    else:
        pytest.fail(STALLED)
    assert await redis.zscore(holds_key, "h1") == moved_to
    assert await redis.pexpiretime(holds_key) == moved_to + 1  # set lives as long as h1
    # Past h1's first expiry (and h2's): h1 still counts, h2 is gone and cannot come back.
    await until_server_ms(redis, max(first_expiry, int(await redis.zscore(holds_key, "h2")))
                          + 1)
    assert await limits.live_holds("p1") == 1
    with pytest.raises(NotFound):
        await limits.touch_cap("p1", "h2", moved_to)
    assert await limits.live_holds("p1") == 1
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


async def test_cap_slot_expires_with_its_hold(access, keys, settings, holds, redis):
    limits = make_limits(access, keys, settings, partner_max_live_holds=1)
    for round_ in range(ROUNDS):
        partner, at = f"p{round_}", T0 + round_ * 240 * M
        hold = await place_with_cap(limits, holds, partner, "room-a", at, at + 30 * M,
                                    ttl_ms=1_000)
        # The slot carries the hold's real expiry, not the provisional one.
        assert await redis.zscore(keys.partner_holds(partner), hold.hold_id) == \
            hold.expires_at_ms
        async with around(redis) as w:
            second = await outcome(place_with_cap(limits, holds, partner, "room-a",
                                                  at + 60 * M, at + 90 * M))
        if w.after_ms > hold.expires_at_ms:
            continue  # stalled past the hold's expiry: a free slot would be right
        assert isinstance(second, CapExceeded)
        assert hold.expires_at_ms + 1 - w.after_ms <= second.retry_after_ms \
            <= hold.expires_at_ms + 1 - w.before_ms
        break
    else:
        pytest.fail(STALLED)
    await until_server_ms(redis, hold.expires_at_ms + 1)
    assert await holds.read(hold.hold_id) is None
    await place_with_cap(limits, holds, partner, "room-a", at, at + 30 * M)


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
                                                                            settings, holds,
                                                                            redis):
    limits = make_limits(access, keys, settings, partner_max_live_holds=1)
    for round_ in range(ROUNDS):
        partner, at = f"p{round_}", T0 + round_ * 240 * M
        async with around(redis) as placed:
            with pytest.raises(ConnectionError):
                await place_with_cap(limits, _LostConnection(holds), partner, "room-a", at,
                                     at + 30 * M, ttl_ms=1_000, provisional_margin_ms=500)
        # The hold did land: its slot must still count, or the cap would be bypassed. The
        # slot is still the provisional one: ttl + margin from the instant it was taken.
        [(hold_id, score)] = await redis.zrange(keys.partner_holds(partner), 0, -1,
                                                withscores=True)
        assert placed.before_ms + 1_500 <= score <= placed.after_ms + 1_500
        async with around(redis) as w:
            other = await outcome(limits.acquire_cap(partner, "other", ttl_ms=1_000))
        if w.after_ms > score:
            continue  # stalled past the provisional expiry: a free slot would be right
        assert isinstance(other, CapExceeded)
        assert score + 1 - w.after_ms <= other.retry_after_ms <= score + 1 - w.before_ms
        break
    else:
        pytest.fail(STALLED)
    await until_server_ms(redis, int(score) + 1)
    assert await limits.live_holds(partner) == 0
    await limits.acquire_cap(partner, "other", ttl_ms=1_000)


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
