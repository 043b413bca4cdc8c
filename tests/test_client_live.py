"""``slotguard.client`` against a live API (``slotguard serve`` under uvicorn on a free port,
real Redis and Postgres): every route, typed results, typed errors from the envelope."""

from __future__ import annotations

import asyncio
import itertools

import msgspec
import pytest

from api import schemas
from slotguard.client import (AsyncClient, BadRequest, Client, Conflict, Forbidden, NotFound,
                              PreconditionFailed, RetryPolicy, Unauthorized)
from tests import live_server
from tests.test_api_fixtures import at

_slots = itertools.count(1)


def slot(minutes: int = 30) -> tuple[str, str]:
    """A fresh 30-minute slot of its own (T0 is in 2030), aligned to the 15-minute grid."""
    start = next(_slots) * 120
    return at(start), at(start + minutes)


@pytest.fixture(scope="module")
def live():
    api = live_server.start()
    yield api
    live_server.stop(api)


@pytest.fixture
def sg(live):
    waits: list[float] = []
    with Client(live.url, live.key("p1"), sleep=waits.append) as client:
        client.waits = waits
        yield client
    assert waits == [], "a live call against a healthy server was retried"


def create(sg, vendor="v-confirm", **kw):
    start, end = slot()
    return sg.create_reservation(vendor_id=vendor, slot_start_time=start, slot_end_time=end,
                                 requester_id="req-1", **kw)


def test_partner_walk_to_commit_in_progress(sg, live):
    created = create(sg, metadata={"note": "first"})
    assert isinstance(created, schemas.CreateReservationResponse)
    assert created.state == "AWAITING_VENDOR_CONFIRMATION" and created.vendor_confirmation_required
    vendor = sg.with_key(live.key("vendor"))
    confirmed = vendor.vendor_confirmation(created.reservation_id, reason="ok")
    assert isinstance(confirmed, schemas.Reservation)
    # A free vendor: both authorizations are passed through and recorded.
    assert confirmed.state == "AUTHORIZED_BOTH"
    committed = sg.commit(created.reservation_id)
    assert committed.state == "COMMIT_IN_PROGRESS"
    read = sg.get_reservation(created.reservation_id)
    assert read.reservation_id == created.reservation_id and read.metadata["note"] == "first"
    assert [t.to_state for t in read.state_history][-1] == "COMMIT_IN_PROGRESS"


def test_conflict_is_typed_with_details_and_request_id(sg, live):
    start, end = slot()
    body = dict(vendor_id="v-confirm", slot_start_time=start, slot_end_time=end,
                requester_id="r")
    first = sg.create_reservation(**body)
    with Client(live.url, live.key("p2")) as other:
        with pytest.raises(Conflict) as caught:
            other.create_reservation(**body)
    exc = caught.value
    assert exc.status == 409 and exc.code and exc.message and not exc.retryable
    assert exc.request_id
    assert first.reservation_id  # the holder is unchanged:
    assert sg.get_reservation(first.reservation_id).state == "AWAITING_VENDOR_CONFIRMATION"


def test_create_replays_under_the_same_idempotency_key(sg):
    start, end = slot()
    body = dict(vendor_id="v-instant", slot_start_time=start, slot_end_time=end,
                requester_id="r", idempotency_key="client-test-key-1")
    first = sg.create_reservation(**body)
    again = sg.create_reservation(**body)
    assert again.reservation_id == first.reservation_id


def test_extend_cancel_modify_and_if_match(sg):
    created = create(sg)
    rid = created.reservation_id
    extended = sg.extend(rid, ttl_ms=1_200_000)  # later than the 10-min deadline
    assert extended.expires_at > sg.get_reservation(rid).created_at
    assert extended.version == created_version(sg, rid) and extended.expires_at != \
        created.expires_at
    assert extended.state == "AWAITING_VENDOR_CONFIRMATION"
    start, end = slot()
    moved = sg.modify(rid, slot_start_time=start, slot_end_time=end,
                      if_match=extended.version)
    assert (moved.slot_start_time, moved.slot_end_time) == (start, end)
    with pytest.raises(PreconditionFailed) as stale:
        sg.cancel(rid, if_match=extended.version)  # the move took that version
    assert stale.value.code
    cancelled = sg.cancel(rid, reason="changed plans", if_match=moved.version)
    assert cancelled.state == "CANCELLED"
    with pytest.raises(Conflict):
        sg.cancel(rid)  # terminal: final, not retried


