"""Hypothesis RuleBasedStateMachine: HoldEngine on a real Redis against an in-memory model
of place / extend / release / expire. Expiry is Redis's own: the hold's keys are given a
1 ms TTL and Redis frees them."""

from __future__ import annotations

import asyncio
import time
import uuid

import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from engine.access import RedisAccess
from engine.errors import ExtensionLimit, HoldConflict, NotFound, NotOwner
from benchmarks.holds import HoldEngine
from engine.keys import KeySpace
from engine.resources import MINUTE_MS, Resource, ResourceCatalog
from engine.settings import Settings
from tests.conftest import REDIS_URL, delete_prefix

T0 = 1_893_456_000_000
UNIT = 15 * MINUTE_MS
MAX_EXT = 3


class HoldMachine(RuleBasedStateMachine):
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.prefix = f"hm{uuid.uuid4().hex[:10]}:"
        self.redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        self.keys = KeySpace(self.prefix, 4)
        catalog = ResourceCatalog([
            Resource("a", unit_ms=UNIT),
            Resource("b", unit_ms=UNIT, buffer_before_ms=UNIT, buffer_after_ms=UNIT),
        ])
        cfg = Settings.from_env({}, key_prefix=self.prefix, shards=4, hold_ttl_ms=600_000,
                                max_extensions=MAX_EXT, max_hold_total_ms=10**9)
        self.engine = HoldEngine(RedisAccess(self.redis), self.keys, catalog, cfg)
        self.catalog = catalog
        # Model: live holds and which hold owns each (resource, unit).
        self.live: dict[str, dict] = {}
        self.owner: dict[tuple[str, int], str] = {}

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(delete_prefix(self.redis, self.prefix))
        self.run(self.redis.aclose())
        self.loop.close()

    def _free(self, hold_id: str) -> None:
        hold = self.live.pop(hold_id)
        for u in range(hold["first"], hold["last"] + 1):
            del self.owner[(hold["resource"], u)]

    @rule(target=holds, resource=st.sampled_from(["a", "b"]), start=st.integers(0, 12),
          length=st.integers(1, 4))
    def place(self, resource, start, length):
        res = self.catalog.get(resource)
        first, last = res.units(T0 + start * UNIT, T0 + (start + length) * UNIT, 100)
        taken = {self.owner.get((resource, u)) for u in range(first, last + 1)} - {None}
        try:
            hold = self.run(self.engine.place(resource, T0 + start * UNIT,
                                              T0 + (start + length) * UNIT))
        except HoldConflict as exc:
            assert taken, "engine refused a free interval"
            assert exc.holder in taken
            return "none"
        assert not taken, f"double booking: {taken} already held"
        self.live[hold.hold_id] = {"resource": resource, "first": first, "last": last,
                                   "token": hold.fence_token, "ext": 0}
        for u in range(first, last + 1):
            self.owner[(resource, u)] = hold.hold_id
        return hold.hold_id

    @rule(hold_id=holds, right_token=st.booleans())
    def release(self, hold_id, right_token):
        if hold_id == "none":
            return
        hold = self.live.get(hold_id)
        token = (hold["token"] if hold else 1) + (0 if right_token else 1000)
        try:
            self.run(self.engine.release(hold_id, token))
        except NotFound:
            assert hold is None
            return
        except NotOwner:
            assert hold is not None and not right_token
            return
        assert hold is not None and right_token
        self._free(hold_id)

    @rule(hold_id=holds)
    def extend(self, hold_id):
        if hold_id == "none":
            return
        hold = self.live.get(hold_id)
        try:
            self.run(self.engine.extend(hold_id, hold["token"] if hold else 1, 700_000))
        except NotFound:
            assert hold is None
            return
        except ExtensionLimit:
            assert hold is not None and hold["ext"] >= MAX_EXT
            return
        assert hold is not None and hold["ext"] < MAX_EXT
        hold["ext"] += 1

    @rule(hold_id=holds)
    def expire(self, hold_id):
        """Let Redis expire the hold: every key it owns gets a 1 ms TTL."""
        hold = self.live.get(hold_id)
        if hold is None:
            return
        keys = [self.keys.hold(hold_id)] + [self.keys.unit(hold["resource"], u)
                                            for u in range(hold["first"], hold["last"] + 1)]
        for key in keys:
            self.run(self.redis.pexpire(key, 1))
        time.sleep(0.005)
        self._free(hold_id)

    @invariant()
    def redis_agrees_with_model(self):
        actual = {}
        for key in self.run(self._unit_keys()):
            value = self.run(self.redis.get(key))
            if value is not None:
                actual[key] = value
        expected = {self.keys.unit(r, u): h for (r, u), h in self.owner.items()}
        assert actual == expected

    async def _unit_keys(self):
        return [k async for k in self.redis.scan_iter(match=f"{self.prefix}*:u:*", count=1000)]


TestHoldMachine = HoldMachine.TestCase
TestHoldMachine.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
