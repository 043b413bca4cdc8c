"""The commit-queue write path against a real Postgres: apply_events, the reads built on it
(rehydration, reservation records, audit queries) and the manual-review queue."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from engine import directory
from engine.errors import ValidationError
from engine.keys import KeySpace
from engine.store import commit, events, queries, review
from engine.store.commit import apply_events
from tests.timing import eventually
from engine.store.events import EventResult, booking_id_for
from tests.test_db import count, db, conn  # noqa: F401  (fixtures)

T0 = 1_893_456_000_000  # 2030-01-01T00:00Z in ms
M = 60_000
H = 60 * M
KEYS = KeySpace("", 16)
MAIN_PATH = ["INTENT_CREATED", "HELD", "AWAITING_VENDOR_CONFIRMATION", "CONFIRMED_BY_VENDOR",
             "AWAITING_VENDOR_AUTH", "VENDOR_AUTHORIZED", "AWAITING_REQUESTER_AUTH",
             "AUTHORIZED_BOTH", "COMMIT_IN_PROGRESS"]


def to_dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def event(reservation_id: str, version: int, to_state: str, *, from_state: str = "",
          resource: str = "v1", start: int = T0, end: int = T0 + H, before: int = 0,
          after: int = 0, partner: str = "p1", triggered_by: str = "system", reason: str = "",
          metadata: str = "{}", idempotency_key: str = "") -> dict[str, str]:
    """One stream entry as the lifecycle scripts write it: every value a string."""
    return {
        "eventId": f"{reservation_id}:{version}", "reservationId": reservation_id,
        "fromState": from_state, "toState": to_state, "triggeredBy": triggered_by,
        "reason": reason, "metadata": metadata, "timestamp": str(T0 - 86_400_000 + version),
        "idempotencyKey": idempotency_key, "version": str(version), "partnerId": partner,
        "vendorId": "v1", "resourceId": resource, "requesterId": "u1",
        "slotStart": str(start), "slotEnd": str(end), "blockStart": str(start - before),
        "blockEnd": str(end + after), "createdAt": str(T0 - 86_400_000),
        "expiresAt": str(T0 - 86_400_000 + 600_000),
    }


def lifecycle(reservation_id: str, **kwargs) -> list[dict[str, str]]:
    """Every event of the main path up to the commit, versions 1..9."""
    states = [""] + MAIN_PATH
    return [event(reservation_id, v, states[v], from_state=states[v - 1], **kwargs)
            for v in range(1, len(states))]


def rid(resource: str = "v1") -> str:
    return KEYS.new_reservation_id(resource)


@pytest.fixture
async def vendor(conn):
    await directory.create_vendor(conn, "v1")
    await directory.create_resource(conn, "v1-b", "v1", buffer_before_minutes=15,
                                    buffer_after_minutes=15)


async def test_apply_events_is_idempotent(conn, vendor):
    a, b = rid(), rid()
    batch = lifecycle(a) + lifecycle(b, start=T0 + H, end=T0 + 2 * H)
    first = await apply_events(conn, batch)
    assert [o.event_id for o in first] == [e["eventId"] for e in batch]
    assert [o.result for o in first if o.result != EventResult.RECORDED] == [
        EventResult.BOOKED, EventResult.BOOKED]
    assert not any(o.already_applied for o in first)
    commit = first[8]
    assert (commit.reservation_id, commit.booking_id) == (a, booking_id_for(a))

    again = await apply_events(conn, batch)
    assert all(o.already_applied for o in again)
    assert [o.result for o in again] == [
        EventResult.BOOKED if e["toState"] == "COMMIT_IN_PROGRESS" else EventResult.DUPLICATE
        for e in batch]
    assert again[8].booking_id == booking_id_for(a)
    assert await count(conn, "bookings") == 2
    assert await count(conn, "audit_log") == len(batch)
    assert await count(conn, "reservation_history") == len(batch)
    assert await conn.fetchval("SELECT count(DISTINCT event_id) FROM audit_log") == len(batch)


async def test_an_event_twice_in_one_batch_is_written_once(conn, vendor):
    a = rid()
    events = lifecycle(a)
    outcomes = await apply_events(conn, events + events[:2] + events[8:])
    assert [o.already_applied for o in outcomes] == [False] * 9 + [True] * 3
    assert [o.result for o in outcomes[9:]] == [EventResult.DUPLICATE, EventResult.DUPLICATE,
                                                EventResult.BOOKED]
    assert await count(conn, "audit_log") == 9 and await count(conn, "bookings") == 1


async def test_audit_row_and_snapshot_content(conn, vendor):
    a = rid()
    metadata = orjson.dumps({"channel": "web", "n": 2}).decode()
    await apply_events(conn, lifecycle(a, partner="acme")[:3] + [
        event(a, 4, "FAILED_VENDOR_TIMEOUT", from_state="AWAITING_VENDOR_CONFIRMATION",
              triggered_by="timeout", reason="vendor did not answer", metadata=metadata,
              idempotency_key="idem-1", partner="acme")])
    row = await conn.fetchrow("SELECT * FROM audit_log WHERE event_id = $1", f"{a}:4")
    assert (row["tenant_id"], row["reservation_id"], row["resource_id"], row["action"],
            row["actor"]) == ("acme", a, "v1", "reservation.failed_vendor_timeout", "timeout")
    assert row["at"] == to_dt(T0 - 86_400_000 + 4)
    assert row["metadata"] == {
        "fromState": "AWAITING_VENDOR_CONFIRMATION", "toState": "FAILED_VENDOR_TIMEOUT",
        "reason": "vendor did not answer", "version": 4, "idempotencyKey": "idem-1",
        "metadata": {"channel": "web", "n": 2}}

    stored = await queries.load_reservation(conn, a)
    assert (stored.state, stored.version, stored.failure_reason, stored.booking_id) == (
        "FAILED_VENDOR_TIMEOUT", 4, "vendor did not answer", None)
    assert (stored.slot_start, stored.slot_end) == (to_dt(T0), to_dt(T0 + H))
    assert stored.metadata == {"channel": "web", "n": 2}
    assert [t.version for t in stored.history] == [1, 2, 3, 4]
    assert stored.history[0].from_state is None and stored.history[3].idempotency_key == "idem-1"
    assert await queries.load_reservation(conn, rid()) is None


async def test_snapshot_only_moves_forward(conn, vendor):
    a = rid()
    events = lifecycle(a)
    await apply_events(conn, [events[4], events[2]])  # newest first within one batch
    assert (await queries.load_reservation(conn, a)).version == 5
    await apply_events(conn, [events[1]])  # a late, older event
    stored = await queries.load_reservation(conn, a)
    assert (stored.state, stored.version) == ("AWAITING_VENDOR_AUTH", 5)
    assert [t.version for t in stored.history] == [2, 3, 5]  # still recorded in history
    await apply_events(conn, events)
    stored = await queries.load_reservation(conn, a)
    assert (stored.state, stored.booking_id) == ("COMMIT_IN_PROGRESS", booking_id_for(a))


async def test_one_conflicting_booking_does_not_poison_the_batch(conn, vendor):
    taken = rid()
    [first] = await apply_events(conn, [event(taken, 9, "COMMIT_IN_PROGRESS")])
    assert first.result == EventResult.BOOKED

    good = [rid() for _ in range(3)]
    loser, late = rid(), rid()
    batch = [
        event(good[0], 9, "COMMIT_IN_PROGRESS", start=T0 + H, end=T0 + 2 * H),  # touches
        event(loser, 9, "COMMIT_IN_PROGRESS", start=T0 + 30 * M, end=T0 + 90 * M),
        event(good[1], 9, "COMMIT_IN_PROGRESS", resource="v1-b", start=T0, end=T0 + H),
        event(good[2], 3, "AWAITING_VENDOR_CONFIRMATION", from_state="HELD"),
        # Overlaps good[0], written earlier in this same batch: the earlier event wins.
        event(late, 9, "COMMIT_IN_PROGRESS", start=T0 + 90 * M, end=T0 + 3 * H),
    ]
    outcomes = await apply_events(conn, batch)
    assert [o.result for o in outcomes] == [
        EventResult.BOOKED, EventResult.AVAILABILITY_CHANGED, EventResult.BOOKED,
        EventResult.RECORDED, EventResult.AVAILABILITY_CHANGED]
    assert outcomes[1].conflicting_booking_id == booking_id_for(taken)
    assert outcomes[4].conflicting_booking_id == booking_id_for(good[0])
    assert outcomes[1].booking_id is None
    booked = {r[0] for r in await conn.fetch("SELECT reservation_id FROM bookings")}
    assert booked == {taken, good[0], good[1]}
    # The refused commits are still part of the record: their transitions are audited.
    assert await count(conn, "audit_log") == 1 + len(batch)
    assert (await queries.load_reservation(conn, loser)).booking_id is None

    # Redelivered: same answer, nothing new written.
    again = await apply_events(conn, batch)
    assert [o.result for o in again] == [
        EventResult.BOOKED, EventResult.AVAILABILITY_CHANGED, EventResult.BOOKED,
        EventResult.DUPLICATE, EventResult.AVAILABILITY_CHANGED]
    assert again[1].conflicting_booking_id == booking_id_for(taken)
    assert await count(conn, "bookings") == 3


async def test_buffers_are_part_of_the_booked_interval(conn, vendor):
    a, b, c = rid(), rid(), rid()
    outcomes = await apply_events(conn, [
        event(a, 9, "COMMIT_IN_PROGRESS", resource="v1-b", start=T0, end=T0 + H,
              before=15 * M, after=15 * M),
        # Slot touches a's slot, but the buffers overlap.
        event(b, 9, "COMMIT_IN_PROGRESS", resource="v1-b", start=T0 + H, end=T0 + 2 * H,
              before=15 * M, after=15 * M),
        # Buffers touch: allowed.
        event(c, 9, "COMMIT_IN_PROGRESS", resource="v1-b", start=T0 + H + 30 * M,
              end=T0 + 2 * H, before=15 * M, after=15 * M),
    ])
    assert [o.result for o in outcomes] == [EventResult.BOOKED,
                                            EventResult.AVAILABILITY_CHANGED, EventResult.BOOKED]


async def test_redelivered_commit_after_failure_is_superseded(conn, vendor):
    blocker, a = rid(), rid()
    await apply_events(conn, [event(blocker, 9, "COMMIT_IN_PROGRESS")])
    commit = event(a, 9, "COMMIT_IN_PROGRESS", from_state="AUTHORIZED_BOTH")
    [refused] = await apply_events(conn, [commit])
    assert refused.result == EventResult.AVAILABILITY_CHANGED
    # The worker failed the reservation; meanwhile the blocking booking was cancelled.
    await conn.execute("UPDATE bookings SET cancelled_at = now()")
    failed = event(a, 10, "FAILED_AVAILABILITY_CHANGED", from_state="COMMIT_IN_PROGRESS",
                   reason="slot taken")
    outcomes = await apply_events(conn, [commit, failed])
    assert [o.result for o in outcomes] == [EventResult.SUPERSEDED, EventResult.RECORDED]
    assert await conn.fetchval("SELECT count(*) FROM bookings WHERE reservation_id = $1",
                               a) == 0
    stored = await queries.load_reservation(conn, a)
    assert (stored.state, stored.failure_reason) == ("FAILED_AVAILABILITY_CHANGED", "slot taken")

    # And redelivered on its own later, against the stored snapshot.
    [alone] = await apply_events(conn, [commit])
    assert (alone.result, alone.already_applied) == (EventResult.SUPERSEDED, True)
    assert await count(conn, "bookings") == 1  # only the cancelled blocker


async def test_malformed_events_are_rejected_and_write_nothing(conn, vendor):
    good = rid()
    broken = [
        {**event(rid(), 1, "INTENT_CREATED"), "toState": "TELEPORTED"},
        {**event(rid(), 1, "INTENT_CREATED"), "version": "one"},
        {**event(rid(), 1, "INTENT_CREATED"), "metadata": "[1, 2]"},
        {**event(rid(), 1, "INTENT_CREATED"), "triggeredBy": "mallory"},
        {k: v for k, v in event(rid(), 1, "INTENT_CREATED").items() if k != "partnerId"},
        {**event(rid(), 9, "COMMIT_IN_PROGRESS"), "blockStart": str(T0 + M)},
        event("not-a-reservation", 1, "INTENT_CREATED"),
    ]
    outcomes = await apply_events(conn, [*broken, event(good, 1, "INTENT_CREATED")])
    assert [o.result for o in outcomes] == [EventResult.REJECTED] * len(broken) + [
        EventResult.RECORDED]
    assert all(o.reason for o in outcomes[:-1])
    assert await count(conn, "reservation_history") == 1
    assert await count(conn, "audit_log") == 1 and await count(conn, "reservations") == 1
    assert await apply_events(conn, broken[:2]) == outcomes[:2]

    unknown = rid()
    [outcome] = await apply_events(conn, [event(unknown, 9, "COMMIT_IN_PROGRESS",
                                                resource="ghost")])
    assert (outcome.result, outcome.reason) == (EventResult.REJECTED, "unknown resource 'ghost'")
    assert await count(conn, "bookings") == 0


async def test_bookings_to_rehydrate(conn, vendor):
    live, ended, cancelled, buffered = rid(), rid(), rid(), rid()
    await apply_events(conn, [
        event(live, 9, "COMMIT_IN_PROGRESS", start=T0 + H, end=T0 + 2 * H),
        event(ended, 9, "COMMIT_IN_PROGRESS", start=T0 - H, end=T0),
        event(cancelled, 9, "COMMIT_IN_PROGRESS", start=T0 + 3 * H, end=T0 + 4 * H),
        # The slot has ended at T0, its post-buffer has not: the markers are still needed.
        event(buffered, 9, "COMMIT_IN_PROGRESS", resource="v1-b", start=T0 - H, end=T0,
              before=15 * M, after=15 * M),
    ])
    await conn.execute("UPDATE bookings SET cancelled_at = now() WHERE reservation_id = $1",
                       cancelled)
    bookings = await queries.bookings_to_rehydrate(conn, to_dt(T0))
    assert [(b.reservation_id, b.resource_id) for b in bookings] == [(live, "v1"),
                                                                     (buffered, "v1-b")]
    assert bookings[0] == queries.Booking(
        booking_id_for(live), live, "v1", "v1", "p1", T0 + H, T0 + 2 * H, T0 + H, T0 + 2 * H)
    assert (bookings[1].block_start_ms, bookings[1].block_end_ms) == (T0 - H - 15 * M,
                                                                      T0 + 15 * M)


async def test_query_audit_filters_and_pages(conn, vendor):
    a, b = rid(), rid()
    await apply_events(conn, lifecycle(a) + lifecycle(b, resource="v1-b", triggered_by="vendor"))
    assert len(await queries.query_audit(conn, reservation_id=a)) == 9
    by_resource = await queries.query_audit(conn, resource_id="v1-b")
    assert {e.reservation_id for e in by_resource} == {b}
    assert {e.reservation_id for e in await queries.query_audit(conn, actor="vendor")} == {b}
    window = await queries.query_audit(conn, reservation_id=a,
                                       since=to_dt(T0 - 86_400_000 + 3),
                                       until=to_dt(T0 - 86_400_000 + 5))
    assert [e.metadata["version"] for e in window] == [3, 4]
    page1 = await queries.query_audit(conn, limit=10)
    page2 = await queries.query_audit(conn, limit=10, after_id=page1[-1].id)
    assert len(page1) == 10 and len(page2) == 8
    assert [e.id for e in page1 + page2] == sorted(e.id for e in page1 + page2)
    assert page1[0].action == "reservation.intent_created"
    for bad in ({"limit": 0}, {"limit": 5000},
                {"since": to_dt(T0), "until": to_dt(T0 - H)}):
        with pytest.raises(ValidationError):
            await queries.query_audit(conn, **bad)


async def test_record_audit_and_manual_review_are_idempotent(conn, vendor):
    at = to_dt(T0)
    assert await queries.record_audit(conn, event_id="ops-1", action="hold.manual_release",
                                      actor="ops", at=at, resource_id="v1",
                                      metadata={"note": "stuck"})
    assert not await queries.record_audit(conn, event_id="ops-1", action="x", actor="ops",
                                          at=at)
    [entry] = await queries.query_audit(conn, actor="ops")
    assert (entry.action, entry.metadata) == ("hold.manual_release", {"note": "stuck"})

    a = rid()
    case = await review.record_manual_review(conn, "commit_stuck", a, "v1", {"tries": 5})
    assert await review.record_manual_review(conn, "commit_stuck", a, "v1", {"tries": 6}) == case
    other = await review.record_manual_review(conn, "payment_orphan", a, "v1", {})
    assert other != case
    await conn.execute("UPDATE manual_review SET resolved_at = now() WHERE id = $1", case)
    reopened = await review.record_manual_review(conn, "commit_stuck", a, "v1", {})
    assert reopened not in (case, other)
    assert await conn.fetchval("SELECT details FROM manual_review WHERE id = $1",
                               case) == {"tries": 5}
    with pytest.raises(ValidationError):
        await review.record_manual_review(conn, "", a, None, {})

    assert await review.record_dead_letter(conn, stream="{sg:1}:events", entry_id="1-0",
                                            fields={"eventId": "x"}, error="boom",
                                            deliveries=5)
    assert not await review.record_dead_letter(conn, stream="{sg:1}:events",
                                                entry_id="1-0", fields={}, error="boom",
                                                deliveries=6)


async def test_measure_commit_throughput(conn, vendor):
    """Measures (does not assert) bookings/s through apply_events in batches of 500."""
    resources = [f"bench-{i}" for i in range(50)]
    for resource in resources:
        await directory.create_resource(conn, resource, "v1")
    batches, size = 20, 500
    # Each resource gets consecutive, touching one-hour bookings: no conflicts.
    all_batches = [[
        event(rid(), 9, "COMMIT_IN_PROGRESS", from_state="AUTHORIZED_BOTH",
              resource=resources[i % 50], start=T0 + (n * size + i) // 50 * H,
              end=T0 + ((n * size + i) // 50 + 1) * H)
        for i in range(size)] for n in range(batches)]
    started = time.perf_counter()
    for batch in all_batches:
        outcomes = await apply_events(conn, batch)
        assert all(o.result == EventResult.BOOKED for o in outcomes)
    elapsed = time.perf_counter() - started
    assert await count(conn, "bookings") == batches * size
    assert await count(conn, "audit_log") == batches * size
    print(f"\napply_events: {batches * size / elapsed:,.0f} bookings/s "
          f"({batches} batches of {size}, {elapsed / batches * 1000:.1f} ms per batch)")


# ---- the drain's fast paths: flat entries, joined columns, concurrent deliveries -----------
OLD_LAYOUT = ["eventId", *events.FIELD_LAYOUT]  # entries written before one-per-call


def flat(fields: dict[str, str], order: list[str] = OLD_LAYOUT) -> list[str]:
    """A stream entry as the raw RESP reader hands it over: [name, value, ...]."""
    return [item for name in order if name in fields for item in (name, fields[name])]


async def test_flat_entries_are_parsed_like_dicts(conn, vendor):
    a, b = rid(), rid()
    as_dicts = lifecycle(a)
    # The layout of emit_transition.lua (parsed by position), and another order (by name).
    as_lists = [flat(e) for e in lifecycle(b, start=T0 + H, end=T0 + 2 * H)]
    as_lists[3] = flat(event(b, 4, MAIN_PATH[3], from_state=MAIN_PATH[2], start=T0 + H,
                             end=T0 + 2 * H), order=list(reversed(OLD_LAYOUT)))
    broken = flat({**event(rid(), 1, "INTENT_CREATED"), "version": "one"})
    outcomes = await apply_events(conn, as_dicts + as_lists + [broken])
    assert [o.result for o in outcomes[:9]] == [o.result for o in outcomes[9:18]]
    assert outcomes[17].booking_id == booking_id_for(b)
    assert (outcomes[18].result, outcomes[18].event_id) == (EventResult.REJECTED,
                                                            broken[1])
    for reservation_id in (a, b):
        stored = await queries.load_reservation(conn, reservation_id)
        assert [t.version for t in stored.history] == list(range(1, 10))
    assert await count(conn, "audit_log") == 18


async def test_a_value_holding_the_separator_is_written_intact(conn, vendor):
    a = rid()
    reason = "odd\x1freason"
    events = lifecycle(a)[:2] + [event(a, 3, "CANCELLED", from_state="HELD", reason=reason,
                                       idempotency_key="k\x1f1", metadata='{"n": "\\u001f"}')]
    await apply_events(conn, events)
    stored = await queries.load_reservation(conn, a)
    assert (stored.state, stored.failure_reason) == ("CANCELLED", reason)
    assert stored.history[2].idempotency_key == "k\x1f1"
    row = await conn.fetchrow("SELECT metadata FROM audit_log WHERE event_id = $1", f"{a}:3")
    assert row["metadata"] == {"fromState": "HELD", "toState": "CANCELLED", "reason": reason,
                               "version": 3, "idempotencyKey": "k\x1f1",
                               "metadata": {"n": "\x1f"}}
    # One event alone, empty optional fields: written the same way.
    b = rid()
    [only] = await apply_events(conn, [event(b, 1, "INTENT_CREATED")])
    assert only.result == EventResult.RECORDED
    row = await conn.fetchrow("SELECT * FROM reservation_history WHERE event_id = $1", f"{b}:1")
    assert (row["from_state"], row["reason"], row["idempotency_key"]) == (None, None, None)


async def test_apply_batch_reports_commits_rejects_and_new_transitions(conn, vendor):
    a = rid()
    events = lifecycle(a) + [{**event(rid(), 1, "INTENT_CREATED"), "triggeredBy": "mallory"}]
    applied = await commit.apply_batch(conn, events, count_transitions=True)
    assert applied.results == [EventResult.RECORDED] * 8 + [EventResult.BOOKED,
                                                            EventResult.REJECTED]
    assert sorted(applied.details) == [8, 9]
    assert applied.details[8].booking_id == booking_id_for(a)
    assert sum(applied.transitions.values()) == 9
    assert applied.transitions[("AUTHORIZED_BOTH", "COMMIT_IN_PROGRESS", "system")] == 1
    again = await commit.apply_batch(conn, events, count_transitions=True)
    assert not again.transitions and all(again.already_applied[:9])


async def test_a_concurrent_delivery_of_the_same_batch_writes_it_once(db, vendor):
    """The fast path inserts plainly; the second writer waits on the first, hits the unique
    key, and writes the batch again with ON CONFLICT: nothing twice, same answers."""
    import asyncio

    a, b = rid(), rid()
    batch = lifecycle(a) + lifecycle(b, start=T0 + H, end=T0 + 2 * H)
    async with db.acquire() as first, db.acquire() as second:
        tx = first.transaction()
        await tx.start()
        mine = await apply_events(first, batch)
        second_pid = await second.fetchval("SELECT pg_backend_pid()")
        theirs = asyncio.create_task(apply_events(second, batch))

        async def second_waits_on_a_lock() -> bool:
            return await first.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                second_pid) is True

        await eventually(second_waits_on_a_lock, what="the second writer to wait on the first")
        assert not theirs.done()  # waiting on the first writer's rows
        await tx.commit()
        theirs = await theirs
    assert [o.result for o in theirs] == [
        EventResult.BOOKED if e["toState"] == "COMMIT_IN_PROGRESS" else EventResult.DUPLICATE
        for e in batch]
    assert all(o.already_applied for o in theirs) and not any(o.already_applied for o in mine)
    async with db.acquire() as conn:
        assert await count(conn, "audit_log") == await count(conn, "reservation_history") == 18
        assert await count(conn, "bookings") == 2


# ---- one entry per script call: paths, unchanging fields on the creation entry only ------
def new_entry(reservation_id: str, version: int, path: list[str], *, from_state: str,
              creation: bool = False, metadata: str = "", actor: str = "partner",
              start: int = T0, end: int = T0 + H) -> dict[str, str]:
    """An entry as lua/lib/emit_transition.lua writes it now."""
    fields = {"reservationId": reservation_id, "version": str(version),
              "fromState": from_state, "toState": path[-1], "triggeredBy": actor,
              "timestamp": str(T0 - 86_400_000 + version)}
    if len(path) > 1:
        fields.update(path=",".join(path), fromVersion=str(version - len(path) + 1))
    if metadata:
        fields["metadata"] = metadata
    if creation:
        fields.update(partnerId="p1", vendorId="v1", resourceId="v1", requesterId="u1",
                      slotStart=str(start), slotEnd=str(end), blockStart=str(start),
                      blockEnd=str(end), createdAt=str(T0 - 86_400_000))
    return fields


async def test_a_path_entry_is_one_row_per_transition_each_once(conn, vendor):
    a = rid()
    created = new_entry(a, 7, MAIN_PATH[1:8], from_state="INTENT_CREATED", creation=True,
                        metadata='{"note": "x"}')
    assert [e["eventId"] for e in events.expand_entry(created)] == [
        f"{a}:{v}" for v in range(1, 8)]
    [outcome] = await apply_events(conn, [created])
    assert (outcome.result, outcome.event_id) == (EventResult.RECORDED, f"{a}:7")
    # A later batch: the commit carries no unchanging field; the snapshot supplies them.
    commit = new_entry(a, 8, ["COMMIT_IN_PROGRESS"], from_state="AUTHORIZED_BOTH")
    [booked] = await apply_events(conn, [commit])
    assert (booked.result, booked.booking_id) == (EventResult.BOOKED, booking_id_for(a))
    stored = await queries.load_reservation(conn, a)
    assert [(t.version, t.from_state, t.to_state) for t in stored.history] == [
        (v, MAIN_PATH[v - 1], MAIN_PATH[v]) for v in range(1, 9)]
    assert stored.history[0].metadata == {"note": "x"} and stored.history[1].metadata == {}
    assert stored.metadata == {"note": "x"}
    row = await conn.fetchrow("SELECT * FROM bookings WHERE reservation_id = $1", a)
    assert (row["partner_id"], row["resource_id"], row["block_start"]) == ("p1", "v1",
                                                                           to_dt(T0))
    tenants = {r[0] for r in await conn.fetch("SELECT tenant_id FROM audit_log")}
    assert tenants == {"p1"}
    # Redelivered, in one batch or apart: nothing written twice.
    again = await apply_events(conn, [created, commit, created])
    assert all(o.already_applied for o in again)
    assert await count(conn, "audit_log") == await count(conn, "reservation_history") == 8
    assert await conn.fetchval("SELECT count(DISTINCT event_id) FROM audit_log") == 8


async def test_an_entry_before_its_creation_is_deferred_and_writes_nothing(conn, vendor):
    a = rid()
    created = new_entry(a, 2, MAIN_PATH[1:3], from_state="INTENT_CREATED", creation=True)
    cancel = new_entry(a, 3, ["CANCELLED"], from_state=MAIN_PATH[2])
    [early] = await apply_events(conn, [cancel])
    assert early.result == EventResult.DEFERRED and "creation" in early.reason
    assert await count(conn, "audit_log") == 0 and await count(conn, "reservations") == 0
    outcomes = await apply_events(conn, [created, cancel])
    assert [o.result for o in outcomes] == [EventResult.RECORDED, EventResult.RECORDED]
    assert (await queries.load_reservation(conn, a)).state == "CANCELLED"


async def test_an_inconsistent_path_is_rejected(conn, vendor):
    a = rid()
    bad = [
        {**new_entry(a, 7, MAIN_PATH[1:8], from_state="INTENT_CREATED", creation=True),
         "toState": "HELD"},
        {**new_entry(a, 7, MAIN_PATH[1:8], from_state="INTENT_CREATED", creation=True),
         "fromVersion": "2"},
        new_entry(a, 3, MAIN_PATH[1:8], from_state="INTENT_CREATED", creation=True),
        {**new_entry(a, 2, MAIN_PATH[1:3], from_state="INTENT_CREATED", creation=True),
         "path": "HELD,TELEPORTED"},
    ]
    outcomes = await apply_events(conn, bad)
    assert [o.result for o in outcomes] == [EventResult.REJECTED] * 4
    assert await count(conn, "audit_log") == 0


def move(reservation_id: str, version: int, state: str, *, old: tuple, new: tuple
         ) -> dict[str, str]:
    """A move entry as lua/modify_reservation.lua writes it (no unchanging fields)."""
    fields = {"reservationId": reservation_id, "version": str(version), "fromState": state,
              "toState": state, "triggeredBy": "partner", "reason": "modified",
              "timestamp": str(T0 - 86_400_000 + version),
              "expiresAt": str(T0 - 86_400_000 + 600_000)}
    for side, place in (("From", old), ("To", new)):
        resource, start, end = place
        fields.update({f"moved{side}ResourceId": resource, f"moved{side}SlotStart": str(start),
                       f"moved{side}SlotEnd": str(end), f"moved{side}BlockStart": str(start),
                       f"moved{side}BlockEnd": str(end)})
    return fields


async def test_a_move_changes_where_later_rows_and_the_booking_sit(conn, vendor):
    r = rid()
    created = event(r, 1, "HELD", from_state="INTENT_CREATED")
    moved = move(r, 2, "HELD", old=("v1", T0, T0 + H), new=("v1-b", T0 + 2 * H, T0 + 3 * H))
    broken = [{k: v for k, v in moved.items() if k != "movedToSlotEnd"},
              {**moved, "movedToBlockEnd": str(T0)},
              {**moved, "toState": "AUTHORIZED_BOTH"}]
    outcomes = await apply_events(conn, [created, *broken])
    assert [o.result for o in outcomes] == [EventResult.RECORDED] + \
        [EventResult.REJECTED] * 3
    commit_entry = {k: v for k, v in event(r, 3, "COMMIT_IN_PROGRESS", from_state="HELD").items()
                    if k not in events.INFO_FIELDS}
    outcomes = await apply_events(conn, [moved, commit_entry])
    assert [o.result for o in outcomes] == [EventResult.RECORDED, EventResult.BOOKED]
    booking = await conn.fetchrow("SELECT resource_id, slot_start, slot_end FROM bookings")
    assert tuple(booking) == ("v1-b", to_dt(T0 + 2 * H), to_dt(T0 + 3 * H))
    snap = await conn.fetchrow("SELECT resource_id, slot_start, block_end, version "
                               "FROM reservations WHERE id = $1", r)
    assert tuple(snap) == ("v1-b", to_dt(T0 + 2 * H), to_dt(T0 + 3 * H), 3)
    audit = await conn.fetchval("SELECT metadata FROM audit_log WHERE event_id = $1", f"{r}:2")
    audit = orjson.loads(audit) if isinstance(audit, str) else audit
    assert audit["modification"]["from"]["resourceId"] == "v1"
    assert audit["modification"]["to"] == {"resourceId": "v1-b", "slotStart": T0 + 2 * H,
                                           "slotEnd": T0 + 3 * H, "blockStart": T0 + 2 * H,
                                           "blockEnd": T0 + 3 * H}
    # Redelivered: nothing new, and an older entry never moves the snapshot back.
    again = await apply_events(conn, [created, moved])
    assert [o.result for o in again] == [EventResult.DUPLICATE] * 2
    assert (await conn.fetchval("SELECT resource_id FROM reservations WHERE id = $1", r)) == \
        "v1-b"
