"""A worker process killed (SIGKILL) between the two captures (issue 12): another worker
takes the commit over and neither payment is captured twice, whether the second capture
never left the dead worker or reached the provider with its answer lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from engine.payments.orchestrator import PaymentOrchestrator
from jobs.commit_queue import CommitQueue
from tests.payments_fixtures import (  # noqa: F401  (fixtures)
    API_KEY, localstripe_url, stripe_proxy)
from tests.payments_world import (  # noqa: F401
    DEPOSIT, PRICE, authorized_both, commit, pay_app, pay_client, pay_world, state_of)
from tests.test_api_fixtures import api_settings, migrated  # noqa: F401
from tests.test_payments_commit import capture_path, intents, money
from tests.test_worker import worker_env
from tests.timing import eventually


@pytest.mark.parametrize("fault", ["hold", "hold_answer"])
async def test_worker_killed_between_captures(pay_client, pay_world, pay_app, stripe_proxy,
                                              localstripe_url, fault):
    svc = pay_app.state.services
    rid = await authorized_both(pay_client, pay_world)
    vendor_pi, requester_pi = await intents(pay_client, pay_world, rid)
    release = asyncio.Event()
    rule = stripe_proxy.add("POST", capture_path(requester_pi), fault, release=release)
    settings = svc.settings.replace(reclaim_idle_ms=500, drain_block_ms=100)
    env = worker_env(settings)
    env.update({"SLOTGUARD_STRIPE_API_KEY": API_KEY,
                "SLOTGUARD_STRIPE_API_BASE": stripe_proxy.url,
                "SLOTGUARD_PAYMENT_RETRY_BASE_MS": "5"})
    log = Path(tempfile.mkdtemp(prefix="sg-pay-worker-")) / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "jobs"], env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await commit(pay_client, pay_world, rid)
        # The worker captured the vendor's deposit and is inside the requester's capture.
        await asyncio.wait_for(rule.seen.wait(), timeout=180)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        release.set()
    assert (await money(localstripe_url, vendor_pi)) == ("succeeded", DEPOSIT)
    async with svc.pool.acquire() as conn:
        status = await conn.fetchval("SELECT status FROM payment_intents WHERE "
                                     "reservation_id = $1 AND role = 'requester'", rid)
    assert status == "capturing"  # recorded before the call the worker died in
    assert (await state_of(pay_client, pay_world, rid))["state"] == "COMMIT_IN_PROGRESS"

    orchestrator = PaymentOrchestrator(svc.extra["payment_provider"], svc.pool,
                                       svc.reservations.engine, settings)
    queue = CommitQueue(svc.access, svc.keyspace, svc.pool, svc.reservations.engine, settings,
                        "survivor", payments=orchestrator)
    shard = svc.keyspace.shard_of_id(rid)

    async def taken_over() -> bool:
        await queue.reclaim_shard_once(shard)
        return (await state_of(pay_client, pay_world, rid))["state"] == "COMMITTED"

    await eventually(taken_over, timeout_s=90, what="the commit taken over")
    assert len(stripe_proxy.forwarded("POST", capture_path(vendor_pi))) == 1
    assert len(stripe_proxy.forwarded("POST", capture_path(requester_pi))) == 1
    assert await money(localstripe_url, vendor_pi) == ("succeeded", DEPOSIT)
    assert await money(localstripe_url, requester_pi) == ("succeeded", PRICE)
    async with svc.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM bookings WHERE reservation_id = $1",
                                   rid) == 1
