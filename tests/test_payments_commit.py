"""Capture at commit and the compensation matrix (issue 12), against localstripe behind our
fault proxy: the seed's order (revalidate, capture vendor, capture requester, booking +
COMMITTED), rows 7a/7b/7c, retries on retryable errors only, a lost answer, a redelivered
commit. Invariants checked on every path: never money captured without a booking, never a
booking whose money failed, never a capture twice."""

from __future__ import annotations

import pytest

from tests.payments_fixtures import (  # noqa: F401  (fixtures)
    localstripe_url, stripe_intent, stripe_proxy)
from tests.payments_world import (  # noqa: F401
    DEPOSIT, PRICE, authorized_both, commit, drain, hold, pay_app, pay_client, pay_world,
    queue_for, state_of)
from tests.test_api_fixtures import api_settings, migrated  # noqa: F401


async def intents(client, world, rid) -> tuple[str, str]:
    ps = (await state_of(client, world, rid))["paymentState"]
    return ps["vendorPaymentIntentId"], ps["requesterPaymentIntentId"]


async def money(localstripe_url, intent_id) -> tuple[str, int]:
    """(status, captured and not refunded) of an intent at the provider."""
    intent = await stripe_intent(localstripe_url, intent_id)
    charge = intent.get("latest_charge")
    if isinstance(charge, str):
        import httpx

        from tests.payments_fixtures import API_KEY

        async with httpx.AsyncClient(auth=(API_KEY, "")) as c:
            charge = (await c.get(f"{localstripe_url}/v1/charges/{charge}")).json()
    held = 0
    if charge and charge.get("captured"):
        held = charge["amount"] - (charge.get("amount_refunded") or 0)
    return intent["status"], held


async def booking_of(app, rid):
    async with app.state.services.pool.acquire() as conn:
        return await conn.fetchrow("SELECT id, cancelled_at FROM bookings "
                                   "WHERE reservation_id = $1", rid)


async def audit_actions(app, rid) -> list[str]:
    async with app.state.services.pool.acquire() as conn:
        return [r[0] for r in await conn.fetch(
            "SELECT action FROM audit_log WHERE reservation_id = $1 ORDER BY id", rid)]


def capture_path(intent_id: str) -> str:
    return f"/v1/payment_intents/{intent_id}/capture"


async def test_commit_captures_both_then_books(pay_client, pay_world, pay_app, stripe_proxy,
                                               localstripe_url):
    rid = await authorized_both(pay_client, pay_world)
    vendor_pi, requester_pi = await intents(pay_client, pay_world, rid)
    await commit(pay_client, pay_world, rid)
    await drain(queue_for(pay_app))
    body = await state_of(pay_client, pay_world, rid)
    assert body["state"] == "COMMITTED" and body["bookingId"]
    assert await booking_of(pay_app, rid) is not None
    assert await money(localstripe_url, vendor_pi) == ("succeeded", DEPOSIT)
    assert await money(localstripe_url, requester_pi) == ("succeeded", PRICE)
    for pi in (vendor_pi, requester_pi):  # the seed's external reference after commit
        assert (await stripe_intent(localstripe_url, pi))["metadata"]["booking_id"] == \
            body["bookingId"]
    captures = [c.path for c in stripe_proxy.calls if c.path.endswith("/capture")]
    assert captures == [capture_path(vendor_pi), capture_path(requester_pi)]  # seed's order
    ps = body["paymentState"]
    assert (ps["vendorCaptureAttempts"], ps["requesterCaptureAttempts"]) == (1, 1)
    async with pay_app.state.services.pool.acquire() as conn:
        keys = [r[0] for r in await conn.fetch(
            "SELECT idempotency_key FROM payment_calls WHERE reservation_id = $1 AND "
            "operation = 'capture' ORDER BY id", rid)]
    assert keys == [f"vendor-capture-{rid}-1", f"requester-capture-{rid}-1"]


