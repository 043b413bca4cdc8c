"""Dual authorization through the API against localstripe (issue 12): manual-capture
PaymentIntents, idempotency keys, declines, 3-D Secure waiting, bad input changing nothing."""

from __future__ import annotations

import pytest

from tests.conftest import snapshot
from tests.payments_fixtures import (  # noqa: F401  (fixtures)
    authenticate_3ds, card_method, localstripe_url, stripe_intent, stripe_proxy)
from tests.payments_world import (  # noqa: F401
    DEPOSIT, PRICE, authorize, authorized_both, hold, pay_app, pay_client, pay_world,
    state_of)
from tests.test_api_fixtures import api_settings, migrated, row_counts  # noqa: F401


async def test_dual_authorization_walks_to_authorized_both(pay_client, pay_world, pay_app,
                                                           localstripe_url):
    rid = await hold(pay_client, pay_world)
    body = await state_of(pay_client, pay_world, rid)
    assert body["state"] == "AWAITING_VENDOR_AUTH"
    r = await authorize(pay_client, pay_world, rid, "vendor")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "AWAITING_REQUESTER_AUTH"
    vendor_pi = body["paymentState"]["vendorPaymentIntentId"]
    assert body["paymentState"]["vendorPaymentIntentStatus"] == "requires_capture"
    r = await authorize(pay_client, pay_world, rid, "requester")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "AUTHORIZED_BOTH"
    ps = body["paymentState"]
    assert ps["requesterPaymentIntentStatus"] == "requires_capture"
    assert (ps["vendorAmount"], ps["requesterAmount"]) == (DEPOSIT, PRICE)
    # The intents as Stripe holds them: manual capture, the seed's metadata.
    vendor = await stripe_intent(localstripe_url, vendor_pi)
    assert vendor["capture_method"] == "manual" and vendor["amount"] == DEPOSIT
    assert vendor["metadata"] == {"reservation_id": rid, "partner_id": "p1", "attempt": "1",
                                  "role": "vendor"}
    requester = await stripe_intent(localstripe_url, ps["requesterPaymentIntentId"])
    assert requester["amount"] == PRICE and requester["status"] == "requires_capture"
    # Idempotency keys exactly as the seed gives them, recorded before the calls.
    async with pay_app.state.services.pool.acquire() as conn:
        keys = await conn.fetch("SELECT idempotency_key, intent_id FROM payment_intents "
                                "WHERE reservation_id = $1 ORDER BY role DESC", rid)
    assert [k[0] for k in keys] == [f"vendor-auth-{rid}-1", f"requester-auth-{rid}-1"]
    # GET shows the same paymentState.
    assert (await state_of(pay_client, pay_world, rid))["paymentState"] == ps


async def test_repeated_authorization_holds_money_once(pay_client, pay_world, stripe_proxy):
    rid = await hold(pay_client, pay_world)
    first = await authorize(pay_client, pay_world, rid, "vendor")
    assert first.status_code == 200
    again = await authorize(pay_client, pay_world, rid, "vendor")
    assert again.status_code == 409  # the reservation moved on: nothing created
    assert len(stripe_proxy.forwarded("POST", "/v1/payment_intents")) == 1


async def test_requester_decline_fails_and_releases_vendor(pay_client, pay_world,
                                                           localstripe_url):
    rid = await hold(pay_client, pay_world)
    r = await authorize(pay_client, pay_world, rid, "vendor")
    vendor_pi = r.json()["paymentState"]["vendorPaymentIntentId"]
    r = await authorize(pay_client, pay_world, rid, "requester",
                        pm="pm_card_chargeCustomerFail")
    assert r.status_code == 402, r.text
    error = r.json()["error"]
    assert error["code"] == "PAYMENT_DECLINED"
    assert error["details"]["state"] == "FAILED_REQUESTER_AUTH"
    body = await state_of(pay_client, pay_world, rid)
    assert body["state"] == "FAILED_REQUESTER_AUTH"
    assert (await stripe_intent(localstripe_url, vendor_pi))["status"] == "canceled"
    assert body["paymentState"]["vendorPaymentIntentStatus"] == "canceled"


async def test_vendor_decline_fails(pay_client, pay_world):
    rid = await hold(pay_client, pay_world)
    r = await authorize(pay_client, pay_world, rid, "vendor", pm="pm_card_chargeCustomerFail")
    assert r.status_code == 402 and r.json()["error"]["code"] == "PAYMENT_DECLINED"
    assert (await state_of(pay_client, pay_world, rid))["state"] == "FAILED_VENDOR_AUTH"


async def test_three_d_secure_waits_with_next_action(pay_client, pay_world, localstripe_url):
    rid = await hold(pay_client, pay_world)
    pm = await card_method(localstripe_url, "4000002760003184")
    r = await authorize(pay_client, pay_world, rid, "vendor", pm=pm)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["state"] == "AWAITING_VENDOR_AUTH"
    assert body["nextAction"]["type"] == "use_stripe_sdk"
    assert body["paymentState"]["vendorPaymentIntentStatus"] == "requires_action"
    # Asking again answers the same waiting intent, creating nothing.
    again = await authorize(pay_client, pay_world, rid, "vendor", pm=pm)
    assert again.status_code == 202
    assert again.json()["paymentState"]["vendorPaymentIntentId"] == \
        body["paymentState"]["vendorPaymentIntentId"]


