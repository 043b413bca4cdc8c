"""Booking cancellation with refunds, and inbound Stripe webhooks (issue 12)."""

from __future__ import annotations

import hashlib
import hmac
import time

import orjson
import pytest

from tests.payments_fixtures import (  # noqa: F401  (fixtures)
    WEBHOOK_SECRET, authenticate_3ds, card_method, localstripe_url, stripe_intent,
    stripe_proxy)
from tests.payments_world import (  # noqa: F401
    DEPOSIT, PRICE, authorize, authorized_both, commit, drain, hold, pay_app, pay_client,
    pay_world, queue_for, state_of)
from tests.test_api_fixtures import api_settings, migrated, row_counts  # noqa: F401
from tests.test_payments_commit import intents, money


async def committed(client, world, app, **kw) -> tuple[str, str]:
    rid = await authorized_both(client, world, **kw)
    await commit(client, world, rid)
    await drain(queue_for(app))
    body = await state_of(client, world, rid)
    assert body["state"] == "COMMITTED"
    return rid, body["bookingId"]


@pytest.mark.parametrize("who,vendor,vendor_key,refunds", [
    ("p1", "v-pay", "vendor", (PRICE, DEPOSIT)),  # policy full, partner cancels
    ("vendor", "v-pay", "vendor", (PRICE, 0)),  # the vendor cancels: keeps no deposit back
    ("ops", "v-pay-none", "vendor-none", (0, DEPOSIT)),  # policy none
    ("p1", "v-pay-late", "vendor-late", (PRICE, DEPOSIT)),  # full_before 60 min: in time
])
async def test_cancel_booking_refunds_and_frees_the_slot(pay_client, pay_world, pay_app,
                                                         stripe_proxy, localstripe_url, who,
                                                         vendor, vendor_key, refunds):
    rid, booking = await committed(pay_client, pay_world, pay_app, vendor=vendor,
                                   vendor_key=vendor_key)
    vendor_pi, requester_pi = await intents(pay_client, pay_world, rid)
    key = {"vendor": vendor_key}.get(who, who)
    r = await pay_client.post(f"/v1/bookings/{booking}/cancel", headers=pay_world.auth(key),
                              json={"reason": "plans changed"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["requesterRefundAmount"], body["vendorRefundAmount"]) == refunds
    assert body["reason"] == "plans changed"
    assert (await money(localstripe_url, requester_pi))[1] == PRICE - refunds[0]
    assert (await money(localstripe_url, vendor_pi))[1] == DEPOSIT - refunds[1]
    async with pay_app.state.services.pool.acquire() as conn:
        assert await conn.fetchval("SELECT cancelled_at IS NOT NULL FROM bookings "
                                   "WHERE id = $1", booking)
        assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE action = "
                                   "'booking.cancelled' AND reservation_id = $1", rid) == 1
    # Direct charges: every call on the requester's intent of a vendor with a connected
    # account carries Stripe-Account; the deposit is a platform charge.
    account = "acct_1vendor" if vendor == "v-pay-late" else None
    on_requester = [c for c in stripe_proxy.calls if requester_pi in c.path]
    on_vendor = [c for c in stripe_proxy.calls if vendor_pi in c.path]
    assert on_requester and {c.account for c in on_requester} == {account}
    assert on_vendor and {c.account for c in on_vendor} == {None}
    refund_calls = [c for c in stripe_proxy.calls if c.path == "/v1/refunds"]
    assert sorted(c.idempotency_key for c in refund_calls) == sorted(
        k for k, amount in ((f"requester-refund-{rid}-1", refunds[0]),
                            (f"vendor-refund-{rid}-1", refunds[1])) if amount)
    refunds_made = len(stripe_proxy.forwarded("POST", "/v1/refunds"))
    # Idempotent: the same answer, no second refund.
    again = await pay_client.post(f"/v1/bookings/{booking}/cancel",
                                  headers=pay_world.auth(key))
    assert again.status_code == 200 and again.json() == body
    assert len(stripe_proxy.forwarded("POST", "/v1/refunds")) == refunds_made
    # Events out (issue 14): one booking.cancelled in the outbox, through the commit queue,
    # with the booking and its refunds; the reservation is CANCELLED in both stores.
    await drain(queue_for(pay_app))
    async with pay_app.state.services.pool.acquire() as conn:
        events = await conn.fetch("SELECT payload FROM webhook_events WHERE reservation_id = $1"
                                  " AND type = 'booking.cancelled'", rid)
        assert await conn.fetchval("SELECT state FROM reservations WHERE id = $1",
                                   rid) == "CANCELLED"
    assert len(events) == 1
    payload = events[0]["payload"]
    data = (orjson.loads(payload) if isinstance(payload, str) else payload)["data"]
    assert (data["bookingId"], data["state"], data["reason"]) == (
        booking, "CANCELLED", "plans changed")
    assert (data["requesterRefundAmount"], data["vendorRefundAmount"]) == refunds
    assert (await state_of(pay_client, pay_world, rid))["state"] == "CANCELLED"
    # Replay (issue 17) agrees: audit, history, snapshot, booking and Redis record.
    from engine import parity
    from engine.errors import NotFound

    async def read(reservation_id):
        try:
            return await pay_app.state.services.reservations.engine.get(reservation_id)
        except NotFound:
            return None

    report = await parity.replay(pay_app.state.services.pool, read, rid)
    assert (report["summary"]["rebuiltState"], report["summary"]["drift"]) == (
        "CANCELLED", 0), report
    # The slot can be held and booked again (the exclusion constraint allows it).
    second = await hold(pay_client, pay_world, vendor=vendor, partner="p2")
    r = await authorize(pay_client, pay_world, second, "vendor", key=vendor_key)
    assert r.status_code == 200
    r = await pay_client.post(f"/v1/reservations/{second}/requester-authorization",
                              headers=pay_world.auth("p2"), json={"paymentMethodId":
                                                                  "pm_card_visa"})
    assert r.status_code == 200
    await commit(pay_client, pay_world, second, partner="p2")
    await drain(queue_for(pay_app))
    assert (await state_of(pay_client, pay_world, second))["state"] == "COMMITTED"