def created_version(sg, rid) -> int:
    return sg.get_reservation(rid).version


def test_authorizations_on_a_paid_vendor_flow(sg, live):
    # v-confirm is free; the authorization routes answer on a confirmed hold all the same.
    created = create(sg, vendor="v-other")
    vendor = sg.with_key(live.key("vendor-other"))
    confirmed = vendor.vendor_confirmation(created.reservation_id)
    assert confirmed.state in ("AUTHORIZED_BOTH", "AWAITING_VENDOR_AUTH")
    if confirmed.state == "AWAITING_VENDOR_AUTH":  # a vendor whose payment is required
        assert vendor.vendor_authorization(created.reservation_id).state
        assert sg.requester_authorization(created.reservation_id).state == "AUTHORIZED_BOTH"
    else:
        with pytest.raises(Conflict):
            vendor.vendor_authorization(created.reservation_id, outcome="authorized")


def test_errors_not_found_forbidden_unauthorized_bad_request(sg, live):
    theirs = create(sg)
    with Client(live.url, live.key("p2")) as other:
        with pytest.raises(NotFound) as caught:
            other.get_reservation(theirs.reservation_id)  # another partner's: 404
        assert caught.value.code
    with Client(live.url, "sg_live_not_a_key") as nobody:
        with pytest.raises(Unauthorized):
            nobody.get_reservation(theirs.reservation_id)
    with pytest.raises(Forbidden):
        sg.audit(reservation_id=theirs.reservation_id)  # a partner is not ops
    with pytest.raises(BadRequest) as bad:
        sg.create_reservation(vendor_id="v-confirm", slot_start_time="yesterday",
                              slot_end_time=at(10), requester_id="r")
    assert bad.value.details  # which field
    with pytest.raises(BadRequest):
        sg.act(theirs.reservation_id, "extend", ttl_ms=1)
    with pytest.raises(ValueError):
        sg.act(theirs.reservation_id, "teleport")
    assert sg.get_reservation(theirs.reservation_id).state == "AWAITING_VENDOR_CONFIRMATION"  # nothing changed


def test_availability(sg):
    created = create(sg)
    read = sg.get_reservation(created.reservation_id)
    avail = sg.availability("v-confirm", start_time=read.slot_start_time,
                            end_time=read.slot_end_time, slot_duration=15,
                            include_confidence=True, resource_id=read.resource_id)
    assert isinstance(avail, schemas.Availability)
    assert avail.slots and all(not s.is_available for s in avail.slots)
    assert all(s.confidence is not None for s in avail.slots)


def test_ops_release_bulk_release_and_audit(live):
    with Client(live.url, live.key("p1")) as sg, Client(live.url, live.key("ops")) as ops:
        one, two, three = (create(sg) for _ in range(3))
        released = ops.release(one.reservation_id, reason="maintenance")
        assert released.state == "CANCELLED" or released.state.startswith("FAILED") \
            or released.state == "EXPIRED"
        bulk = ops.bulk_release(reason="closing", reservation_ids=[two.reservation_id,
                                                                   three.reservation_id,
                                                                   "rsv_0_missing"])
        assert isinstance(bulk, schemas.BulkReleaseResult)
        assert {r.reservation_id for r in bulk.released} == {two.reservation_id,
                                                              three.reservation_id}
        assert [f.reservation_id for f in bulk.failed] == ["rsv_0_missing"]
        page = ops.audit(limit=10)
        assert isinstance(page, schemas.AuditPage) and len(page.entries) <= 10