@pytest.mark.parametrize("case", ["unknown_pm", "malformed_pm", "free_vendor", "wrong_role",
                                  "other_tenant", "outcome_on_paid", "both_fields"])
async def test_bad_authorizations_change_nothing(pay_client, pay_world, pay_app, redis,
                                                 stripe_proxy, case):
    pool = pay_app.state.services.pool
    prefix = pay_app.state.services.settings.key_prefix
    paid = await hold(pay_client, pay_world)
    free = await hold(pay_client, pay_world, vendor="v-free-confirm", start=48 * 60)
    r = await pay_client.post(f"/v1/reservations/{free}/vendor-confirmation",
                              headers=pay_world.auth("vendor-free"))
    assert r.status_code == 200, r.text
    before_redis = await snapshot(redis, prefix)
    before_pg = await row_counts(pool)
    calls = len(stripe_proxy.calls)
    url, key, body = {
        "unknown_pm": (f"/v1/reservations/{paid}/vendor-authorization", "vendor",
                       {"paymentMethodId": "pm_doesnotexist"}),
        "malformed_pm": (f"/v1/reservations/{paid}/vendor-authorization", "vendor",
                         {"paymentMethodId": "card_4242"}),
        "free_vendor": (f"/v1/reservations/{free}/vendor-authorization", "vendor-free",
                        {"paymentMethodId": "pm_card_visa"}),
        "wrong_role": (f"/v1/reservations/{paid}/vendor-authorization", "p1",
                       {"paymentMethodId": "pm_card_visa"}),
        "other_tenant": (f"/v1/reservations/{paid}/vendor-authorization", "vendor-late",
                         {"paymentMethodId": "pm_card_visa"}),
        "outcome_on_paid": (f"/v1/reservations/{paid}/vendor-authorization", "vendor",
                            {"outcome": "authorized"}),
        "both_fields": (f"/v1/reservations/{paid}/vendor-authorization", "vendor",
                        {"paymentMethodId": "pm_card_visa", "outcome": "authorized"}),
    }[case]
    r = await pay_client.post(url, headers=pay_world.auth(key), json=body)
    expected = {"unknown_pm": (400, "INVALID_PAYMENT_METHOD"),
                "malformed_pm": (400, "INVALID_PAYMENT_METHOD"),
                "free_vendor": (409, "PAYMENT_NOT_REQUIRED"),
                "wrong_role": (403, "FORBIDDEN"),
                "other_tenant": (404, "NOT_FOUND"),
                "outcome_on_paid": (400, "PAYMENT_METHOD_REQUIRED"),
                "both_fields": (400, "INVALID_OUTCOME")}[case]
    assert (r.status_code, r.json()["error"]["code"]) == expected, r.text
    after_redis = await snapshot(redis, prefix)
    # Rate-limit and cap bookkeeping aside, no key changed.
    changed = {k for k in set(before_redis) | set(after_redis)
               if before_redis.get(k) != after_redis.get(k)
               and ":rate" not in k and ":holds" not in k}
    assert changed == set()
    assert await row_counts(pool) == before_pg
    assert (await state_of(pay_client, pay_world, paid))["state"] == "AWAITING_VENDOR_AUTH"
    if case != "unknown_pm":  # refused before any provider call
        assert len(stripe_proxy.calls) == calls
    async with pool.acquire() as conn:
        held = await conn.fetchval("SELECT count(*) FROM payment_intents WHERE status NOT IN "
                                   "('failed', 'canceled')")
    assert held == 0


async def test_three_d_secure_completed_by_a_re_poll(pay_client, pay_world, localstripe_url):
    rid = await hold(pay_client, pay_world)
    pm = await card_method(localstripe_url, "4000002760003184")
    r = await authorize(pay_client, pay_world, rid, "vendor", pm=pm)
    assert r.status_code == 202
    pi = r.json()["paymentState"]["vendorPaymentIntentId"]
    await authenticate_3ds(localstripe_url, pi)  # no webhook arrives
    r = await authorize(pay_client, pay_world, rid, "vendor", pm=pm)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "AWAITING_REQUESTER_AUTH"
    assert r.json()["paymentState"]["vendorPaymentIntentId"] == pi


async def test_three_d_secure_failed_seen_by_a_re_poll(pay_client, pay_world, localstripe_url):
    rid = await hold(pay_client, pay_world)
    pm = await card_method(localstripe_url, "4000002760003184")
    r = await authorize(pay_client, pay_world, rid, "vendor", pm=pm)
    pi = r.json()["paymentState"]["vendorPaymentIntentId"]
    await authenticate_3ds(localstripe_url, pi, success=False)
    r = await authorize(pay_client, pay_world, rid, "vendor", pm=pm)
    assert r.status_code == 402, r.text
    assert r.json()["error"]["details"]["state"] == "FAILED_VENDOR_AUTH"


async def test_concurrent_authorizations_hold_money_once(pay_client, pay_world, stripe_proxy):
    import asyncio

    rid = await hold(pay_client, pay_world)
    answers = await asyncio.gather(*(authorize(pay_client, pay_world, rid, "vendor")
                                     for _ in range(4)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses.count(200) == 1 and set(statuses) <= {200, 409}, \
        [r.text for r in answers]
    assert len(stripe_proxy.forwarded("POST", "/v1/payment_intents")) == 1
    assert (await state_of(pay_client, pay_world, rid))["state"] == "AWAITING_REQUESTER_AUTH"
