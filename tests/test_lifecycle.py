"""The reservation lifecycle in Lua against a real Redis: every allowed transition, a sweep
of refused ones, CAS, staged TTLs, revalidation, racing reapers, expiry vs extension."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from engine.errors import (
    CommitInProgress,
    HoldConflict,
    HoldLost,
    InvalidTransition,
    NotReady,
    PaymentRequired,
    ReservationExpired,
    TerminalState,
    ValidationError,
    VersionMismatch,
)
from engine.lifecycle import ACTIONS, AUTO, EDGES, PRE_COMMIT, State
from engine.store.events import expand_entry
from engine.reservations import ReservationEngine
from engine.resources import MINUTE_MS, Resource, ResourceCatalog, Vendor
from tests.conftest import snapshot
from tests.timing import around, until_server_ms

T0 = 1_893_456_000_000
M = MINUTE_MS
S = State


@pytest.fixture
def lifecycle_catalog() -> ResourceCatalog:
    catalog = ResourceCatalog()
    for vendor_id, confirm, pay in [("v-confirm", True, False), ("v-instant", False, False),
                                    ("v-paid", True, True)]:
        catalog.add(Resource(f"{vendor_id}-r", unit_ms=15 * M, vendor_id=vendor_id,
                             buffer_after_ms=15 * M))
        catalog.add_vendor(Vendor(vendor_id, f"{vendor_id}-r", confirm, pay))
    return catalog


@pytest.fixture
async def rsv(access, keys, lifecycle_catalog, settings) -> ReservationEngine:
    tuned = settings.replace(hold_ttl_ms=10_000, confirmed_ttl_ms=30_000,
                             authorized_ttl_ms=15_000)
    engine = ReservationEngine(access, keys, lifecycle_catalog, tuned)
    await engine.mark_ready()
    return engine


async def create(rsv: ReservationEngine, vendor="v-confirm", slot=0, **kw):
    return await rsv.create(partner_id="p1", vendor_id=vendor, resource_id=None,
                            start_ms=T0 + slot * 60 * M, end_ms=T0 + slot * 60 * M + 30 * M,
                            requester_id="req-1", **kw)


async def create_paid(rsv: ReservationEngine, slot=0):
    """A payment-required reservation: every authorization step rests until called.

    The engine refuses these until a payment provider exists; the lifecycle must still
    hold for the states that only payment makes rest, so these tests enable payments on
    their own engine instance.
    """
    rsv.payments_enabled = True
    return await create(rsv, vendor="v-paid", slot=slot)


async def stream_entries(redis, keys, shard):
    return [fields for _, fields in await redis.xrange(keys.events(shard))]


async def stream_events(redis, keys, shard):
    """Every transition the shard's stream records: one entry per script call, its path
    expanded as the worker expands it."""
    return [t for e in await stream_entries(redis, keys, shard) for t in expand_entry(e)]


async def test_confirmation_path_to_commit(rsv, redis, keys):
    moved = await create(rsv, metadata={"note": "window seat"})
    assert moved.state == S.AWAITING_VENDOR_CONFIRMATION and moved.version == 2
    r = await rsv.get(moved.reservation_id)
    assert [h["toState"] for h in r.history] == [S.HELD, S.AWAITING_VENDOR_CONFIRMATION]
    assert r.history[0]["metadata"] == {"note": "window seat"}
    assert (r.block_start_ms, r.block_end_ms) == (T0, T0 + 45 * M)  # 15 min buffer after

    moved = await rsv.act(moved.reservation_id, "vendor-confirmation", actor="vendor")
    # Payment is waived: the steps are passed through and recorded.
    assert moved.state == S.AUTHORIZED_BOTH and moved.version == 7
    moved = await rsv.act(moved.reservation_id, "commit", actor="partner")
    assert moved.state == S.COMMIT_IN_PROGRESS
    unit = keys.unit(r.resource_id, T0 // (15 * M))
    assert await redis.pttl(unit) == -1  # pinned until the worker ends the commit
    moved = await rsv.act(moved.reservation_id, "finalize-commit", actor="system",
                          booking_id="bkg_1")
    assert moved.state == S.COMMITTED
    assert await redis.get(unit) == f"B|{moved.reservation_id}"
    r = await rsv.get(moved.reservation_id)
    assert r.booking_id == "bkg_1"
    # One commit-queue entry per script call: create, confirm (payment steps waived), commit,
    # finalize.
    assert len(await stream_entries(redis, keys, keys.shard_of_id(moved.reservation_id))) == 4
    events = await stream_events(redis, keys, keys.shard_of_id(moved.reservation_id))
    assert [(e["fromState"], e["toState"]) for e in events] == [
        (a.value, b.value) for a, b in zip(
            [S.INTENT_CREATED, S.HELD, S.AWAITING_VENDOR_CONFIRMATION, S.CONFIRMED_BY_VENDOR,
             S.AWAITING_VENDOR_AUTH, S.VENDOR_AUTHORIZED, S.AWAITING_REQUESTER_AUTH,
             S.AUTHORIZED_BOTH, S.COMMIT_IN_PROGRESS],
            [S.HELD, S.AWAITING_VENDOR_CONFIRMATION, S.CONFIRMED_BY_VENDOR,
             S.AWAITING_VENDOR_AUTH, S.VENDOR_AUTHORIZED, S.AWAITING_REQUESTER_AUTH,
             S.AUTHORIZED_BOTH, S.COMMIT_IN_PROGRESS, S.COMMITTED])]
    assert [int(e["version"]) for e in events] == list(range(1, 10))
    assert len({e["eventId"] for e in events}) == 9
    # The slot, buffer included, stays booked.
    with pytest.raises(HoldConflict) as caught:
        await create(rsv, slot=0)
    assert caught.value.booked


async def test_instant_free_vendor_commits_at_once(rsv, redis):
    async with around(redis) as w:
        moved = await create(rsv, vendor="v-instant")
    assert moved.state == S.AUTHORIZED_BOTH and moved.version == 7
    r = await rsv.get(moved.reservation_id)
    # It stops in AUTHORIZED_BOTH, so it takes that stage's deadline (15 s here), counted
    # from the one instant the script read.
    assert w.before_ms <= r.created_at_ms <= w.after_ms
    assert r.deadline_ms - r.created_at_ms == 15_000 and moved.deadline_ms == r.deadline_ms
    assert (await rsv.act(moved.reservation_id, "commit", actor="partner")).state == \
        S.COMMIT_IN_PROGRESS


async def test_staged_ttls_on_every_unit_key(rsv, redis, keys):
    moved = await create_paid(rsv)
    r = await rsv.get(moved.reservation_id)
    units = [keys.unit(r.resource_id, i) for i in range(T0 // (15 * M), T0 // (15 * M) + 3)]

    async def expiries():
        return {await redis.pexpiretime(u) for u in units}

    # Every unit key expires at the deadline the call returned (one instant for all), and
    # that deadline is the stage's ttl from the instant the script ran.
    assert r.deadline_ms - r.created_at_ms == 10_000
    assert moved.deadline_ms == r.deadline_ms
    assert await expiries() == {r.deadline_ms}
    async with around(redis) as w:
        confirmed = await rsv.act(moved.reservation_id, "vendor-confirmation", actor="vendor")
    assert await expiries() == {confirmed.deadline_ms}  # +30 min stage (30 s here)
    assert w.before_ms + 30_000 <= confirmed.deadline_ms <= w.after_ms + 30_000
    authorized = await rsv.act(moved.reservation_id, "vendor-authorization", actor="vendor")
    assert authorized.deadline_ms == confirmed.deadline_ms  # keeps the confirmed stage
    assert await expiries() == {confirmed.deadline_ms}
    async with around(redis) as w:
        both = await rsv.act(moved.reservation_id, "requester-authorization",
                             actor="requester")
    assert await expiries() == {both.deadline_ms}  # +15 min stage (15 s here)
    assert w.before_ms + 15_000 <= both.deadline_ms <= w.after_ms + 15_000
    # The record outlives the hold.
    assert await redis.pexpiretime(keys.reservation(moved.reservation_id)) > both.deadline_ms


def resting_states() -> set[State]:
    return set(PRE_COMMIT) - {s for s, step in AUTO.items() if step.when == "always"} | {
        S.COMMIT_IN_PROGRESS}


async def reach(rsv, state: State, slot: int) -> str:
    """A reservation resting in ``state`` (payment-required path, every step manual)."""
    moved = await create_paid(rsv, slot=slot)
    steps = {
        S.AWAITING_VENDOR_CONFIRMATION: [],
        S.AWAITING_VENDOR_AUTH: ["vendor-confirmation"],
        S.AWAITING_REQUESTER_AUTH: ["vendor-confirmation", "vendor-authorization"],
        S.AUTHORIZED_BOTH: ["vendor-confirmation", "vendor-authorization",
                            "requester-authorization"],
        S.COMMIT_IN_PROGRESS: ["vendor-confirmation", "vendor-authorization",
                               "requester-authorization", "commit"],
    }[state]
    for action in steps:
        moved = await rsv.act(moved.reservation_id, action, actor="system")
    assert moved.state == state
    return moved.reservation_id


async def test_every_allowed_transition_and_sweep_of_refused(rsv, redis, keys, prefix):
    # "Refused: nothing changed" compares every key under the prefix, so nothing may expire
    # by itself while the sweep runs, however long a loaded machine makes it: stage ttls of
    # an hour (a 10 s ttl expired mid-sweep under load and failed the comparison).
    hour = 3_600_000
    rsv.settings = rsv.settings.replace(hold_ttl_ms=hour, confirmed_ttl_ms=hour,
                                        authorized_ttl_ms=hour)
    seen: set[tuple[str, str]] = set()
    slot = 0
    for state in sorted(resting_states()):
        for action_name, action in ACTIONS.items():
            slot += 1
            rid = await reach(rsv, state, slot)
            allowed = (action.source == state) or (
                action.source is None and (state in PRE_COMMIT or (
                    state == S.COMMIT_IN_PROGRESS and action_name != "cancel")))
            before = await snapshot(redis, prefix)
            try:
                await rsv.act(rid, action_name, actor="system", booking_id="bkg_x")
            except (InvalidTransition, CommitInProgress):
                assert not allowed, (state, action_name)
                assert await snapshot(redis, prefix) == before  # refused: nothing changed
            else:
                assert allowed, (state, action_name)
        # Expiry from every resting pre-commit state.
        if state in PRE_COMMIT:
            slot += 1
            rid = await reach(rsv, state, slot)
            await redis.hset(keys.reservation(rid), "dl", 1)  # overdue now
            moved = await rsv.expire(rid)
            assert moved.state == (S.FAILED_VENDOR_TIMEOUT
                                   if state == S.AWAITING_VENDOR_CONFIRMATION else S.EXPIRED)
    for shard in range(keys.shards):
        for e in await stream_events(redis, keys, shard):
            seen.add((e["fromState"], e["toState"]))
    expected = {(a.value, b.value) for a, b in EDGES
                if a in resting_states() or a in AUTO}
    # Edges out of states that never rest (notification steps) cannot be reached.
    expected = {(a, b) for a, b in expected if State(a) in resting_states()
                or (State(a), State(b)) in {(s, st.to) for s, st in AUTO.items()}}
    assert expected - seen == set()
    assert {(a, b) for a, b in seen if a != b} <= {(a.value, b.value) for a, b in EDGES}


async def test_terminal_states_are_final(rsv):
    moved = await create(rsv)
    await rsv.act(moved.reservation_id, "cancel", actor="partner")
    for action in ACTIONS:
        with pytest.raises(TerminalState):
            await rsv.act(moved.reservation_id, action, actor="system")
    with pytest.raises(TerminalState):
        await rsv.extend(moved.reservation_id, actor="partner")
    assert (await rsv.get(moved.reservation_id)).state == S.CANCELLED


async def test_cancel_frees_units_at_once(rsv, redis, keys):
    moved = await create(rsv)
    await rsv.act(moved.reservation_id, "cancel", actor="partner", reason="changed plans")
    r = await rsv.get(moved.reservation_id)
    assert r.state == S.CANCELLED and r.history[-1]["reason"] == "changed plans"
    assert await redis.get(keys.unit(r.resource_id, T0 // (15 * M))) is None
    assert await redis.zscore(keys.deadlines(keys.shard_of_id(r.reservation_id)),
                              r.reservation_id) is None
    await create(rsv)  # the slot is free again


async def test_cas_on_version(rsv, redis, prefix):
    moved = await create(rsv)
    before = await snapshot(redis, prefix)
    with pytest.raises(VersionMismatch) as caught:
        await rsv.act(moved.reservation_id, "vendor-confirmation", actor="vendor",
                      expected_version=moved.version - 1)
    assert caught.value.details["currentVersion"] == moved.version
    assert await snapshot(redis, prefix) == before
    ok = await rsv.act(moved.reservation_id, "vendor-confirmation", actor="vendor",
                       expected_version=moved.version)
    assert ok.state == S.AUTHORIZED_BOTH


async def test_concurrent_identical_transitions_one_applies(rsv, redis, keys):
    moved = await create(rsv)
    results = await asyncio.gather(
        *(rsv.act(moved.reservation_id, "vendor-confirmation", actor="vendor")
          for _ in range(30)), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, Exception)]
    assert len(ok) == 1
    assert all(isinstance(r, InvalidTransition) for r in results if isinstance(r, Exception))
    events = await stream_events(redis, keys, keys.shard_of_id(moved.reservation_id))
    assert sum(e["toState"] == S.CONFIRMED_BY_VENDOR for e in events) == 1


async def test_racing_reapers_emit_one_event(rsv, redis, keys):
    rsv.settings = rsv.settings.replace(hold_ttl_ms=50)
    made = [await create(rsv, slot=i) for i in range(10)]
    ids = [m.reservation_id for m in made]
    await until_server_ms(redis, max(m.deadline_ms for m in made))  # all overdue now
    shard_results = await asyncio.gather(
        *(rsv.reap(shard) for shard in range(keys.shards) for _ in range(5)))
    reaped = [m.reservation_id for batch in shard_results for m in batch]
    assert sorted(reaped) == sorted(ids)  # each reservation reaped exactly once
    for rid in ids:
        events = await stream_events(redis, keys, keys.shard_of_id(rid))
        mine = [e for e in events if e["reservationId"] == rid]
        assert [e["toState"] for e in mine].count(S.FAILED_VENDOR_TIMEOUT) == 1
        assert (await rsv.get(rid)).state == S.FAILED_VENDOR_TIMEOUT


async def test_extended_reservation_is_not_expired(rsv, redis, keys):
    rsv.settings = rsv.settings.replace(hold_ttl_ms=1_000)
    for slot in range(5):
        moved = await create(rsv, slot=slot)
        try:
            async with around(redis) as w:
                extended = await rsv.extend(moved.reservation_id, actor="partner",
                                            ttl_ms=20_000)
            break
        except ReservationExpired:
            # The machine stalled past the 1 s deadline before the extension landed: that
            # reservation rightly expired. Try again with a fresh one.
            assert (await rsv.get(moved.reservation_id)).state == S.FAILED_VENDOR_TIMEOUT
    else:
        pytest.fail("five extensions in a row landed after a 1 s deadline")
    assert extended.deadline_ms > moved.deadline_ms
    assert w.before_ms + 20_000 <= extended.deadline_ms <= w.after_ms + 20_000
    assert await redis.zscore(keys.deadlines(keys.shard_of_id(moved.reservation_id)),
                              moved.reservation_id) == extended.deadline_ms
    await until_server_ms(redis, moved.deadline_ms + 1)  # past the original deadline
    assert await rsv.expire(moved.reservation_id) is None
    assert await rsv.reap(rsv.keys.shard_of_id(moved.reservation_id)) == []
    assert (await rsv.get(moved.reservation_id)).state == S.AWAITING_VENDOR_CONFIRMATION


async def test_overdue_action_records_expiry_and_refuses(rsv, redis, keys):
    rsv.settings = rsv.settings.replace(hold_ttl_ms=50)
    moved = await create(rsv)
    await until_server_ms(redis, moved.deadline_ms)  # due at its deadline
    with pytest.raises(ReservationExpired):
        await rsv.act(moved.reservation_id, "vendor-confirmation", actor="vendor")
    assert (await rsv.get(moved.reservation_id)).state == S.FAILED_VENDOR_TIMEOUT


async def test_revalidation_fails_a_reservation_whose_hold_lost_a_unit(rsv, redis, keys):
    moved = await create(rsv)
    r = await rsv.get(moved.reservation_id)
    await redis.delete(keys.unit(r.resource_id, T0 // (15 * M) + 1))
    with pytest.raises(HoldLost):
        await rsv.act(moved.reservation_id, "vendor-confirmation", actor="vendor")
    r = await rsv.get(moved.reservation_id)
    assert r.state == S.FAILED_AVAILABILITY_CHANGED and r.failure_reason == "hold lost"


async def test_payment_required_vendor_refused_at_creation(rsv, redis, prefix):
    before = await snapshot(redis, prefix)
    with pytest.raises(PaymentRequired):
        await create(rsv, vendor="v-paid")
    assert await snapshot(redis, prefix) == before


async def test_no_holds_until_markers_are_rehydrated(rsv, redis, keys, prefix):
    """A shard whose ready flag is gone (Redis lost its data) accepts no new holds."""
    shard = keys.shard_of("v-confirm-r")
    await redis.delete(keys.ready(shard))
    before = await snapshot(redis, prefix)
    with pytest.raises(NotReady):
        await create(rsv)
    assert await snapshot(redis, prefix) == before
    await rsv.mark_ready([shard])
    await create(rsv)


@pytest.mark.parametrize("bad", [
    {"metadata": ["not", "an", "object"]},
    {"metadata": {"x": "y" * 5000}},
    {"requester_id": ""},
    {"partner_id": "bad partner id!"},
    {"triggered_by": "nobody"},
    {"end_ms": T0},
])
async def test_bad_creation_input_changes_nothing(rsv, redis, prefix, bad):
    before = await snapshot(redis, prefix)
    args = dict(partner_id="p1", vendor_id="v-confirm", resource_id=None, start_ms=T0,
                end_ms=T0 + 30 * M, requester_id="req-1")
    args.update(bad)
    with pytest.raises(ValidationError):
        await rsv.create(**args)
    assert await snapshot(redis, prefix) == before


async def test_bad_transition_input_changes_nothing(rsv, redis, prefix):
    moved = await create(rsv)
    before = await snapshot(redis, prefix)
    for call in [
        rsv.act(moved.reservation_id, "teleport", actor="vendor"),
        rsv.act(moved.reservation_id, "vendor-confirmation", actor="martian"),
        rsv.act(moved.reservation_id, "vendor-confirmation", actor="vendor", metadata=[1]),
        rsv.act(moved.reservation_id, "vendor-confirmation", actor="vendor",
                expected_version=-1),
        rsv.act(moved.reservation_id, "vendor-confirmation", actor="vendor", reason="x" * 300),
        rsv.extend(moved.reservation_id, actor="partner", ttl_ms=0),
    ]:
        with pytest.raises(ValidationError):
            await call
    assert await snapshot(redis, prefix) == before


async def test_history_entries_are_complete(rsv):
    moved = await create(rsv, idempotency_key="idem-1")
    r = await rsv.get(moved.reservation_id)
    for entry in r.history:
        assert set(entry) >= {"fromState", "toState", "triggeredBy", "reason", "metadata",
                              "timestamp_ms", "idempotencyKey"}
        assert entry["idempotencyKey"] == "idem-1"
    assert orjson.dumps(r.metadata) == b"{}"
