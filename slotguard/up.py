"""``slotguard up``: a running engine on a fresh machine with one command.

With no ``REDIS_URL``/``DATABASE_URL`` in the environment it starts an embedded Redis and
Postgres under a data dir (``.slotguard/``), on free loopback ports; with them set it uses
those servers. Then it migrates, prepares a demo vendor and partner, runs the API and a
worker as child processes, prints the URL and a partner key, and on Ctrl-C (or SIGTERM)
stops everything in order: API, worker, then the embedded servers.
"""

from __future__ import annotations

import asyncio
import logging
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

from slotguard import envfile

DEMO_PARTNER = "demo-partner"
DEMO_VENDOR = "demo-vendor"
# The demo vendor requires payment (issue 12): the requester's price and the vendor's
# deposit, in cents. Without SLOTGUARD_STRIPE_API_KEY `up` runs localstripe for them.
DEMO_PRICE, DEMO_DEPOSIT, DEMO_CURRENCY = 5_000, 1_000, "usd"
LOCAL_STRIPE_KEY = "sk_test_slotguard_local"


@dataclass
class DemoKeys:
    partner: str
    vendor: str
    ops: str


@dataclass
class Stack:
    api_url: str
    redis_url: str
    database_url: str
    keys: DemoKeys
    embedded: object | None
    children: list[subprocess.Popen]
    env_file: Path | None = None

    @property
    def partner_key(self) -> str:
        return self.keys.partner
    cluster: object | None = None  # slotguard.local_cluster.LocalCluster (--cluster N)
    stripe: str = "Stripe"  # the Stripe API base the stack uses (issue 12)
    local_stripe: subprocess.Popen | None = None  # localstripe, when `up` started it


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


async def prepare(settings) -> DemoKeys:
    """Migrate, create the demo vendor (payment required, issue 12) and partner if missing,
    issue a partner, a vendor and an ops key (new ones each start: plaintext keys are never
    stored)."""
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
            partner, _ = await issue_key(conn, "partner", partner_id=DEMO_PARTNER)
            vendor, _ = await issue_key(conn, "vendor", vendor_id=DEMO_VENDOR)
            ops, _ = await issue_key(conn, "ops")
            return DemoKeys(partner.key, vendor.key, ops.key)
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


def start(host: str, port: int | None, data_dir: Path, cluster: int = 0) -> Stack:
    """``cluster`` > 0: the hot path on a local Redis Cluster of that many masters (a
    replica each, under ``<data dir>/cluster``, started afresh); the embedded (or
    ``REDIS_URL``) single Redis then keeps arq's cron queue (SLOTGUARD_ARQ_REDIS_URL)."""
    from engine import metrics
    from engine.settings import Settings
    from slotguard.embedded import EmbeddedServers

    redis_url = os.environ.get("REDIS_URL")
    database_url = os.environ.get("DATABASE_URL")
    embedded = local_cluster = None
    if not (redis_url and database_url):
        embedded = EmbeddedServers(data_dir)
        embedded_redis, embedded_db = embedded.start()
        redis_url = redis_url or embedded_redis
        database_url = database_url or embedded_db
    extra: dict[str, str] = {}
    local_stripe = None
    try:
        if not os.environ.get("SLOTGUARD_STRIPE_API_KEY"):
            # Payments (issue 12): a local Stripe-compatible server for the paying demo.
            local_stripe, stripe_url = start_local_stripe(host, data_dir)
            extra.update({"SLOTGUARD_STRIPE_API_KEY": LOCAL_STRIPE_KEY,
                          "SLOTGUARD_STRIPE_API_BASE": stripe_url,
                          "SLOTGUARD_STRIPE_WEBHOOK_SECRET":
                              os.environ.get("SLOTGUARD_STRIPE_WEBHOOK_SECRET")
                              or "whsec_slotguard_local"})
        if cluster:
            import shutil

            from slotguard.local_cluster import LocalCluster

            cluster_dir = (data_dir / "cluster").resolve()
            shutil.rmtree(cluster_dir, ignore_errors=True)  # nothing in it outlives a run
            local_cluster = LocalCluster(masters=cluster, replicas=1, base_dir=cluster_dir)
            local_cluster.start()
            extra.update({"SLOTGUARD_REDIS_CLUSTER": "true",
                          "SLOTGUARD_ARQ_REDIS_URL": redis_url})
            redis_url = local_cluster.seed_url
        settings = Settings.from_env(redis_url=redis_url, database_url=database_url,
                                     redis_cluster=bool(cluster))
        keys = asyncio.run(prepare(settings))
        if port is None:
            port = 8000 if port_is_free(host, 8000) else free_port(host)
        elif port == 0:
            port = free_port(host)
        multiproc = data_dir / "metrics"
        metrics.reset_multiprocess_dir(multiproc)
        env = dict(os.environ, REDIS_URL=redis_url, DATABASE_URL=database_url,
                   PROMETHEUS_MULTIPROC_DIR=str(multiproc.resolve()), **extra)
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
        if local_cluster is not None:
            local_cluster.stop()
        if embedded is not None:
            embedded.stop()
        raise
    stack = Stack(api_url, redis_url, database_url, keys, embedded, children,
                  cluster=local_cluster,
                  stripe=extra.get("SLOTGUARD_STRIPE_API_BASE")
                  or os.environ.get("SLOTGUARD_STRIPE_API_BASE") or "Stripe",
                  local_stripe=local_stripe)
    stack.env_file = write_env_file(stack, settings, data_dir, extra)
    return stack