async def test_retryable_capture_error_is_retried_once_more(pay_client, pay_world, pay_app,
                                                            stripe_proxy, localstripe_url):
    rid = await authorized_both(pay_client, pay_world)
    vendor_pi, _ = await intents(pay_client, pay_world, rid)
    stripe_proxy.add("POST", capture_path(vendor_pi), "fail", times=2)
    await commit(pay_client, pay_world, rid)
    await drain(queue_for(pay_app))
    body = await state_of(pay_client, pay_world, rid)
    assert body["state"] == "COMMITTED"
    assert body["paymentState"]["vendorCaptureAttempts"] == 3
    assert len(stripe_proxy.forwarded("POST", capture_path(vendor_pi))) == 1
    assert await money(localstripe_url, vendor_pi) == ("succeeded", DEPOSIT)


async def test_lost_capture_answer_is_looked_up_not_captured_again(
        pay_client, pay_world, pay_app, stripe_proxy, localstripe_url):
    rid = await authorized_both(pay_client, pay_world)
    vendor_pi, requester_pi = await intents(pay_client, pay_world, rid)
    # localstripe captures, the answer never reaches us.
    stripe_proxy.add("POST", capture_path(vendor_pi), "lose")
    await commit(pay_client, pay_world, rid)
    await drain(queue_for(pay_app))
    assert (await state_of(pay_client, pay_world, rid))["state"] == "COMMITTED"
    assert len(stripe_proxy.forwarded("POST", capture_path(vendor_pi))) == 1
    assert await money(localstripe_url, vendor_pi) == ("succeeded", DEPOSIT)
    assert await money(localstripe_url, requester_pi) == ("succeeded", PRICE)


@pytest.mark.parametrize("row", ["7a", "7a-card", "7b", "7c"])
async def test_compensation_matrix(pay_client, pay_world, pay_app, stripe_proxy,
                                   localstripe_url, row):
    rid = await authorized_both(pay_client, pay_world)
    vendor_pi, requester_pi = await intents(pay_client, pay_world, rid)
    if row in ("7a", "7c"):
        stripe_proxy.add("POST", capture_path(vendor_pi), "fail", times=None)
    if row == "7a-card":
        stripe_proxy.add("POST", capture_path(vendor_pi), "fail", times=None, status=402)
    if row in ("7b", "7c"):
        stripe_proxy.add("POST", capture_path(requester_pi), "fail", times=None)
    await commit(pay_client, pay_world, rid)
    await drain(queue_for(pay_app))
    body = await state_of(pay_client, pay_world, rid)
    assert body["state"] == "FAILED_COMMIT", body
    assert await booking_of(pay_app, rid) is None  # never a booking whose money failed
    vendor, requester = (await money(localstripe_url, vendor_pi),
                         await money(localstripe_url, requester_pi))
    # Never money captured without a booking.
    assert vendor[1] == 0 and requester[1] == 0
    if row == "7b":  # the vendor's deposit was captured, then refunded
        assert vendor[0] == "succeeded"
        assert len(stripe_proxy.forwarded("POST", "/v1/refunds")) == 1
    else:
        assert vendor[0] == "canceled"
        assert not stripe_proxy.forwarded("POST", "/v1/refunds")
    assert requester[0] == "canceled"
    attempts = {"7a": 5, "7a-card": 1, "7b": 1, "7c": 5}[row]
    assert body["paymentState"]["vendorCaptureAttempts"] == attempts  # never card errors
    if row != "7b":  # the requester is never captured when the vendor's capture failed
        assert not [c for c in stripe_proxy.calls if c.path == capture_path(requester_pi)]
    assert body["paymentState"]["lastCaptureError"]
    actions = await audit_actions(pay_app, rid)
    assert "payment.compensation" in actions and "reservation.failed_commit" in actions
    # The units are free again.
    again = await hold(pay_client, pay_world, partner="p2")
    assert again != rid