def test_admin_routes_and_a_revoked_key(live):
    with Client(live.url, live.key("admin")) as admin:
        partner = admin.create_partner("client-p", "Client P")
        assert partner == schemas.Partner(partner_id="client-p", name="Client P", active=True)
        vendor = admin.create_vendor("client-v", unit_minutes=15, confirmation_required=False,
                                     payment_required=False)
        assert vendor.vendor_id == "client-v" and not vendor.payment_required
        resource = admin.create_resource("client-v-room2", "client-v")
        assert resource.vendor_id == "client-v"
        issued = admin.create_key("partner", partner_id="client-p")
        assert issued.key and issued.role == "partner"
        with pytest.raises(Conflict):
            admin.create_partner("client-p")
        with Client(live.url, issued.key) as newcomer:
            start, end = slot()
            made = newcomer.create_reservation(vendor_id="client-v", slot_start_time=start,
                                               slot_end_time=end, requester_id="r",
                                               resource_id="client-v-room2")
            assert made.state in ("HELD", "AUTHORIZED_BOTH")
            revoked = admin.revoke_key(issued.key_id)
            assert revoked.revoked and revoked.key is msgspec.UNSET
            with pytest.raises(Unauthorized):
                # the server caches a resolved key for SLOTGUARD_API_KEY_CACHE_MS
                _eventually_unauthorized(newcomer, made.reservation_id)


def _eventually_unauthorized(client, rid):
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        client.get_reservation(rid)  # raises Unauthorized once the cache forgets the key
        time.sleep(0.2)


def test_health_metrics_and_openapi(live):
    with Client(live.url) as anon:
        assert anon.live().status == "live"
        ready = anon.ready()
        assert ready.status == "ready" and all(ready.checks.values())
        assert b"# TYPE" in anon.metrics()
        assert "/v1/reservations" in anon.openapi()["paths"]


async def test_async_client_walk_and_one_winner_among_concurrent_creates(live):
    start, end = slot()
    async with AsyncClient(live.url, live.key("p1")) as sg:
        results = await asyncio.gather(*(
            sg.create_reservation(vendor_id="v-instant", slot_start_time=start,
                                  slot_end_time=end, requester_id=f"r{i}")
            for i in range(8)), return_exceptions=True)
        winners = [r for r in results if isinstance(r, schemas.CreateReservationResponse)]
        losers = [r for r in results if isinstance(r, Conflict)]
        assert len(winners) == 1 and len(losers) == 7
        rid = winners[0].reservation_id
        assert winners[0].state == "AUTHORIZED_BOTH"  # instant and free: straight through
        committed = await sg.commit(rid)
        assert committed.state == "COMMIT_IN_PROGRESS"
        assert (await sg.get_reservation(rid)).state == "COMMIT_IN_PROGRESS"


@pytest.fixture
def live_worker():
    api = live_server.start(workers=1)  # lists read Postgres: the worker writes the rows
    yield api
    live_server.stop(api)


async def test_lists_with_cursors_typed_and_paged(live_worker):
    from api import schemas_lists
    from tests.timing import eventually

    live = live_worker

    with Client(live.url, live.key("p2")) as p2, Client(live.url, live.key("admin")) as admin:
        made = {create(p2, vendor="v-instant").reservation_id for _ in range(3)}

        async def listed() -> bool:
            rows = p2.list_reservations(limit=200).data
            return made <= {r.reservation_id for r in rows}

        await eventually(listed, timeout_s=90, what="the reservations drained and listed")
        first = p2.list_reservations(limit=2)
        assert isinstance(first, schemas_lists.ReservationList)
        assert len(first.data) == 2 and first.next_cursor
        second = p2.list_reservations(limit=2, starting_after=first.next_cursor)
        seen = [r.reservation_id for r in first.data + second.data]
        assert len(seen) == len(set(seen))  # no row twice
        walked = [row["reservationId"] for row in p2.pages("/v1/reservations", {"limit": 2})]
        assert made <= set(walked) and len(walked) == len(set(walked))
        assert all(r.partner_id == "p2" for r in first.data + second.data)
        partners = admin.list_partners(limit=200)
        assert {"p1", "p2"} <= {p.partner_id for p in partners.data}
        assert "v-confirm" in {v.vendor_id for v in admin.list_vendors(limit=200).data}
        keys = admin.list_keys(role="partner", partner_id="p2")
        assert keys.data and all(k.partner_id == "p2" for k in keys.data)
        assert live.key("p2") not in str(keys)
        with pytest.raises(BadRequest) as bad:
            p2.list_reservations(limit=0)
        assert bad.value.code
        with pytest.raises(BadRequest):
            p2.list_reservations(starting_after="not-a-cursor")
        assert isinstance(admin.list_bookings(limit=5), schemas_lists.BookingList)
