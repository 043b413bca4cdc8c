"""The paid lifecycle through localstripe (issue 12), and localstripe's own ceiling beside it.

``python -m benchmarks.payments [--seconds S] [--clients N] [--workers W]``

Starts a private localstripe (``--from-scratch``, free port, a temp working directory),
uses the Redis and Postgres of ``REDIS_URL`` / ``DATABASE_URL`` under a private key prefix
and schema (dropped at the end), runs the API in this process (httpx ASGI transport: no
HTTP server, so the figures are the engine's and Stripe's, not uvicorn's) and W commit-queue
workers as child processes (``python -m jobs``, the production worker with the payment
orchestrator). N clients each loop: create (paying vendor, instant confirmation) →
vendor-authorization (pm_card_visa) → requester-authorization → commit.

Measured: bookings/s (COMMITTED reservations over the span from the first create to the
last COMMITTED, from the Redis-clocked history rows in Postgres), commit latency (the
commit request's transition to COMMITTED) and create → COMMITTED, p50/p99. Then the
ceiling: N clients calling localstripe directly (authorize + capture, the 4 calls a booking
costs being 2 of each) for S seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import asyncpg
import httpx

API_KEY = "sk_test_bench"
DAY_MS = 86_400_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_localstripe() -> tuple[subprocess.Popen, str, str]:
    exe = shutil.which("localstripe", path=os.path.dirname(sys.executable)) \
        or shutil.which("localstripe")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="sg-bench-stripe-")
    proc = subprocess.Popen([exe, "--port", str(port), "--from-scratch"], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url + "/v1/customers", auth=(API_KEY, ""), timeout=2)
            return proc, url, workdir
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise RuntimeError("localstripe did not start") from None
            time.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def lifecycle(settings, seconds: float, clients: int, workers: int) -> dict:
    from api.app import create_app
    from api.auth import issue_key
    from engine import db, directory
    from engine.payments.terms import PaymentTerms
    from tests.test_worker import worker_env

    await asyncio.to_thread(db.migrate, settings)
    pool = await db.create_pool(settings, max_size=2)
    async with pool.acquire() as conn:
        await directory.create_partner(conn, "bench", "Bench")
        await directory.create_vendor(conn, "paid", unit_minutes=15,
                                      confirmation_required=False,
                                      terms=PaymentTerms(True, 5000, 1000, "usd"))
        partner, _ = await issue_key(conn, "partner", partner_id="bench")
        vendor, _ = await issue_key(conn, "vendor", vendor_id="paid")
    env = worker_env(settings)
    env.update({"SLOTGUARD_STRIPE_API_KEY": settings.stripe_api_key,
                "SLOTGUARD_STRIPE_API_BASE": settings.stripe_api_base})
    procs = [subprocess.Popen([sys.executable, "-m", "jobs"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True) for _ in range(workers)]
    app = create_app(settings)
    pauth = {"Authorization": f"Bearer {partner.key}"}
    vauth = {"Authorization": f"Bearer {vendor.key}"}
    rids: list[str] = []
    errors: dict[str, int] = {}
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench",
                                         timeout=60) as client:
                base = (int(time.time() * 1000) // DAY_MS + 2) * DAY_MS
                counter = iter(range(10**9))
                stop_at = time.monotonic() + seconds

                async def one_client():
                    while time.monotonic() < stop_at:
                        n = next(counter)
                        start = base + n * 15 * 60_000

                        def iso(ms):
                            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))

                        r = await client.post("/v1/reservations", headers=pauth, json={
                            "vendorId": "paid", "slotStartTime": iso(start),
                            "slotEndTime": iso(start + 15 * 60_000), "requesterId": f"r{n}"})
                        if r.status_code != 201:
                            errors[f"create {r.status_code}"] = errors.get(
                                f"create {r.status_code}", 0) + 1
                            continue
                        rid = r.json()["reservationId"]
                        steps = [("vendor-authorization", vauth, {"paymentMethodId":
                                                                   "pm_card_visa"}),
                                 ("requester-authorization", pauth, {"paymentMethodId":
                                                                      "pm_card_visa"}),
                                 ("commit", pauth, None)]
                        for action, headers, body in steps:
                            r = await client.post(f"/v1/reservations/{rid}/{action}",
                                                  headers=headers, json=body)
                            if r.status_code not in (200, 202):
                                errors[f"{action} {r.status_code}"] = errors.get(
                                    f"{action} {r.status_code}", 0) + 1
                                break
                        else:
                            rids.append(rid)

                started = time.monotonic()
                await asyncio.gather(*(one_client() for _ in range(clients)))
                requests_done = time.monotonic() - started
        # Wait for the workers to finish the commits.
        deadline = time.monotonic() + 300
        while True:
            async with pool.acquire() as conn:
                done = await conn.fetchval(
                    "SELECT count(*) FROM reservations WHERE id = ANY($1::text[]) AND state "
                    "IN ('COMMITTED', 'FAILED_COMMIT', 'FAILED_AVAILABILITY_CHANGED')", rids)
            if done >= len(rids) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT reservation_id,
                          min(at) FILTER (WHERE to_state = 'HELD') AS created,
                          min(at) FILTER (WHERE to_state = 'COMMIT_IN_PROGRESS') AS commit,
                          min(at) FILTER (WHERE to_state = 'COMMITTED') AS committed
                   FROM reservation_history WHERE reservation_id = ANY($1::text[])
                   GROUP BY reservation_id""", rids)
            failed = await conn.fetchval(
                "SELECT count(*) FROM reservations WHERE id = ANY($1::text[]) AND state "
                "<> 'COMMITTED'", rids)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        await pool.close()
    committed = [r for r in rows if r["committed"] is not None]
    commit_ms = [(r["committed"] - r["commit"]).total_seconds() * 1000 for r in committed]
    total_ms = [(r["committed"] - r["created"]).total_seconds() * 1000 for r in committed]
    span = (max(r["committed"] for r in committed)
            - min(r["created"] for r in committed)).total_seconds() if committed else 0
    return {"committed": len(committed), "not_committed": failed, "errors": errors,
            "requests_seconds": round(requests_done, 2),
            "bookings_per_s": round(len(committed) / span, 1) if span else 0,
            "commit_to_committed_ms": {"p50": round(pct(commit_ms, 0.5), 1),
                                       "p99": round(pct(commit_ms, 0.99), 1)},
            "create_to_committed_ms": {"p50": round(pct(total_ms, 0.5), 1),
                                       "p99": round(pct(total_ms, 0.99), 1)}}