async def test_full_before_past_the_cutoff_refunds_no_price(pay_client, pay_world, pay_app,
                                                            localstripe_url):
    from engine import clock

    rid, booking = await committed(pay_client, pay_world, pay_app, vendor="v-pay-late",
                                   vendor_key="vendor-late")
    _, requester_pi = await intents(pay_client, pay_world, rid)
    slot = await state_of(pay_client, pay_world, rid)
    from engine.times import parse_time

    start_ms = parse_time(slot["slotStartTime"], "slotStartTime")
    with clock.use(clock.ManualClock(start_ms - 30 * 60_000)):  # 30 min before: past 60
        r = await pay_client.post(f"/v1/bookings/{booking}/cancel",
                                  headers=pay_world.auth("p1"))
    assert r.status_code == 200, r.text
    assert (r.json()["requesterRefundAmount"], r.json()["vendorRefundAmount"]) == (0, DEPOSIT)
    assert (await money(localstripe_url, requester_pi))[1] == PRICE


async def test_cancel_booking_refusals_change_nothing(pay_client, pay_world, pay_app):
    rid, booking = await committed(pay_client, pay_world, pay_app)
    pool = pay_app.state.services.pool
    before = await row_counts(pool)
    for key, booking_id, status in [("p2", booking, 404), ("vendor-late", booking, 404),
                                    ("p1", "bkg_nope", 404)]:
        r = await pay_client.post(f"/v1/bookings/{booking_id}/cancel",
                                  headers=pay_world.auth(key))
        assert r.status_code == status, r.text
    r = await pay_client.post(f"/v1/bookings/{booking}/cancel", headers=pay_world.auth("p1"),
                              json={"reason": "x" * 300})
    assert r.status_code == 400
    r = await pay_client.post(f"/v1/bookings/{booking}/cancel", headers=pay_world.auth("p1"),
                              json={"unknown": 1})
    assert r.status_code == 400
    assert await row_counts(pool) == before
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM booking_cancellations") == 0
        assert await conn.fetchval("SELECT cancelled_at FROM bookings WHERE id = $1",
                                   booking) is None


def signed(event: dict, secret: str = WEBHOOK_SECRET) -> tuple[bytes, str]:
    payload = orjson.dumps(event)
    t = int(time.time())
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return payload, f"t={t},v1={mac}"


