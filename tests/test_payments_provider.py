"""The Stripe provider against localstripe, through our fault proxy (issue 12)."""

from __future__ import annotations

import pytest

from engine.payments.provider import Declined, InvalidMethod, Retryable
from tests.payments_fixtures import (  # noqa: F401  (fixtures)
    card_method, localstripe_url, provider, stripe_intent, stripe_proxy)


async def test_authorize_capture_refund(provider, localstripe_url):
    intent = await provider.authorize(amount=1500, currency="usd", payment_method="pm_card_visa",
                                      metadata={"reservation_id": "rsv_x"},
                                      idempotency_key="vendor-auth-rsv_x-1",
                                      stripe_account=None)
    assert intent.status == "requires_capture" and intent.amount == 1500
    captured = await provider.capture(intent.id, idempotency_key="vendor-capture-rsv_x-1",
                                      stripe_account=None)
    assert captured.status == "succeeded"
    refund_id = await provider.refund(intent.id, amount=1500, idempotency_key="r-1",
                                      stripe_account=None, metadata={})
    assert refund_id.startswith("re_")
    assert (await stripe_intent(localstripe_url, intent.id))["metadata"] == \
        {"reservation_id": "rsv_x"}


async def test_errors_are_classified(provider, stripe_proxy, localstripe_url):
    with pytest.raises(Declined):
        await provider.authorize(amount=100, currency="usd",
                                 payment_method="pm_card_chargeCustomerFail", metadata={},
                                 idempotency_key="k1", stripe_account=None)
    with pytest.raises(InvalidMethod):
        await provider.authorize(amount=100, currency="usd", payment_method="pm_nope",
                                 metadata={}, idempotency_key="k2", stripe_account=None)
    stripe_proxy.add("POST", "/v1/payment_intents", "fail")
    with pytest.raises(Retryable):
        await provider.authorize(amount=100, currency="usd", payment_method="pm_card_visa",
                                 metadata={}, idempotency_key="k3", stripe_account=None)
    stripe_proxy.add("POST", "/v1/payment_intents", "drop")
    with pytest.raises(Retryable):
        await provider.authorize(amount=100, currency="usd", payment_method="pm_card_visa",
                                 metadata={}, idempotency_key="k4", stripe_account=None)
    three_ds = await card_method(localstripe_url, "4000002760003184")
    intent = await provider.authorize(amount=100, currency="usd", payment_method=three_ds,
                                      metadata={}, idempotency_key="k5", stripe_account=None)
    assert intent.status == "requires_action" and intent.next_action
