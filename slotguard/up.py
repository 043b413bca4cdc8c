"""``slotguard up``: a running engine on a fresh machine with one command.

With no ``REDIS_URL``/``DATABASE_URL`` in the environment it starts an embedded Redis and
Postgres under a data dir (``.slotguard/``), on free loopback ports; with them set it uses
those servers. Then it migrates, prepares a demo vendor and partner, runs the API and a
worker as child processes, prints the URL and a partner key, and on Ctrl-C (or SIGTERM)
stops everything in order: API, worker, then the embedded servers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEMO_PARTNER = "demo-partner"
DEMO_VENDOR = "demo-vendor"
# The demo vendor requires payment (issue 12): the requester's price and the vendor's
# deposit, in cents. Without SLOTGUARD_STRIPE_API_KEY `up` runs localstripe for them.
DEMO_PRICE, DEMO_DEPOSIT, DEMO_CURRENCY = 5_000, 1_000, "usd"
LOCAL_STRIPE_KEY = "sk_test_slotguard_local"


@dataclass
class Stack:
    api_url: str
    redis_url: str
    database_url: str
    partner_key: str
    embedded: object | None
    children: list[subprocess.Popen]
    vendor_key: str = ""
    stripe: str = ""  # the Stripe API base the stack uses ("" = Stripe's own)
    local_stripe: subprocess.Popen | None = None


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


async def prepare(settings) -> tuple[str, str]:
    """Migrate, create the demo vendor (payment required) and partner if missing, issue a
    partner key and a vendor key."""
    from api.auth import issue_key
    from engine import directory
    from engine.db import create_pool, migrate
    from engine.payments.terms import PaymentTerms

    await asyncio.to_thread(migrate, settings)
    pool = await create_pool(settings, max_size=2)
    try:
        async with pool.acquire() as conn:
            try:
                await directory.create_partner(conn, DEMO_PARTNER, "Demo partner")
            except directory.AlreadyExists:
                pass
            try:
                await directory.create_vendor(
                    conn, DEMO_VENDOR, unit_minutes=15, confirmation_required=True,
                    terms=PaymentTerms(True, DEMO_PRICE, DEMO_DEPOSIT, DEMO_CURRENCY))
            except directory.AlreadyExists:
                pass
            issued, _ = await issue_key(conn, "partner", partner_id=DEMO_PARTNER)
            vendor, _ = await issue_key(conn, "vendor", vendor_id=DEMO_VENDOR)
            return issued.key, vendor.key
    finally:
        await pool.close()


def start_local_stripe(host: str, data_dir: Path) -> tuple[subprocess.Popen, str]:
    """localstripe on a free port (``--from-scratch``: its store file is shared by every
    instance on the machine, so it never reads it back)."""
    import shutil

    exe = shutil.which("localstripe", path=os.path.dirname(sys.executable)) \
        or shutil.which("localstripe")
    if exe is None:
        raise RuntimeError("localstripe is not installed (pip install localstripe) and "
                           "SLOTGUARD_STRIPE_API_KEY is not set")
    port = free_port(host)
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([exe, "--port", str(port), "--from-scratch"], cwd=data_dir,
                            stdout=(data_dir / "localstripe.log").open("ab"),
                            stderr=subprocess.STDOUT)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + 60
    while True:
        request = urllib.request.Request(f"{url}/v1/customers",
                                         headers={"Authorization": f"Bearer {LOCAL_STRIPE_KEY}"})
        try:
            with urllib.request.urlopen(request, timeout=2):
                return proc, url
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("localstripe did not start") from None
            time.sleep(0.2)


def wait_ready(url: str, children: list[subprocess.Popen], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in children:
            if child.poll() is not None:
                raise RuntimeError(f"{child.args[3]} exited with {child.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the API at {url} was not ready within {timeout_s:.0f}s")


def start(host: str, port: int | None, data_dir: Path) -> Stack:
    from engine import metrics
    from engine.settings import Settings
    from slotguard.embedded import EmbeddedServers

    redis_url = os.environ.get("REDIS_URL")
    database_url = os.environ.get("DATABASE_URL")
    embedded = None
    if not (redis_url and database_url):
        embedded = EmbeddedServers(data_dir)
        embedded_redis, embedded_db = embedded.start()
        redis_url = redis_url or embedded_redis
        database_url = database_url or embedded_db
    local_stripe, stripe_env = None, {}
    try:
        if not os.environ.get("SLOTGUARD_STRIPE_API_KEY"):
            local_stripe, stripe_url = start_local_stripe(host, data_dir)
            stripe_env = {"SLOTGUARD_STRIPE_API_KEY": LOCAL_STRIPE_KEY,
                          "SLOTGUARD_STRIPE_API_BASE": stripe_url,
                          "SLOTGUARD_STRIPE_WEBHOOK_SECRET":
                              os.environ.get("SLOTGUARD_STRIPE_WEBHOOK_SECRET")
                              or "whsec_slotguard_local"}
        settings = Settings.from_env(redis_url=redis_url, database_url=database_url)
        partner_key, vendor_key = asyncio.run(prepare(settings))
        if port is None:
            port = 8000 if port_is_free(host, 8000) else free_port(host)
        elif port == 0:
            port = free_port(host)
        multiproc = data_dir / "metrics"
        metrics.reset_multiprocess_dir(multiproc)
        env = dict(os.environ, REDIS_URL=redis_url, DATABASE_URL=database_url,
                   PROMETHEUS_MULTIPROC_DIR=str(multiproc.resolve()), **stripe_env)
        cli = [sys.executable, "-m", "slotguard"]
        children = [
            subprocess.Popen([*cli, "serve", "--host", host, "--port", str(port)], env=env),
            subprocess.Popen([*cli, "worker"], env=env),
        ]
        api_url = f"http://{host}:{port}"
        try:
            wait_ready(api_url, children)
        except BaseException:
            stop_children(children)
            raise
    except BaseException:
        if local_stripe is not None:
            stop_children([local_stripe])
        if embedded is not None:
            embedded.stop()
        raise
    return Stack(api_url, redis_url, database_url, partner_key, embedded, children,
                 vendor_key=vendor_key,
                 stripe=stripe_env.get("SLOTGUARD_STRIPE_API_BASE")
                 or os.environ.get("SLOTGUARD_STRIPE_API_BASE") or "Stripe",
                 local_stripe=local_stripe)


def stop_children(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def stop(stack: Stack) -> None:
    stop_children(stack.children)
    if stack.local_stripe is not None:
        stop_children([stack.local_stripe])
    if stack.embedded is not None:
        stack.embedded.stop()


def banner(stack: Stack) -> str:
    api, pk, vk = stack.api_url, stack.partner_key, stack.vendor_key
    local = " (localstripe, local test server)" if stack.local_stripe is not None else ""
    return f"""
