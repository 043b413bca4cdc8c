"""The partner flows of benchmarks/locustfile.py against a live API (``slotguard serve``
on a free port, real Redis and Postgres). Locust itself is not run here."""

from __future__ import annotations

import random

import pytest

from benchmarks import locustfile
from slotguard.client import Client, Conflict
from tests import live_server


@pytest.fixture(scope="module")
def live():
    api = live_server.start()
    yield api
    live_server.stop(api)


@pytest.fixture
def clients(live):
    with Client(live.url, live.key("p1")) as p1:
        yield p1, p1.with_key(live.key("p2")), p1.with_key(live.key("vendor"))


def slots(seed: int) -> locustfile.Slots:
    return locustfile.Slots(unit_minutes=15, days_ahead=3 + seed, rng=random.Random(seed))


def test_walk_reaches_the_commit_queue_and_without_a_vendor_key_cancels(clients):
    partner, _, vendor = clients
    picker = slots(1)
    done = locustfile.walk(partner, vendor, "v-confirm", picker.pick())
    assert done.state == "COMMIT_IN_PROGRESS"
    history = [t.to_state for t in partner.get_reservation(done.reservation_id).state_history]
    assert history[0] == "HELD" or history[0] == "INTENT_CREATED"
    assert "CONFIRMED_BY_VENDOR" in history and history[-1] == "COMMIT_IN_PROGRESS"
    undone = locustfile.walk(partner, None, "v-confirm", picker.pick())
    assert undone.state == "CANCELLED"


def test_conflict_gives_one_winner_and_a_typed_409_then_frees_the_slot(clients):
    p1, p2, _ = clients
    slot = slots(2).pick()
    won, lost = locustfile.conflict(p1, p2, "v-confirm", slot)
    assert isinstance(lost, Conflict) and lost.status == 409 and lost.request_id
    assert p1.get_reservation(won.reservation_id).state == "CANCELLED"
    # The slot is free again: the loser can have it now.
    again = p2.create_reservation(vendor_id="v-confirm", slot_start_time=slot[0],
                                  slot_end_time=slot[1], requester_id="r")
    assert again.state == "AWAITING_VENDOR_CONFIRMATION"
    # And a walk on a taken slot is a lost race, not an error.
    assert locustfile.walk(p1, None, "v-confirm", slot) is None
    assert locustfile.create_cancel(p1, "v-confirm", slot) is None


def test_create_cancel_and_slots_stay_on_the_grid(clients):
    partner, _, _ = clients
    picker = slots(3)
    for _ in range(20):
        start, end = picker.pick()
        assert start.endswith(("00:00Z", "15:00Z", "30:00Z", "45:00Z"))
    cancelled = locustfile.create_cancel(partner, "v-instant", picker.pick())
    assert cancelled.state == "CANCELLED"
