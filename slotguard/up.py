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


@dataclass
class Stack:
    api_url: str
    redis_url: str
    database_url: str
    partner_key: str
    embedded: object | None
    children: list[subprocess.Popen]
    cluster: object | None = None  # slotguard.local_cluster.LocalCluster (--cluster N)


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


async def prepare(settings) -> str:
    """Migrate, create the demo vendor and partner if missing, issue a partner key."""
    from api.auth import issue_key
    from engine import directory
    from engine.db import create_pool, migrate

    await asyncio.to_thread(migrate, settings)
    pool = await create_pool(settings, max_size=2)
    try:
        async with pool.acquire() as conn:
            try:
                await directory.create_partner(conn, DEMO_PARTNER, "Demo partner")
            except directory.AlreadyExists:
                pass
            try:
                await directory.create_vendor(conn, DEMO_VENDOR, unit_minutes=15,
                                              confirmation_required=True,
                                              payment_required=False)
            except directory.AlreadyExists:
                pass
            issued, _ = await issue_key(conn, "partner", partner_id=DEMO_PARTNER)
            return issued.key
    finally:
        await pool.close()


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
    try:
        if cluster:
            import shutil

            from slotguard.local_cluster import LocalCluster

            cluster_dir = (data_dir / "cluster").resolve()
            shutil.rmtree(cluster_dir, ignore_errors=True)  # nothing in it outlives a run
            local_cluster = LocalCluster(masters=cluster, replicas=1, base_dir=cluster_dir)
            local_cluster.start()
            extra = {"SLOTGUARD_REDIS_CLUSTER": "true", "SLOTGUARD_ARQ_REDIS_URL": redis_url}
            redis_url = local_cluster.seed_url
        settings = Settings.from_env(redis_url=redis_url, database_url=database_url,
                                     redis_cluster=bool(cluster))
        partner_key = asyncio.run(prepare(settings))
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
        if local_cluster is not None:
            local_cluster.stop()
        if embedded is not None:
            embedded.stop()
        raise
    return Stack(api_url, redis_url, database_url, partner_key, embedded, children,
                 local_cluster)


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
    if stack.cluster is not None:
        stack.cluster.stop()
    if stack.embedded is not None:
        stack.embedded.stop()


def banner(stack: Stack) -> str:
    return f"""
slotguard is up.
  API            {stack.api_url}   (OpenAPI: {stack.api_url}/openapi.json)
  metrics        {stack.api_url}/metrics
  Redis          {stack.redis_url}{_cluster_line(stack)}
  Postgres       {stack.database_url}
  demo vendor    {DEMO_VENDOR} (15-minute slots, vendor confirmation, no payment)
  demo partner   {DEMO_PARTNER}
  partner key    {stack.partner_key}

Try:
  curl -s -X POST {stack.api_url}/v1/reservations \\
    -H 'Authorization: Bearer {stack.partner_key}' -H 'Content-Type: application/json' \\
    -d '{{"vendorId": "{DEMO_VENDOR}", "slotStartTime": "2030-01-01T09:00:00Z",
         "slotEndTime": "2030-01-01T10:00:00Z", "requesterId": "alice"}}'

Ctrl-C stops everything.
"""


def _cluster_line(stack: Stack) -> str:
    if stack.cluster is None:
        return ""
    masters = stack.cluster.masters
    return (f" (seed of a Redis Cluster: {masters} master{'s' if masters > 1 else ''}, "
            f"a replica each)")


def run(host: str, port: int | None, data_dir: Path, cluster: int = 0) -> int:
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
                    print(f"slotguard: {child.args[3]} exited ({child.returncode}); stopping",
                          file=sys.stderr, flush=True)
                    stopping, code = True, 1
            time.sleep(0.3)
    finally:
        print("slotguard: stopping", flush=True)
        stop(stack)
    return code