def write_env_file(stack: Stack, settings, data_dir: Path,
                   extra: dict[str, str] | None = None) -> Path:
    """``<data dir>/env``: the servers for every other command (slotguard/envfile.py)."""
    values = {envfile.API_URL: stack.api_url, "REDIS_URL": stack.redis_url,
              "DATABASE_URL": stack.database_url, "SLOTGUARD_DB_SCHEMA": settings.db_schema,
              "SLOTGUARD_SHARDS": str(settings.shards)}
    # cluster mode: SLOTGUARD_REDIS_CLUSTER, SLOTGUARD_ARQ_REDIS_URL; the local Stripe server
    # (issue 12: its base and its dummy test key, so a worker started from here captures)
    values.update(extra or {})
    if settings.key_prefix:
        values["SLOTGUARD_KEY_PREFIX"] = settings.key_prefix
    path = envfile.path_for(data_dir)
    envfile.write(path, values)
    return path


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
    if stack.env_file is not None:
        envfile.remove(stack.env_file)
    stop_children(stack.children)
    if stack.local_stripe is not None:
        stop_children([stack.local_stripe])
    if stack.cluster is not None:
        stack.cluster.stop()
    if stack.embedded is not None:
        stack.embedded.stop()


def demo_slot(now_s: float | None = None) -> tuple[str, str]:
    """A slot for the banner's walk: tomorrow at this time, on the 15-minute grid (each
    start of `up` offers another one, so walking it again after a restart is not a 409)."""
    from datetime import UTC, datetime

    unit_s = 15 * 60
    start = (int(now_s if now_s is not None else time.time()) // unit_s + 1) * unit_s + 86_400
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return (datetime.fromtimestamp(start, UTC).strftime(fmt),
            datetime.fromtimestamp(start + 2 * unit_s, UTC).strftime(fmt))


def walk(stack: Stack, now_s: float | None = None) -> str:
    """Copy-paste shell lines that take one reservation to COMMITTED (curl and sed only)."""
    start, end = demo_slot(now_s)
    return f"""  export SG={stack.api_url}
  export PARTNER_KEY={stack.keys.partner}
  export VENDOR_KEY={stack.keys.vendor}
  # 1. the partner holds a slot: AWAITING_VENDOR_CONFIRMATION
  RID=$(curl -s -X POST $SG/v1/reservations -H "Authorization: Bearer $PARTNER_KEY" \\
    -H 'Content-Type: application/json' \\
    -d '{{"vendorId":"{DEMO_VENDOR}","slotStartTime":"{start}","slotEndTime":"{end}","requesterId":"alice"}}' \\
    | sed -E 's/.*"reservationId":"([^"]+)".*/\\1/'); echo $RID
  # 2. the vendor confirms: AWAITING_VENDOR_AUTH (this vendor requires payment)
  curl -s -X POST $SG/v1/reservations/$RID/vendor-confirmation -H "Authorization: Bearer $VENDOR_KEY"; echo
  # 3. the vendor's deposit is authorized with a test card: AWAITING_REQUESTER_AUTH
  curl -s -X POST $SG/v1/reservations/$RID/vendor-authorization -H "Authorization: Bearer $VENDOR_KEY" \\
    -H 'Content-Type: application/json' -d '{{"paymentMethodId":"pm_card_visa"}}'; echo
  # 4. the requester's price is authorized: AUTHORIZED_BOTH
  curl -s -X POST $SG/v1/reservations/$RID/requester-authorization -H "Authorization: Bearer $PARTNER_KEY" \\
    -H 'Content-Type: application/json' -d '{{"paymentMethodId":"pm_card_visa"}}'; echo
  # 5. the partner commits: 202 COMMIT_IN_PROGRESS; the worker captures both, then books
  curl -s -X POST $SG/v1/reservations/$RID/commit -H "Authorization: Bearer $PARTNER_KEY"; echo
  # 6. read it back: COMMITTED (a moment after the commit)
  curl -s $SG/v1/reservations/$RID -H "Authorization: Bearer $PARTNER_KEY"; echo"""


def _origin(stack: Stack, name: str) -> str:
    """Where ``up`` took a server from: the environment variable, or its embedded one."""
    if os.environ.get(name):
        return f"(from {name})"
    data_dir = getattr(stack.embedded, "data_dir", None)
    return f"(embedded, data in {data_dir})" if data_dir else "(embedded)"


def banner(stack: Stack) -> str:
    local = " (localstripe, a local test server)" if stack.local_stripe is not None else ""
    env_line = (f"  env file       {stack.env_file}  (every slotguard command here uses "
                f"these servers)\n" if stack.env_file else "")
    return f"""
slotguard is up.
  API            {stack.api_url}   (OpenAPI: {stack.api_url}/openapi.json)
  metrics        {stack.api_url}/metrics
  Redis          {stack.redis_url}{_cluster_line(stack)}   {_origin(stack, "REDIS_URL")}
  Postgres       {stack.database_url}   {_origin(stack, "DATABASE_URL")}
  Stripe         {stack.stripe}{local}
{env_line}  demo vendor    {DEMO_VENDOR} (15-minute slots, vendor confirmation, payment required:
                 price {DEMO_PRICE} and deposit {DEMO_DEPOSIT} {DEMO_CURRENCY} cents)
  demo partner   {DEMO_PARTNER}
  partner key    {stack.keys.partner}
  vendor key     {stack.keys.vendor}
  ops key        {stack.keys.ops}
  test cards     pm_card_visa authorizes; pm_card_chargeCustomerFail (4000000000000341)
                 is declined (402 PAYMENT_DECLINED)

A reservation from hold to COMMITTED (copy and paste):
{walk(stack)}

More: `slotguard status`, `slotguard keys list`, `slotguard keys create --role partner
--partner demo-partner`. Ctrl-C stops everything.
"""


def _cluster_line(stack: Stack) -> str:
    if stack.cluster is None:
        return ""
    masters = stack.cluster.masters
    return (f" (seed of a Redis Cluster: {masters} master{'s' if masters > 1 else ''}, "
            f"a replica each)")


def run(host: str, port: int | None, data_dir: Path, cluster: int = 0) -> int:
    from engine.settings import Settings
    from slotguard.logs import configure

    configure(Settings.from_env().log_format)  # the format of the API and worker (issue 17)
    log = logging.getLogger("slotguard.up")
    stack = start(host, port, data_dir, cluster)
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
                    log.error("slotguard: %s exited (%s); stopping", child.args[3],
                              child.returncode)
                    stopping, code = True, 1
            time.sleep(0.3)
    finally:
        log.info("slotguard: stopping")
        stop(stack)
    return code