async def test_redelivered_commit_captures_once(pay_client, pay_world, pay_app, stripe_proxy,
                                                localstripe_url):
    rid = await authorized_both(pay_client, pay_world)
    vendor_pi, requester_pi = await intents(pay_client, pay_world, rid)
    await commit(pay_client, pay_world, rid)
    queue = queue_for(pay_app)
    await queue.ensure_groups()
    shard = pay_app.state.services.keyspace.shard_of_id(rid)
    entries = await queue.read_new(shard)
    assert entries
    await queue.process(shard, entries)
    assert (await state_of(pay_client, pay_world, rid))["state"] == "COMMITTED"
    # The same entries again (a redelivery after an unacknowledged batch).
    await queue.process(shard, entries)
    await queue_for(pay_app, "other").process(shard, entries)
    body = await state_of(pay_client, pay_world, rid)
    assert body["state"] == "COMMITTED"
    for pi in (vendor_pi, requester_pi):
        assert len(stripe_proxy.forwarded("POST", capture_path(pi))) == 1
    assert body["paymentState"]["vendorCaptureAttempts"] == 1
    assert await money(localstripe_url, requester_pi) == ("succeeded", PRICE)


async def test_free_vendor_commits_without_payments(pay_client, pay_world, pay_app,
                                                    stripe_proxy):
    rid = await hold(pay_client, pay_world, vendor="v-free")
    r = await pay_client.post(f"/v1/reservations/{rid}/commit", headers=pay_world.auth("p1"))
    assert r.status_code == 202, r.text
    await drain(queue_for(pay_app))
    body = await state_of(pay_client, pay_world, rid)
    assert body["state"] == "COMMITTED" and "paymentState" not in body
    assert stripe_proxy.calls == []


async def test_paying_reservation_without_authorizations_never_books(
        pay_client, pay_world, pay_app, stripe_proxy):
    """Steps moved past the payment API (the engine called directly): the worker finds no
    authorization for a paying reservation and fails it instead of booking it free."""
    engine = pay_app.state.services.reservations.engine
    rid = await hold(pay_client, pay_world)
    await engine.act(rid, "vendor-authorization", actor="system")
    await engine.act(rid, "requester-authorization", actor="system")
    await commit(pay_client, pay_world, rid)
    await drain(queue_for(pay_app))
    body = await state_of(pay_client, pay_world, rid)
    assert body["state"] == "FAILED_COMMIT"
    assert body["stateHistory"][-1]["reason"] == "authorization_missing"
    assert await booking_of(pay_app, rid) is None
    assert stripe_proxy.calls == []


async def test_compensation_outlasting_the_provider_is_held_then_finished(
        pay_client, pay_world, pay_app, stripe_proxy, localstripe_url):
    """7b while refunds fail too: the batch is held as an outage (nothing acknowledged, no
    booking, the deposit captured and recorded), and the next delivery finishes the same
    decision: one refund, FAILED_COMMIT."""
    from jobs.commit_queue import PaymentProviderUnreachable, is_outage

    rid = await authorized_both(pay_client, pay_world)
    vendor_pi, requester_pi = await intents(pay_client, pay_world, rid)
    stripe_proxy.add("POST", capture_path(requester_pi), "fail", times=None)
    stripe_proxy.add("POST", "/v1/refunds", "fail", times=None)
    await commit(pay_client, pay_world, rid)
    queue = queue_for(pay_app)
    await queue.ensure_groups()
    shard = pay_app.state.services.keyspace.shard_of_id(rid)
    entries = await queue.read_new(shard)
    with pytest.raises(PaymentProviderUnreachable) as caught:
        await queue.process(shard, entries)
    assert is_outage(caught.value)
    assert (await state_of(pay_client, pay_world, rid))["state"] == "COMMIT_IN_PROGRESS"
    assert await booking_of(pay_app, rid) is None
    assert await money(localstripe_url, vendor_pi) == ("succeeded", DEPOSIT)
    stripe_proxy.rules.clear()  # Stripe is back
    await queue.process(shard, entries)
    body = await state_of(pay_client, pay_world, rid)
    assert body["state"] == "FAILED_COMMIT"
    assert await money(localstripe_url, vendor_pi) == ("succeeded", 0)  # refunded
    assert await money(localstripe_url, requester_pi) == ("canceled", 0)
    assert len(stripe_proxy.forwarded("POST", "/v1/refunds")) == 1
    assert not stripe_proxy.forwarded("POST", capture_path(requester_pi))
