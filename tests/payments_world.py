"""The payment tests' app and world (issue 12): the API with the Stripe provider pointed at
the fault proxy in front of localstripe, a paying vendor (instant confirmation, so a new
reservation waits at AWAITING_VENDOR_AUTH), a free one, keys per role, and a commit queue
with the payment orchestrator (the test drains it when it wants to)."""

from __future__ import annotations

import asyncio

import pytest

from api.app import create_app
from api.auth import issue_key
from engine import directory
from engine.payments.orchestrator import PaymentOrchestrator
from engine.payments.terms import PaymentTerms
from jobs.commit_queue import CommitQueue
from tests.conftest import delete_prefix
from tests.payments_fixtures import API_KEY, WEBHOOK_SECRET
from tests.test_api_fixtures import World, at

PRICE, DEPOSIT = 5_000, 1_000


@pytest.fixture
async def pay_app(migrated, redis, stripe_proxy):
    settings = migrated.replace(stripe_api_key=API_KEY, stripe_api_base=stripe_proxy.url,
                                stripe_webhook_secret=WEBHOOK_SECRET,
                                payment_retry_base_ms=5, payment_retry_max_ms=40)
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        await application.state.services.reservations.engine.mark_ready()
        yield application
    await delete_prefix(redis, migrated.key_prefix)


@pytest.fixture
async def pay_client(pay_app):
    import httpx

    transport = httpx.ASGITransport(app=pay_app, client=("10.0.0.2", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://slotguard.test") as c:
        yield c


@pytest.fixture
async def pay_world(pay_app) -> World:
    world = World()
    svc = pay_app.state.services
    async with svc.pool.acquire() as conn:
        await directory.create_partner(conn, "p1", "P1")
        await directory.create_partner(conn, "p2", "P2")
        await directory.create_vendor(
            conn, "v-pay", confirmation_required=False,
            terms=PaymentTerms(True, PRICE, DEPOSIT, "usd", None, "full", None))
        await directory.create_vendor(
            conn, "v-pay-late", confirmation_required=False,
            terms=PaymentTerms(True, PRICE, DEPOSIT, "usd", "acct_1vendor", "full_before", 60))
        await directory.create_vendor(conn, "v-pay-none", confirmation_required=False,
                                      terms=PaymentTerms(True, PRICE, DEPOSIT, "eur", None,
                                                         "none", None))
        await directory.create_vendor(conn, "v-free", confirmation_required=False)
        await directory.create_vendor(conn, "v-free-confirm")
        specs = {"p1": ("partner", "p1", None), "p2": ("partner", "p2", None),
                 "vendor": ("vendor", None, "v-pay"), "vendor-late": ("vendor", None,
                                                                     "v-pay-late"),
                 "vendor-none": ("vendor", None, "v-pay-none"),
                 "vendor-free": ("vendor", None, "v-free-confirm"),
                 "ops": ("ops", None, None), "admin": ("admin", None, None),
                 "system": ("system", None, None)}
        for name, (role, partner_id, vendor_id) in specs.items():
            issued, _ = await issue_key(conn, role, partner_id=partner_id, vendor_id=vendor_id)
            world.keys[name] = issued.key
    return world


def queue_for(app, consumer: str = "t") -> CommitQueue:
    svc = app.state.services
    engine = svc.reservations.engine
    orchestrator = PaymentOrchestrator(svc.extra["payment_provider"], svc.pool, engine,
                                       svc.settings)
    return CommitQueue(svc.access, svc.keyspace, svc.pool, engine, svc.settings, consumer,
                       payments=orchestrator)


async def drain(queue: CommitQueue) -> None:
    """Every pending entry of every shard, delivered once."""
    await queue.ensure_groups()
    for shard in range(queue.keys.shards):
        while await queue.drain_shard_once(shard):
            pass


async def hold(client, world, vendor="v-pay", start=24 * 60, minutes=60, partner="p1") -> str:
    r = await client.post("/v1/reservations", headers=world.auth(partner), json={
        "vendorId": vendor, "slotStartTime": at(start), "slotEndTime": at(start + minutes),
        "requesterId": "req-1"})
    assert r.status_code == 201, r.text
    return r.json()["reservationId"]


async def authorize(client, world, rid, role="vendor", pm="pm_card_visa", key=None):
    action = "vendor-authorization" if role == "vendor" else "requester-authorization"
    return await client.post(f"/v1/reservations/{rid}/{action}",
                             headers=world.auth(key or ("vendor" if role == "vendor" else "p1")),
                             json={"paymentMethodId": pm})


async def authorized_both(client, world, vendor="v-pay", vendor_key="vendor", **kw) -> str:
    rid = await hold(client, world, vendor=vendor, **kw)
    r = await authorize(client, world, rid, "vendor", key=vendor_key)
    assert r.status_code == 200, r.text
    r = await authorize(client, world, rid, "requester")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "AUTHORIZED_BOTH"
    return rid


async def commit(client, world, rid, partner="p1") -> None:
    r = await client.post(f"/v1/reservations/{rid}/commit", headers=world.auth(partner))
    assert r.status_code == 202, r.text


async def state_of(client, world, rid) -> dict:
    r = await client.get(f"/v1/reservations/{rid}", headers=world.auth("ops"))
    assert r.status_code == 200, r.text
    return r.json()


async def settle():
    await asyncio.sleep(0)
