"""Authorization lifetime (issue 12): no capture past the capture window; reconciliation
cancels authorizations that outlived their reservation and stale ones."""

from __future__ import annotations

from engine import clock
from engine.payments.orchestrator import PaymentOrchestrator, reservation_state
from tests.payments_fixtures import (  # noqa: F401  (fixtures)
    localstripe_url, stripe_intent, stripe_proxy)
from tests.payments_world import (  # noqa: F401
    authorize, authorized_both, commit, drain, hold, pay_app, pay_client, pay_world,
    queue_for, state_of)
from tests.test_api_fixtures import api_settings, migrated  # noqa: F401
from tests.test_payments_commit import intents, money

WEEK_MS = 7 * 86_400_000


async def test_commit_past_the_capture_window_is_refused(pay_client, pay_world, pay_app,
                                                         stripe_proxy, localstripe_url):
    rid = await authorized_both(pay_client, pay_world)
    vendor_pi, requester_pi = await intents(pay_client, pay_world, rid)
    await commit(pay_client, pay_world, rid)
    with clock.use(clock.ManualClock(clock.now_ms() + WEEK_MS)):
        await drain(queue_for(pay_app))
    body = await state_of(pay_client, pay_world, rid)
    assert body["state"] == "FAILED_COMMIT"
    assert body["stateHistory"][-1]["reason"] == "authorization_expired"
    assert not [c for c in stripe_proxy.calls if c.path.endswith("/capture")]
    assert await money(localstripe_url, vendor_pi) == ("canceled", 0)
    assert await money(localstripe_url, requester_pi) == ("canceled", 0)


def orchestrator_of(app) -> PaymentOrchestrator:
    svc = app.state.services
    return PaymentOrchestrator(svc.extra["payment_provider"], svc.pool,
                               svc.reservations.engine, svc.settings)


async def test_reconciliation_cancels_orphaned_and_stale_authorizations(
        pay_client, pay_world, pay_app, localstripe_url):
    svc = pay_app.state.services
    orchestrator = orchestrator_of(pay_app)
    state_fn = reservation_state(svc.reservations.engine, svc.pool)
    # The partner cancels after the vendor's deposit was authorized: released at once.
    cancelled = await hold(pay_client, pay_world, start=5 * 24 * 60)
    r = await authorize(pay_client, pay_world, cancelled, "vendor")
    cancelled_pi = r.json()["paymentState"]["vendorPaymentIntentId"]
    r = await pay_client.post(f"/v1/reservations/{cancelled}/cancel",
                              headers=pay_world.auth("p1"))
    assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
    assert (await stripe_intent(localstripe_url, cancelled_pi))["status"] == "canceled"
    # Orphaned: ops release the hold (no payment step on that path): reconciliation finds it.
    orphan = await hold(pay_client, pay_world)
    r = await authorize(pay_client, pay_world, orphan, "vendor")
    orphan_pi = r.json()["paymentState"]["vendorPaymentIntentId"]
    # Live and fresh: left alone.
    live = await hold(pay_client, pay_world, start=3 * 24 * 60)
    r = await authorize(pay_client, pay_world, live, "vendor")
    live_pi = r.json()["paymentState"]["vendorPaymentIntentId"]
    r = await pay_client.post(f"/v1/ops/reservations/{orphan}/release",
                              headers=pay_world.auth("ops"), json={"reason": "test"})
    assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
    assert (await stripe_intent(localstripe_url, orphan_pi))["status"] == "requires_capture"
    report = await orchestrator.release_orphans(state_fn)
    assert report == {"released": 1, "stale": 0}
    assert (await stripe_intent(localstripe_url, orphan_pi))["status"] == "canceled"
    assert (await stripe_intent(localstripe_url, live_pi))["status"] == "requires_capture"
    assert await orchestrator.release_orphans(state_fn) == {"released": 0, "stale": 0}
    # Stale: past the capture window, the authorization is cancelled and so is the hold.
    with clock.use(clock.ManualClock(clock.now_ms() + WEEK_MS)):
        report = await orchestrator.release_orphans(state_fn)
    assert report == {"released": 1, "stale": 1}
    assert (await stripe_intent(localstripe_url, live_pi))["status"] == "canceled"
    assert (await state_of(pay_client, pay_world, live))["state"] == "CANCELLED"