slotguard is up.
  API            {api}   (OpenAPI: {api}/openapi.json)
  metrics        {api}/metrics
  Redis          {stack.redis_url}
  Postgres       {stack.database_url}
  Stripe         {stack.stripe}{local}
  demo vendor    {DEMO_VENDOR} (15-minute slots, vendor confirmation, payment required:
                 price {DEMO_PRICE} and deposit {DEMO_DEPOSIT} {DEMO_CURRENCY} cents)
  demo partner   {DEMO_PARTNER}
  partner key    {pk}
  vendor key     {vk}
  test cards     pm_card_visa authorizes; pm_card_chargeCustomerFail (4000000000000341)
                 is declined (402 PAYMENT_DECLINED)

Try (RID is the reservationId the first call answers):
  curl -s -X POST {api}/v1/reservations \\
    -H 'Authorization: Bearer {pk}' -H 'Content-Type: application/json' \\
    -d '{{"vendorId": "{DEMO_VENDOR}", "slotStartTime": "2030-01-01T09:00:00Z",
         "slotEndTime": "2030-01-01T10:00:00Z", "requesterId": "alice"}}'
  curl -s -X POST {api}/v1/reservations/RID/vendor-confirmation -H 'Authorization: Bearer {vk}'
  curl -s -X POST {api}/v1/reservations/RID/vendor-authorization -H 'Authorization: Bearer {vk}' \\
    -H 'Content-Type: application/json' -d '{{"paymentMethodId": "pm_card_visa"}}'
  curl -s -X POST {api}/v1/reservations/RID/requester-authorization -H 'Authorization: Bearer {pk}' \\
    -H 'Content-Type: application/json' -d '{{"paymentMethodId": "pm_card_visa"}}'
  curl -s -X POST {api}/v1/reservations/RID/commit -H 'Authorization: Bearer {pk}'
  curl -s {api}/v1/reservations/RID -H 'Authorization: Bearer {pk}'   # COMMITTED

Ctrl-C stops everything.
"""


def run(host: str, port: int | None, data_dir: Path) -> int:
    stack = start(host, port, data_dir)
    stopping = False

    def on_signal(signum, frame):  # turn SIGTERM into the same clean stop as Ctrl-C
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    # Ctrl-C stops the stack even when we were started with SIGINT ignored (a background
    # job of a non-interactive shell inherits SIG_IGN, and Python then leaves it so).
    signal.signal(signal.SIGINT, on_signal)
    print(banner(stack), flush=True)
    code = 0
    try:
        while not stopping:
            for child in stack.children:
                if child.poll() is not None:
                    print(f"slotguard: {child.args[3]} exited ({child.returncode}); stopping",
                          file=sys.stderr, flush=True)
                    stopping, code = True, 1
            time.sleep(0.3)
    finally:
        print("slotguard: stopping", flush=True)
        stop(stack)
    return code