async def test_three_d_secure_completed_by_signed_webhook(pay_client, pay_world, pay_app,
                                                          localstripe_url):
    rid = await hold(pay_client, pay_world)
    pm = await card_method(localstripe_url, "4000002760003184")
    r = await authorize(pay_client, pay_world, rid, "vendor", pm=pm)
    assert r.status_code == 202
    pi = r.json()["paymentState"]["vendorPaymentIntentId"]
    intent = await authenticate_3ds(localstripe_url, pi)  # the payer passes 3-D Secure
    assert intent["status"] == "requires_capture"
    event = {"id": "evt_3ds_1", "object": "event",
             "type": "payment_intent.amount_capturable_updated",
             "data": {"object": intent}}
    payload, signature = signed(event)
    r = await pay_client.post("/v1/stripe/webhook", content=payload,
                              headers={"Stripe-Signature": signature,
                                       "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["result"] == "authorized"
    body = await state_of(pay_client, pay_world, rid)
    assert body["state"] == "AWAITING_REQUESTER_AUTH"
    assert body["paymentState"]["vendorPaymentIntentStatus"] == "requires_capture"
    # The same event again is applied once.
    r = await pay_client.post("/v1/stripe/webhook", content=payload,
                              headers={"Stripe-Signature": signature})
    assert r.json()["result"] == "duplicate"
    # And the reservation goes on to COMMITTED with the 3-D Secure deposit captured.
    r = await authorize(pay_client, pay_world, rid, "requester")
    assert r.status_code == 200
    await commit(pay_client, pay_world, rid)
    await drain(queue_for(pay_app))
    assert (await state_of(pay_client, pay_world, rid))["state"] == "COMMITTED"
    assert await money(localstripe_url, pi) == ("succeeded", DEPOSIT)


async def test_three_d_secure_failure_by_webhook(pay_client, pay_world, localstripe_url):
    rid = await hold(pay_client, pay_world)
    pm = await card_method(localstripe_url, "4000002760003184")
    r = await authorize(pay_client, pay_world, rid, "vendor", pm=pm)
    pi = r.json()["paymentState"]["vendorPaymentIntentId"]
    intent = await authenticate_3ds(localstripe_url, pi, success=False)
    payload, signature = signed({"id": "evt_3ds_2", "type": "payment_intent.payment_failed",
                                 "data": {"object": intent}})
    r = await pay_client.post("/v1/stripe/webhook", content=payload,
                              headers={"Stripe-Signature": signature})
    assert r.status_code == 200 and r.json()["result"] == "failed"
    assert (await state_of(pay_client, pay_world, rid))["state"] == "FAILED_VENDOR_AUTH"


async def test_forged_webhook_refused_and_unknown_acknowledged(pay_client, pay_world, pay_app,
                                                               localstripe_url):
    rid = await hold(pay_client, pay_world)
    pm = await card_method(localstripe_url, "4000002760003184")
    r = await authorize(pay_client, pay_world, rid, "vendor", pm=pm)
    pi = r.json()["paymentState"]["vendorPaymentIntentId"]
    forged_intent = {**(await stripe_intent(localstripe_url, pi)), "status": "requires_capture"}
    event = {"id": "evt_forged", "type": "payment_intent.amount_capturable_updated",
             "data": {"object": forged_intent}}
    pool = pay_app.state.services.pool
    for payload, signature in [signed(event, secret="whsec_wrong"),
                               (orjson.dumps(event), "t=1,v1=00"),
                               (orjson.dumps(event), None)]:
        headers = {"Stripe-Signature": signature} if signature else {}
        r = await pay_client.post("/v1/stripe/webhook", content=payload, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "INVALID_WEBHOOK_SIGNATURE"
    # A body changed after signing.
    payload, signature = signed(event)
    r = await pay_client.post("/v1/stripe/webhook", content=payload.replace(b"evt_", b"evx_"),
                              headers={"Stripe-Signature": signature})
    assert r.status_code == 400
    assert (await state_of(pay_client, pay_world, rid))["state"] == "AWAITING_VENDOR_AUTH"
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM stripe_events") == 0
    payload, signature = signed({"id": "evt_other", "type": "customer.created",
                                 "data": {"object": {}}})
    r = await pay_client.post("/v1/stripe/webhook", content=payload,
                              headers={"Stripe-Signature": signature})
    assert r.status_code == 200 and r.json()["result"] == "ignored"


async def test_cancel_after_the_record_is_gone_emits_once(pay_client, pay_world, pay_app):
    """A booking cancelled after its reservation's Redis record expired (retention): the
    cancellation is recorded at the version Postgres expects next, and a repeated script
    call (a crash and retry) adds no second event."""
    rid, booking = await committed(pay_client, pay_world, pay_app)
    svc = pay_app.state.services
    keys = svc.reservations.engine.keys
    async with svc.pool.acquire() as conn:
        committed_version = await conn.fetchval("SELECT version FROM reservations WHERE id = $1",
                                                rid)
    await svc.redis.delete(keys.reservation(rid), keys.history(rid))
    r = await pay_client.post(f"/v1/bookings/{booking}/cancel", headers=pay_world.auth("p1"))
    assert r.status_code == 200, r.text
    await drain(queue_for(pay_app))
    async with svc.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT id, resource_id, block_start, block_end, "
                                  "reservation_id FROM bookings WHERE id = $1", booking)
        cancellation = await conn.fetchrow("SELECT * FROM booking_cancellations "
                                           "WHERE booking_id = $1", booking)
    await svc.extra["bookings"]._free_units(row, cancellation)  # the retry of a crash
    await drain(queue_for(pay_app))
    async with svc.pool.acquire() as conn:
        versions = [r[0] for r in await conn.fetch(
            "SELECT version FROM webhook_events WHERE reservation_id = $1 AND type = "
            "'booking.cancelled'", rid)]
        state = await conn.fetchrow("SELECT state, version FROM reservations WHERE id = $1", rid)
    assert versions == [committed_version + 1]
    assert (state["state"], state["version"]) == ("CANCELLED", committed_version + 1)