async def ceiling(url: str, seconds: float, clients: int) -> dict:
    """localstripe alone: authorize (create + confirm) then capture, N clients."""
    from engine.payments.provider import StripeProvider

    provider = StripeProvider(API_KEY, api_base=url)
    calls = 0
    stop_at = time.monotonic() + seconds

    async def one(i: int):
        nonlocal calls
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            intent = await provider.authorize(amount=1000, currency="usd",
                                              payment_method="pm_card_visa", metadata={},
                                              idempotency_key=f"c{i}-{n}",
                                              stripe_account=None)
            await provider.capture(intent.id, idempotency_key=f"k{i}-{n}", stripe_account=None)
            calls += 2

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(clients)))
    elapsed = time.monotonic() - started
    await provider.close()
    return {"calls_per_s": round(calls / elapsed, 1),
            "bookings_per_s_bound": round(calls / elapsed / 4, 1)}


async def growth(n: int) -> list[dict]:
    """What bounds localstripe: one client, a fresh store, the mean time of an
    authorization per 100 as the store grows (localstripe pickles its whole store to one
    file on every write)."""
    from engine.payments.provider import StripeProvider

    proc, url, workdir = start_localstripe()
    provider = StripeProvider(API_KEY, api_base=url)
    out = []
    try:
        for block in range(0, n, 100):
            started = time.perf_counter()
            for i in range(100):
                await provider.authorize(amount=1000, currency="usd",
                                         payment_method="pm_card_visa", metadata={},
                                         idempotency_key=f"g{block + i}", stripe_account=None)
            out.append({"intents_before": block,
                        "ms_per_authorization": round((time.perf_counter() - started) * 10, 2)})
    finally:
        await provider.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return out


async def main_async(args) -> dict:
    from engine.settings import Settings

    proc, url, workdir = start_localstripe()
    suffix = uuid.uuid4().hex[:10]
    settings = Settings.from_env(
        key_prefix=f"bpay{suffix}:", db_schema=f"bpay_{suffix}", shards=4,
        stripe_api_key=API_KEY, stripe_api_base=url, partner_max_live_holds=0,
        partner_rate_per_minute=0, ip_rate_per_minute=0, drain_block_ms=50)
    try:
        result = {"localstripe_fresh": await ceiling(url, args.seconds, args.clients),
                  "lifecycle": await lifecycle(settings, args.seconds, args.clients,
                                               args.workers),
                  "localstripe_after": await ceiling(url, args.seconds, args.clients)}
        if args.growth:
            result["localstripe_growth"] = await growth(args.growth)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
        conn = await asyncpg.connect(settings.database_url)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
        await conn.close()
        import redis

        client = redis.Redis.from_url(settings.redis_url)
        keys = list(client.scan_iter(match=f"{settings.key_prefix}*", count=1000))
        if keys:
            client.unlink(*keys)
        client.close()
    result["load_average"] = os.getloadavg()
    result["args"] = vars(args)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--growth", type=int, default=0,
                        help="also time N sequential authorizations on a fresh localstripe")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
